"""Teacher-forced loss parts of model folders on validation samples: the trainer's validation loss, on more samples.

Compares checkpoints of one recipe where the 32 validation samples of a run's own log are too few, e.g. a run's
averaged weights (``final/`` with ``train.ema_decay``) against its raw ones (a training checkpoint made into a
model folder). Each model in eval mode, batches of 8, frozen features from the run's cache when given.

    .venv/bin/python benchmarks/val_loss.py runs/a/final runs/b/final --samples 200 --feature-cache .cache/features
"""

from __future__ import annotations

import argparse

import torch

from prima.model import PrimaModel
from prima.train.data import load_samples
from prima.train.run import TrainCollator, make_feature_cache
from prima.train.trainer import loss_parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", default="data/synth/val/samples.jsonl")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--feature-cache", default=None, help="the training run's data.feature_cache folder")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samples = load_samples(args.data, limit=args.samples)
    for checkpoint in args.checkpoints:
        model = PrimaModel.from_pretrained(checkpoint).eval()
        collate = TrainCollator(model, make_feature_cache(model, args.feature_cache) if args.feature_cache else None)
        sums: dict[str, float] = {}
        with torch.no_grad():
            for i in range(0, len(samples), args.batch):
                chunk = samples[i : i + args.batch]
                for name, value in loss_parts(model(collate(chunk))).items():
                    sums[name] = sums.get(name, 0.0) + float(value) * len(chunk)
        parts = ", ".join(f"{name} {total / len(samples):.4f}" for name, total in sorted(sums.items()))
        print(f"{checkpoint}: {len(samples)} samples of {args.data}: {parts}", flush=True)


if __name__ == "__main__":
    main()
