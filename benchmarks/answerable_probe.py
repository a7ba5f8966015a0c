"""Can the image prior's reading of question and images tell a sample whose answer grounds nothing?

A probe for a gate of the rewrites that turn an answer without phrases into one with them, or back (docs/MODEL.md,
"Session 33"): the prior (`ImagePrior.read`, as generation reads it, on the question and images alone) is run over
the --fit samples, and an MLP is trained on each sample's reading (the mean and the maximum over its images of the
prior's compared image summaries, and six statistics: the answer cells' "nowhere" log-probability, mean / least /
greatest over the images, their likeliest cell's probability, mean / greatest, and the image choice's greatest
probability) to say whether its answer has no [SEG]. Printed: the AUC (the chance a sample without [SEG] scores above
one with) on --data over all samples and within each question family that has both kinds:

    .venv/bin/python benchmarks/answerable_probe.py checkpoints/prima-tiny-synth --data data/synth/val3/samples.jsonl \
        --samples 600 --feature-cache .cache/features \
        --fit data/synth/train/samples.jsonl data/synth/train-odd/samples.jsonl
"""

from __future__ import annotations

import teacher_forced
import torch
import torch.nn.functional as F
from nothing_there import auc

from prima.train.data import load_samples


def readings(model, collate, samples, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
    """(features (S, 2 D + 6), whether each answer has no [SEG] (S,), each sample's family)."""
    summaries = {}
    hook = model.image_prior.compare.register_forward_hook(lambda _m, _i, out: summaries.update(out=out))
    rows, empty, families = [], [], []
    with torch.no_grad():
        for chunk, batch in teacher_forced.batches(samples, size, collate):
            reading = teacher_forced.prior_reading(model, batch)
            compared, index = summaries["out"], batch["image_sample_index"]
            counts = torch.bincount(index, minlength=len(chunk))
            present = torch.arange(compared.shape[1])[None] < counts[:, None]
            mean = (compared * present[..., None]).sum(1) / counts[:, None]
            top = compared.masked_fill(~present[..., None], float("-inf")).amax(1)
            nowhere, likeliest = reading.cells[:, -1], reading.cells[:, :-1].softmax(-1).amax(-1)
            choice = reading.logits.softmax(-1).amax(-1)
            stats = []
            for b in range(len(chunk)):
                own, sure = nowhere[index == b], likeliest[index == b]
                stats.append(torch.stack([own.mean(), own.amin(), own.amax(), sure.mean(), sure.amax(), choice[b]]))
            rows.append(torch.cat([mean, top, torch.stack(stats)], dim=1))
            empty += [float(not s.segments) for s in chunk]
            families += [s.family for s in chunk]
    hook.remove()  # a second call adds its own
    return torch.cat(rows), torch.tensor(empty), families


def main() -> None:
    parser = teacher_forced.options(__doc__, data="data/synth/val3/samples.jsonl", samples=600, batch=32)
    parser.add_argument("--fit", nargs="+", default=["data/synth/train/samples.jsonl"], help="samples to train on")
    parser.add_argument("--epochs", type=int, default=300)
    args = teacher_forced.parse(parser)
    model, collate = teacher_forced.load(args.checkpoint, args.feature_cache)
    if getattr(model.image_prior, "cells", None) is None:
        raise SystemExit(f"{args.checkpoint} has no image prior with answer cells (model.image_prior_cells)")
    fit = [s for path in args.fit for s in load_samples(path)]
    x, y, _ = readings(model, collate, fit, args.batch)
    held, held_y, families = readings(model, collate, teacher_forced.samples(args), args.batch)
    print(f"fit: {len(y)} samples, {int(y.sum())} without [SEG]; {args.data}: {len(held_y)}, {int(held_y.sum())}")
    mu, sd = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.GELU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(head.parameters(), 3e-3, weight_decay=1e-2)
    z = (x - mu) / sd
    for _ in range(args.epochs):
        order = torch.randperm(len(z))
        for j in range(0, len(z), 512):
            rows = order[j : j + 512]
            loss = F.binary_cross_entropy_with_logits(head(z[rows]).squeeze(-1), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        scores = head((held - mu) / sd).squeeze(-1).tolist()

    def separation(keep: list[bool]) -> str:
        high = [s for s, e, k in zip(scores, held_y.tolist(), keep) if k and e]
        low = [s for s, e, k in zip(scores, held_y.tolist(), keep) if k and not e]
        return f"{len(high):4d} without [SEG], {len(low):4d} with: AUC {auc(high, low):.3f}"

    print(f"{'all':20s} {separation([True] * len(scores))}")
    for family in sorted({f for f in families if f is not None}):
        keep = [f == family for f in families]
        if 0 < sum(e for e, k in zip(held_y.tolist(), keep) if k) < sum(keep):
            print(f"{family:20s} {separation(keep)}")


if __name__ == "__main__":
    main()
