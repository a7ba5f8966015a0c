"""Teacher-forced loss parts of model folders on validation samples: the trainer's validation loss, on more samples.

Compares checkpoints of one recipe where the 32 validation samples of a run's own log are too few, e.g. a run's
averaged weights (``final/`` with ``train.ema_decay``) against its raw ones (a training checkpoint made into a
model folder). Each model in eval mode, batches of 8, frozen features from the run's cache when given.

    .venv/bin/python benchmarks/val_loss.py runs/a/final runs/b/final --samples 200 --feature-cache .cache/features
"""

from __future__ import annotations

import teacher_forced
import torch

from prima.train.trainer import loss_parts


def main() -> None:
    args = teacher_forced.parse(teacher_forced.options(__doc__, threads=1, several_checkpoints=True))
    samples = teacher_forced.samples(args)
    for checkpoint in args.checkpoints:
        model, collate = teacher_forced.load(checkpoint, args.feature_cache)
        sums: dict[str, float] = {}
        with torch.no_grad():
            for chunk, batch in teacher_forced.batches(samples, args.batch, collate):
                for name, value in loss_parts(model(batch)).items():
                    sums[name] = sums.get(name, 0.0) + float(value) * len(chunk)
        parts = ", ".join(f"{name} {total / len(samples):.4f}" for name, total in sorted(sums.items()))
        print(f"{checkpoint}: {len(samples)} samples of {args.data}: {parts}", flush=True)


if __name__ == "__main__":
    main()
