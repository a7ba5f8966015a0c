"""CPU time of one AdamW step over a model's trainable weights, for each of torch's AdamW implementations.

Builds the model of a run config (default: configs/tiny.yaml, stage 1: every weight but the frozen encoder trains),
gives every trainable weight a random gradient and times ``--steps`` optimizer steps per implementation: torch's
default choice, the multi-tensor ``foreach`` kernels, the per-tensor loop and the ``fused`` kernel that the trainer
uses (`train.fused_optimizer`). Prints the median step time of each.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/optimizer_step.py --config configs/tiny.yaml
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from prima.data.schema import read_samples
from prima.model import create_model
from prima.train.config import load_run_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--data", default="data/synth/train/samples.jsonl", help="texts for the word-level tokenizer")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # as the trainer does on a CPU
    samples = read_samples(args.data, validate=False)[:64]
    torch.manual_seed(0)
    model = create_model(load_run_config(args.config).model, [t for s in samples for t in (s.question, s.answer)])
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    print(
        f"{args.config}: {len(params)} trainable tensors, {sum(p.numel() for p in params):,} weights, "
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.1f}"
    )
    for name, kwargs in (("default", {}), ("foreach", {"foreach": True}), ("loop", {"foreach": False}),
                         ("fused", {"fused": True})):  # fmt: skip
        optimizer = torch.optim.AdamW(params, lr=1e-4, **kwargs)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            optimizer.step()
            times.append(time.perf_counter() - start)
        print(f"{name:>8}: median {1000 * statistics.median(times):.1f} ms per step")


if __name__ == "__main__":
    main()
