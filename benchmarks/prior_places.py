"""Can the image prior learn `spatial-compare` from the encoder's cells? A fresh `ImagePrior` trained on those samples alone.

The prior in a full stage 2 reads every family at once; this trains a fresh one (the checkpoint's sizes, seed 0) on
the `spatial-compare` samples of ``--fit`` only, from cached features, with or without `WordPlaces`
(``--places``: the relation term, its places taught by the answer's masks as `model.loss.image_prior_places` does:
each of the two named categories' attention over the answer image's cells against that object's GT mask; with
``--places-weight 0`` the relation term without that loss), and
prints every ``--every`` steps how often the answer image scores highest on the samples of ``--data`` and how much
of the named words' attention falls inside their masks there:

    prima data synth --out data/synth/val-first --num 600 --seed 21 --split val --families spatial-compare,odd-part,most
    .venv/bin/python benchmarks/prior_places.py checkpoints/prima-tiny-synth --fit data/synth/train/samples.jsonl \
        --data data/synth/val-first/samples.jsonl --feature-cache .cache/features --places

Never a test split for ``--data``.
"""

from __future__ import annotations

import random
import re
import time

import numpy as np
import teacher_forced
import torch
import torch.nn.functional as F

from prima.model.prior import ImagePrior
from prima.train.data import load_samples

QUESTION = re.compile(r"In which image is the (\w+) to the (left|right) of the (\w+)\?")


def rows(model, collate, path: str, grid: int) -> list[tuple]:
    """(features of the images, question ids, question mask, answer image, the two names' positions, their masks)."""
    out = []
    samples = [s for s in load_samples(path) if s.family == "spatial-compare" and s.segments]
    word = model.processor.encode_qformer_text
    with torch.no_grad():
        for chunk, batch in teacher_forced.batches(samples, 16, collate):
            features = teacher_forced.image_features(model, batch)[model.vision.token_index].float()
            index = batch["image_sample_index"]
            for r, s in enumerate(chunk):
                first, _, second = QUESTION.match(s.question).groups()
                ids = batch["qformer_input_ids"][r]
                named = [int((ids == word(w)[0]).nonzero()[0]) for w in (first, second)]
                masks = torch.stack([teacher_forced.pooled_mask(g.mask, grid) for g in s.segments[:2]])
                out.append(
                    (
                        features[index == r],
                        ids,
                        batch["qformer_attention_mask"][r],
                        s.segments[0].image - 1,
                        named,
                        masks,
                    )
                )
    return out


def collate_rows(chunk: list[tuple]) -> tuple:
    features = torch.cat([r[0] for r in chunk])
    index = torch.cat([torch.full((len(r[0]),), i) for i, r in enumerate(chunk)])
    length = max(len(r[1]) for r in chunk)
    ids = torch.stack([F.pad(r[1], (0, length - len(r[1]))) for r in chunk])
    mask = torch.stack([F.pad(r[2], (0, length - len(r[2]))) for r in chunk])
    return features, index, ids, mask, torch.tensor([r[3] for r in chunk])


def places_loss(places: torch.Tensor, chunk: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """The names' cross-entropy against their masks on the answer image, and their attention inside the masks."""
    start = np.cumsum([0] + [len(r[0]) for r in chunk])
    found = torch.stack([places[start[j] + r[3], r[4][w]] for j, r in enumerate(chunk) for w in range(2)])
    where = torch.stack([r[5][w] for r in chunk for w in range(2)])
    return -(where * found.clamp_min(1e-8).log()).sum(-1).mean(), (found * (where > 0)).sum(-1).mean()


def main() -> None:
    parser = teacher_forced.options(__doc__, data="data/synth/val-first/samples.jsonl", batch=16, threads=1)
    teacher_forced.fit_options(parser, fit="data/synth/train/samples.jsonl")
    parser.add_argument("--places", action="store_true", help="with WordPlaces and its places' loss")
    parser.add_argument(
        "--places-weight", type=float, default=1.0, help="the places' loss weight (0: WordPlaces alone)"
    )
    args = teacher_forced.parse(parser)
    model, collate = teacher_forced.load(args.checkpoint, args.feature_cache)
    ref = model.image_prior
    if ref is None:
        raise SystemExit(f"{args.checkpoint} has no image prior to take the sizes from")
    grid = model.config.vision.image_size // model.config.vision.token_stride
    fit, held = rows(model, collate, args.fit, grid), rows(model, collate, args.data, grid)
    for path, found in ((args.fit, fit), (args.data, held)):
        if not found:
            raise SystemExit(f"{path}: no `spatial-compare` sample with masks to fit or score")
    if len(fit) < args.batch:
        raise SystemExit(f"{args.fit}: {len(fit)} `spatial-compare` samples, fewer than --batch {args.batch}")
    print(f"{len(fit)} spatial-compare samples to fit, {len(held)} to score", flush=True)
    torch.manual_seed(0)
    prior = ImagePrior(
        ref.token_proj.in_channels,
        grid,
        ref.words.num_embeddings,
        ref.max_words,
        ref.slots.shape[0],
        num_layers=len(ref.layers),
        relations=args.places,
    )
    optimizer = torch.optim.AdamW(prior.parameters(), lr=args.lr, weight_decay=0.01)
    rng, t0 = random.Random(0), time.time()
    print("| step | answer image (scored) | names' attention inside their masks (scored) | s |")
    print("|---:|---:|---:|---:|")
    for step in range(1, args.steps + 1):
        chunk = rng.sample(fit, args.batch)
        features, index, ids, mask, target = collate_rows(chunk)
        reading = prior.read(features, index, ids, mask)
        logits, places = reading.logits, reading.places
        loss = F.cross_entropy(logits, target)
        if places is not None and args.places_weight:
            loss = loss + args.places_weight * places_loss(places, chunk)[0]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), 1.0)
        optimizer.step()
        if step % args.every == 0:
            prior.eval()
            right, inside = 0, []
            with torch.no_grad():
                for i in range(0, len(held), 64):
                    chunk = held[i : i + 64]
                    features, index, ids, mask, target = collate_rows(chunk)
                    reading = prior.read(features, index, ids, mask)
                    logits, places = reading.logits, reading.places
                    right += int((logits.argmax(1) == target).sum())
                    if places is not None:
                        inside.append(float(places_loss(places, chunk)[1]) * len(chunk))
            prior.train()
            share = f"{sum(inside) / len(held):.3f}" if inside else "–"
            print(f"| {step} | {right / len(held):.3f} | {share} | {time.time() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
