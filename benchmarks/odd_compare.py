"""Can the image an odd-one-out or odd-part answer names be found by comparing what each image shows where the
question's object is? A probe over a trained image prior's word places, from cached features.

For every `odd-one-out` / `odd-part` sample the question names one object ("Each image shows a mug.", "Each image
shows the same lamp, ..."). The checkpoint's `WordPlaces` (frozen) says where that word is in each image (its
attention over the cells); the encoder's features there, averaged by that attention, describe the object in each
image. A small head (trained here, on ``--fit``) embeds each description and scores each image by a learned squared
distance to the mean of the sample's other images; the answer image should score highest. ``--where mean`` averages
over all cells instead (no places), the baseline. Prints, every ``--every`` steps, how often the answer image scores
highest on the samples of ``--data``, per family, and the chance level:

    prima data synth --out data/synth/train-odd --num 6000 --seed 30 --split train \
        --families odd-one-out,odd-part,difference --min-images 3
    prima data synth --out data/synth/val-odd --num 600 --seed 31 --split val \
        --families odd-one-out,odd-part,difference --min-images 3
    .venv/bin/python benchmarks/odd_compare.py checkpoints/prima-tiny-synth --fit data/synth/train-odd/samples.jsonl \
        --data data/synth/val-odd/samples.jsonl --feature-cache .cache/features

Never a test split for ``--data``.
"""

from __future__ import annotations

import collections
import random
import re
import time

import teacher_forced
import torch
import torch.nn.functional as F
from torch import nn

from prima.train.data import load_samples

NAMED = re.compile(r"Each image shows (?:a|an|the same) (\w+)")
FAMILIES = ("odd-one-out", "odd-part")


def rows(model, collate, path: str, where: str) -> list[tuple]:
    """(family, each image's description (n, C), the answer image) of the odd samples of ``path``."""
    prior = model.image_prior
    if prior is None or prior.relations is None:
        raise SystemExit("the checkpoint has no image prior with word places (model.image_prior_places)")
    out = []
    samples = [s for s in load_samples(path) if s.family in FAMILIES and s.segments]
    word = model.processor.encode_qformer_text
    with torch.no_grad():
        for chunk, batch in teacher_forced.batches(samples, 16, collate):
            features = teacher_forced.image_features(model, batch)[model.vision.token_index].float()
            index = batch["image_sample_index"]
            cells = features.flatten(2).transpose(1, 2)  # (N, g*g, C)
            content = prior.token_norm(prior.token_proj(features).flatten(2).transpose(1, 2))
            for r, s in enumerate(chunk):
                name = NAMED.match(s.question).group(1)
                names = prior.words(torch.tensor(word(name)[:1]))  # (1, D)
                mine = index == r
                if where == "places":
                    keys = prior.relations.key(content[mine])  # (n, g*g, D)
                    query = prior.relations.query(names)  # (1, D)
                    attention = torch.softmax(keys @ query[0] * keys.shape[-1] ** -0.5, dim=-1)  # (n, g*g)
                else:
                    attention = torch.full(cells[mine].shape[:2], 1.0 / cells.shape[1])
                described = (attention[:, :, None] * cells[mine]).sum(1)  # (n, C)
                out.append((s.family, described, s.segments[0].image - 1))
    return out


class Compare(nn.Module):
    """A score per image: a learned squared distance between its embedded description and the others' mean."""

    def __init__(self, channels: int, dim: int = 64):
        super().__init__()
        self.embed = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, dim), nn.GELU(), nn.Linear(dim, dim))
        self.weight = nn.Linear(dim, 1)

    def forward(self, described: torch.Tensor) -> torch.Tensor:
        e = self.embed(described)  # (n, dim)
        n = e.shape[0]
        others = (e.sum(0, keepdim=True) - e) / (n - 1)
        return self.weight((e - others) ** 2).squeeze(-1)


def main() -> None:
    parser = teacher_forced.options(__doc__, data="data/synth/val-odd/samples.jsonl", batch=16, threads=1)
    teacher_forced.fit_options(parser, fit="data/synth/train-odd/samples.jsonl")
    parser.add_argument("--where", choices=["places", "mean"], default="places")
    args = teacher_forced.parse(parser)
    model, collate = teacher_forced.load(args.checkpoint, args.feature_cache)
    t0 = time.time()
    fit, held = rows(model, collate, args.fit, args.where), rows(model, collate, args.data, args.where)
    for path, found in ((args.fit, fit), (args.data, held)):
        if len(found) < args.batch:
            raise SystemExit(f"{path}: {len(found)} odd-one-out / odd-part samples with masks, fewer than a batch")
    chance = collections.defaultdict(list)
    for family, described, _ in held:
        chance[family].append(1 / len(described))
    print(f"{len(fit)} samples to fit, {len(held)} to score ({time.time() - t0:.0f} s to describe them)", flush=True)
    print("chance: " + ", ".join(f"{f} {sum(c) / len(c):.3f} ({len(c)})" for f, c in sorted(chance.items())))
    torch.manual_seed(0)
    head = Compare(fit[0][1].shape[1])
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=0.01)
    rng = random.Random(0)
    print("| step | " + " | ".join(sorted(chance)) + " | s |")
    for step in range(1, args.steps + 1):
        chunk = rng.sample(fit, args.batch)
        loss = torch.stack([F.cross_entropy(head(d)[None], torch.tensor([a])) for _, d, a in chunk]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.every == 0:
            right = collections.defaultdict(list)
            with torch.no_grad():
                for family, d, a in held:
                    right[family].append(int(head(d).argmax()) == a)
            cols = " | ".join(f"{sum(right[f]) / len(right[f]):.3f}" for f in sorted(chance))
            print(f"| {step} | {cols} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
