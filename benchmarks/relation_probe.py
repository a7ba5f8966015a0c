"""Does the LLM's input say where the named objects are? A `spatial-compare` probe on V_i and on the encoder cells.

A `spatial-compare` sample ("In which image is the laptop to the right of the house?") shows both objects in every
image, the asked way round in one image only (`prima.data.synth_questions.spatial_compare`), so its answer needs the
two objects' left-right order in each image. The probe reads one image at a time: an attention keyed by each named
category (a learned embedding) finds that object among the image's tokens and reads its x position, and the image
scores ``w * (x_first - x_second) * (+1 for "right", -1 for "left") + b``. For the encoder's grid cells x is the
attended cells' column; for the visual tokens V_i that the LLM gets (question-conditioned, as in training), which
have no grid, x is a learned linear read-out of the attended token. A sample counts as right when its answer image
scores highest (chance: the mean of 1 / images). Fit on the `spatial-compare` samples of ``--fit`` (full batch,
Adam), scored on those of ``--data`` (make a split of them; never a test split):

    prima data synth --out data/synth/val-sc --num 300 --seed 11 --split val --families spatial-compare
    .venv/bin/python benchmarks/relation_probe.py checkpoints/prima-tiny-synth --data data/synth/val-sc/samples.jsonl \
        --fit data/synth/train/samples.jsonl --feature-cache .cache/features

High for the encoder cells and near chance for V_i: the query module loses where the objects are before the LLM
could compare them.
"""

from __future__ import annotations

import re

import teacher_forced
import torch
import torch.nn.functional as F

from prima.model import PrimaModel
from prima.train.data import load_samples
from prima.train.run import TrainCollator

QUESTION = re.compile(r"In which image is the (\w+) to the (left|right) of the (\w+)\?")


def image_rows(model: PrimaModel, collate: TrainCollator, samples, batch: int, encoder: bool) -> list[tuple]:
    """(tokens (images, T, H), first category, direction, second category, answer image) per `spatial-compare`
    sample: the encoder's grid cells with ``encoder``, else V_i; each token RMS-normalised."""
    rows = []
    samples = [s for s in samples if s.family == "spatial-compare"]
    with torch.no_grad():
        for chunk, collated in teacher_forced.batches(samples, batch, collate):
            if encoder:
                grid = teacher_forced.image_features(model, collated)[model.vision.token_index]
                tokens = grid.float().flatten(2).transpose(1, 2)
            else:
                tokens = teacher_forced.visual_tokens(model, collated)
            tokens = F.rms_norm(tokens.float(), tokens.shape[-1:])
            start = 0
            for s in chunk:
                n = len(s.images)
                first, direction, second = QUESTION.match(s.question).groups()
                rows.append((tokens[start : start + n], first, direction, second, s.segments[0].image - 1))
                start += n
    return rows


class OrderProbe(torch.nn.Module):
    def __init__(self, width: int, categories: int, columns: torch.Tensor | None):
        super().__init__()
        self.query = torch.nn.Embedding(categories, width)
        self.key = torch.nn.Linear(width, width, bias=False)
        self.x = torch.nn.Linear(width, 1)  # V_i: x read from the attended token
        self.columns = columns  # encoder cells: each cell's column in [0, 1]
        self.w, self.b = torch.nn.Parameter(torch.tensor(5.0)), torch.nn.Parameter(torch.tensor(-1.0))

    def position(self, tokens: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        attn = torch.einsum("bh,bth->bt", self.query(category), self.key(tokens)).softmax(-1)
        if self.columns is not None:
            return attn @ self.columns
        return self.x(torch.einsum("bt,bth->bh", attn, tokens))[:, 0]

    def forward(self, tokens, first, sign, second) -> torch.Tensor:
        return self.w * (self.position(tokens, first) - self.position(tokens, second)) * sign + self.b


def probe(fit: list[tuple], test: list[tuple], steps: int, columns: torch.Tensor | None) -> dict[str, float]:
    categories = sorted({r[1] for r in fit} | {r[3] for r in fit})

    def tensors(rows):
        rows = [r for r in rows if r[1] in categories and r[3] in categories]
        per_image = [(r, k) for r in rows for k in range(len(r[0]))]
        return (
            torch.cat([r[0] for r in rows]),
            torch.tensor([categories.index(r[1]) for r, _ in per_image]),
            torch.tensor([1.0 if r[2] == "right" else -1.0 for r, _ in per_image]),
            torch.tensor([categories.index(r[3]) for r, _ in per_image]),
            torch.tensor([float(k == r[4]) for r, k in per_image]),
            [len(r[0]) for r in rows],
        )

    x, xt = tensors(fit), tensors(test)
    torch.manual_seed(0)
    model = OrderProbe(x[0].shape[-1], len(categories), columns)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(*x[:4]), x[4]).backward()
        opt.step()

    def found(t) -> float:
        with torch.no_grad():
            scores = model(*t[:4]).split(t[5])
        return sum(float(s.argmax() == y.argmax()) for s, y in zip(scores, t[4].split(t[5]))) / len(t[5])

    return {"test": found(xt), "fit": found(x), "chance": sum(1 / n for n in xt[5]) / len(xt[5]), "n": len(xt[5])}


def main() -> None:
    parser = teacher_forced.options(__doc__, data="data/synth/val-sc/samples.jsonl", samples=100000, batch=16)
    parser.add_argument("--fit", nargs="+", default=["data/synth/train/samples.jsonl"], help="samples to fit on")
    parser.add_argument("--steps", type=int, default=300)
    args = teacher_forced.parse(parser)
    model, collate = teacher_forced.load(args.checkpoint, args.feature_cache)
    fit_samples = [s for path in args.fit for s in load_samples(path)]
    test_samples = teacher_forced.samples(args)
    for name, samples in (("--fit", fit_samples), ("--data", test_samples)):
        if not any(s.family == "spatial-compare" for s in samples):
            raise SystemExit(f"relation_probe: {name} has no spatial-compare samples (see the docstring's command)")
    for name, encoder in (("V_i", False), ("encoder cells", True)):
        fit = image_rows(model, collate, fit_samples, args.batch, encoder)
        test = image_rows(model, collate, test_samples, args.batch, encoder)
        side = int(fit[0][0].shape[1] ** 0.5)
        columns = (torch.arange(side * side) % side).float() / (side - 1) if encoder else None
        r = probe(fit, test, args.steps, columns)
        print(f"{name:>13}: answer image found for {r['test']:.3f} of {r['n']} samples (chance {r['chance']:.3f}); "
              f"on the {len(fit)} fit samples {r['fit']:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
