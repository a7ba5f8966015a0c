"""Do the visual tokens say which image is the odd one? A parameter-free read-out for the families whose answer is
the one image that differs from the others (`odd-one-out`: the object's colour; `odd-part`: one part's colour;
`spatial-compare`: the pair's left-right order).

Each image of a sample is one vector, its tokens RMS-normalised and averaged; the image farthest from the mean of
the sample's other images is taken as the odd one, and a sample counts as right when that is its answer image
(the first segment's; chance: the mean of 1 / images). Done for the visual tokens V_i the LLM gets
(question-conditioned, as in training) and for the encoder's grid cells. Nothing is fitted, so it reads what the
tokens already hold, not what a probe could learn:

    prima data synth --out data/synth/val-odd --num 300 --seed 12 --split val --families odd-one-out,odd-part \
        --min-images 3
    .venv/bin/python benchmarks/odd_image.py checkpoints/prima-tiny-synth --data data/synth/val-odd/samples.jsonl \
        --feature-cache .cache/features

With ``--fit`` (samples with `odd-one-out` ones, never a test split) it also fits a linear probe from each image's
averaged V_i to the colour of the object the question asks about in that image (the odd colour in the answer image,
the others' colour elsewhere; both are read from M4Seg-Synth's `odd-one-out` answers), and scores it on ``--data``: does V_i say, bound to the
object, which colour it has? And the odd image as the one whose probed colour agrees least with the others':

    prima data synth --out data/synth/train-odd3k --num 3000 --seed 14 --split train --families odd-one-out,odd-part \
        --min-images 3
    .venv/bin/python benchmarks/odd_image.py checkpoints/prima-tiny-synth --data data/synth/val-odd/samples.jsonl \
        --feature-cache .cache/features --fit data/synth/train-odd3k/samples.jsonl
"""

from __future__ import annotations

import re

import teacher_forced
import torch
import torch.nn.functional as F

from prima.data.schema import Sample
from prima.model import PrimaModel
from prima.model.square import difference_from_others
from prima.train.data import load_samples
from prima.train.run import TrainCollator

FAMILIES = ("odd-one-out", "odd-part", "spatial-compare")
ODD_COLOUR = re.compile(r"^The <p> (\w+) ")  # prima.data.synth_questions.odd_one_out's answer
USUAL_COLOUR = re.compile(r"while the other \w+ are (\w+)\.$")


def image_vectors(
    model: PrimaModel, collate: TrainCollator, samples: list[Sample], batch: int
) -> list[tuple[Sample, dict[str, torch.Tensor]]]:
    """Per sample, each of its images as one vector (images, width): its tokens RMS-normalised and averaged, for the
    visual tokens V_i (question-conditioned, as in training) and for the encoder's grid cells."""
    rows = []
    with torch.no_grad():
        for chunk, collated in teacher_forced.batches(samples, batch, collate):
            grid = teacher_forced.image_features(model, collated)[model.vision.token_index]
            kinds = {
                "V_i": teacher_forced.visual_tokens(model, collated).float(),
                "encoder cells": grid.float().flatten(2).transpose(1, 2),
            }
            means = {kind: F.rms_norm(tokens, tokens.shape[-1:]).mean(1) for kind, tokens in kinds.items()}
            start = 0
            for s in chunk:
                n = len(s.images)
                rows.append((s, {kind: mean[start : start + n] for kind, mean in means.items()}))
                start += n
    return rows


def farthest(vectors: torch.Tensor) -> int:
    """The row farthest from the mean of the other rows."""
    one_sample = torch.zeros(vectors.shape[0], dtype=torch.long)
    return int(difference_from_others(vectors.unsqueeze(1), one_sample).norm(dim=-1).argmax())


def colour_rows(rows: list[tuple[Sample, dict[str, torch.Tensor]]]) -> tuple:
    """Each `odd-one-out` image's V_i vector, the asked-about object's colour there, and (images, answer image) per
    sample."""
    vectors, colours, groups = [], [], []
    for s, kinds in rows:
        if s.family != "odd-one-out":
            continue
        n, odd = len(s.images), s.segments[0].image - 1
        odd_colour, usual = ODD_COLOUR.search(s.answer).group(1), USUAL_COLOUR.search(s.answer).group(1)
        vectors.append(kinds["V_i"])
        colours += [odd_colour if k == odd else usual for k in range(n)]
        groups.append((n, odd))
    return (torch.cat(vectors) if vectors else torch.empty(0)), colours, groups


def colour_probe(fit: tuple, test: tuple, steps: int = 400) -> None:
    """Fit a linear colour probe on ``fit``'s rows, print its accuracy on ``test`` and the odd image it implies."""
    names = sorted(set(fit[1]) | set(test[1]))
    x, y = fit[0], torch.tensor([names.index(c) for c in fit[1]])
    xt, yt = test[0], torch.tensor([names.index(c) for c in test[1]])
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, xt = (x - mean) / std, (xt - mean) / std
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], len(names))
    opt = torch.optim.Adam(probe.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(probe(x), y).backward()
        opt.step()
    with torch.no_grad():
        right = float((probe(xt).argmax(-1) == yt).float().mean())
        probs = probe(xt).softmax(-1)
    majority = max(test[1].count(c) for c in names) / len(test[1])
    print(
        f"odd-one-out, the asked-about object's colour from V_i: {right:.3f} of {len(yt)} images ({len(names)} "
        f"colours, the commonest {majority:.3f})"
    )
    found, start = 0, 0
    for n, odd in test[2]:
        p = probs[start : start + n]
        start += n
        agreement = torch.stack([(p[k] * (p.sum(0) - p[k])).sum() for k in range(n)])  # with the other images
        found += int(agreement.argmin() == odd)
    print(
        f"odd-one-out, the odd image as the probed colour that agrees least: {found / len(test[2]):.3f} of "
        f"{len(test[2])} samples"
    )


def main() -> None:
    parser = teacher_forced.options(__doc__, data="data/synth/val-odd/samples.jsonl", samples=100000, batch=16)
    parser.add_argument("--fit", default=None, help="samples with odd-one-out ones to fit the colour probe on")
    args = teacher_forced.parse(parser)
    model, collate = teacher_forced.load(args.checkpoint, args.feature_cache)
    samples = [s for s in teacher_forced.samples(args) if s.family in FAMILIES and len(s.images) > 1]
    if not samples:
        raise SystemExit(f"odd_image: {args.data} has no samples of {', '.join(FAMILIES)} (see the docstring)")
    rows = image_vectors(model, collate, samples, args.batch)
    found: dict[tuple[str, str], list[float]] = {}  # (family, tokens) -> [right, samples, chance]
    for s, kinds in rows:
        for kind, vectors in kinds.items():
            row = found.setdefault((s.family, kind), [0.0, 0.0, 0.0])
            row[0] += float(farthest(vectors) == s.segments[0].image - 1)
            row[1] += 1
            row[2] += 1 / len(s.images)
    print(f"{'family':16} {'tokens':>13}  odd image found  (chance)  samples")
    for (family, kind), (right, n, chance) in sorted(found.items()):
        print(f"{family:16} {kind:>13}  {right / n:15.3f}  ({chance / n:.3f})  {int(n):7d}")
    if args.fit:
        fit_samples = [s for s in load_samples(args.fit) if s.family == "odd-one-out"]
        test, fit = colour_rows(rows), colour_rows(image_vectors(model, collate, fit_samples, args.batch))
        if not test[1] or not fit[1]:
            raise SystemExit("odd_image: --fit and --data both need odd-one-out samples for the colour probe")
        colour_probe(fit, test)


if __name__ == "__main__":
    main()
