"""Can the object a `difference` answer names be found from the encoder's cells, by matching them across the two
images the question names? A probe for what a prior over the answer's first mask would need.

"What is in image A but not in image B?": the answer's object is one whose cells in image A find no match among
image B's cells. For every such sample (with a mask) this scores each cell of image A, and counts a hit when the
best-scoring cell lies inside the answer's GT mask (pooled to the cells). Three scores: ``chance`` (a random cell of
A: the mask's share of the cells), ``novelty`` (untrained: 1 - the cell's best cosine similarity to any cell of B),
and ``trained``: a small MLP (trained here on ``--fit``) of the cell, its best match in B and that similarity,
trained by cross-entropy towards the pooled GT mask. Prints the hit rates on the samples of ``--data`` every
``--every`` steps:

    prima data synth --out data/synth/train-odd --num 6000 --seed 30 --split train \
        --families odd-one-out,odd-part,difference --min-images 3
    prima data synth --out data/synth/val-odd --num 600 --seed 31 --split val \
        --families odd-one-out,odd-part,difference --min-images 3
    .venv/bin/python benchmarks/difference_probe.py checkpoints/prima-tiny-synth \
        --fit data/synth/train-odd/samples.jsonl --data data/synth/val-odd/samples.jsonl --feature-cache .cache/features

Never a test split for ``--data``.
"""

from __future__ import annotations

import random
import re
import time

import teacher_forced
import torch
import torch.nn.functional as F
from torch import nn

from prima.train.data import load_samples

QUESTION = re.compile(r"What is in image (\d) but not in image (\d)\?")


def rows(model, collate, path: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(cells of image A (g*g, C), cells of image B (g*g, C), the answer's mask on A pooled (g*g,)) per sample."""
    grid = model.config.vision.image_size // model.config.vision.token_stride
    out = []
    samples = [s for s in load_samples(path) if s.family == "difference" and s.segments]
    with torch.no_grad():
        for chunk, batch in teacher_forced.batches(samples, 16, collate):
            features = teacher_forced.image_features(model, batch)[model.vision.token_index].float()
            index = batch["image_sample_index"]
            for r, s in enumerate(chunk):
                a, b = (int(k) - 1 for k in QUESTION.match(s.question).groups())
                mine = features[index == r].flatten(2).transpose(1, 2)  # (n, g*g, C)
                first = s.segments[0]
                if first.image - 1 != a:
                    continue
                out.append((mine[a], mine[b], teacher_forced.pooled_mask(first.mask, grid)))
    return out


def matched(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each cell of ``a``'s best cosine similarity to a cell of ``b`` and that cell of ``b``."""
    sim = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T
    best, where = sim.max(-1)
    return best, b[where]


class CellScore(nn.Module):
    def __init__(self, channels: int, dim: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(2 * channels + 1), nn.Linear(2 * channels + 1, dim), nn.GELU(), nn.Linear(dim, 1)
        )

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        best, match = matched(a, b)
        return self.mlp(torch.cat([a, match, best[:, None]], dim=-1)).squeeze(-1)


def hits(scores: list[torch.Tensor], held: list[tuple]) -> float:
    """Share of samples whose best-scoring cell of A lies inside the answer's mask."""
    return sum(float(m[int(s.argmax())] > 0) for s, (_, _, m) in zip(scores, held)) / len(held)


def main() -> None:
    parser = teacher_forced.options(__doc__, data="data/synth/val-odd/samples.jsonl", batch=16, threads=1)
    teacher_forced.fit_options(parser, fit="data/synth/train-odd/samples.jsonl")
    args = teacher_forced.parse(parser)
    model, collate = teacher_forced.load(args.checkpoint, args.feature_cache)
    t0 = time.time()
    fit, held = rows(model, collate, args.fit), rows(model, collate, args.data)
    for path, found in ((args.fit, fit), (args.data, held)):
        if len(found) < args.batch:
            raise SystemExit(f"{path}: {len(found)} `difference` samples with a mask on image A, fewer than a batch")
    chance = sum(float((m > 0).float().mean()) for _, _, m in held) / len(held)
    novelty = hits([1 - matched(a, b)[0] for a, b, _ in held], held)
    print(f"{len(fit)} samples to fit, {len(held)} to score ({time.time() - t0:.0f} s to read them)")
    print(f"chance {chance:.3f}, novelty (untrained) {novelty:.3f}", flush=True)
    torch.manual_seed(0)
    head = CellScore(fit[0][0].shape[1])
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.01)
    rng = random.Random(0)
    print("| step | trained | s |\n|---:|---:|---:|")
    for step in range(1, args.steps + 1):
        chunk = rng.sample(fit, args.batch)
        loss = torch.stack([-(m * head(a, b).log_softmax(-1)).sum() for a, b, m in chunk]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            with torch.no_grad():
                rate = hits([head(a, b) for a, b, _ in held], held)
            print(f"| {step} | {rate:.3f} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
