"""CPU time of one tiny-PRIMA training step (forward + backward + AdamW) on cached features, per thread count.

Uses the first samples of a synthetic training set (``prima data synth``) and the `tiny` preset with a
word-level tokenizer trained on them; frozen EfficientNet features are computed once beforehand, as the
trainer's feature cache does. Prints the median step time for each ``--threads`` value, and the machine's
load average (on a shared machine intra-op threads wait on each other: compare thread counts in one run).

    .venv/bin/python benchmarks/model_step.py --data data/synth/train/samples.jsonl --threads 1 2

``--checkpoint DIR`` times a trained model instead of a fresh one (trained weights can hold denormal floats,
which a CPU multiplies many times slower); ``--flush-denormal`` sets `torch.set_flush_denormal(True)` first,
as the trainer does on a CPU; ``--config FILE`` builds the fresh model from a run config's model section (e.g.
configs/tiny.yaml, stage 1) instead of the `tiny` preset. ``--profile`` then runs the same steps once more under
`torch.profiler` and prints the operators that took the most time, by name and by input shapes (where a step goes).
The first line says how many of the LLM's positions are padding (each batch is padded to its longest sample).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from prima.data.collate import collate_samples
from prima.data.schema import read_samples
from prima.model import PrimaModel, create_model, load_model_config
from prima.train.config import load_run_config


def step_times(model: torch.nn.Module, batches: list[dict], optimizer: torch.optim.Optimizer) -> list[float]:
    """Seconds of each training step (forward, backward, optimizer step) of ``model`` over ``batches``, in training
    mode (also used by benchmarks/decoder_step.py)."""
    model.train()
    times = []
    for batch in batches:
        start = time.perf_counter()
        model(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/synth/train/samples.jsonl")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--checkpoint", default=None, help="time this trained model (default: a fresh tiny one)")
    parser.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True) first")
    parser.add_argument("--config", default=None, help="a run config whose model section builds the fresh model")
    parser.add_argument("--profile", action="store_true", help="then profile the same steps: the top operators")
    args = parser.parse_args()
    if args.flush_denormal:
        torch.set_flush_denormal(True)

    samples = read_samples(args.data, validate=False)[: args.batch * args.steps]
    torch.manual_seed(0)
    if args.checkpoint:
        model = PrimaModel.from_pretrained(args.checkpoint)
    else:
        cfg = load_run_config(args.config).model if args.config else load_model_config("tiny")
        model = create_model(cfg, [t for s in samples for t in (s.question, s.answer)])
    root = Path(args.data).parent
    batches = []
    for i in range(0, len(samples), args.batch):
        batch = collate_samples(samples[i : i + args.batch], root, model.processor, model.config)
        with torch.no_grad():
            batch["image_features"] = model.encode_images(batch.pop("pixel_values"))
        batches.append(batch)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    positions = sum(b["attention_mask"].numel() for b in batches)
    print(
        f"{args.checkpoint or args.config or 'fresh tiny'}, flush_denormal {args.flush_denormal}, batch {args.batch}, "
        f"{tokens / len(batches):.0f} LLM tokens per batch on average in {positions / len(batches):.0f} positions "
        f"({100 * (1 - tokens / positions):.1f} % padding), load {os.getloadavg()[0]:.1f}"
    )
    for threads in args.threads:
        torch.set_num_threads(threads)
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
        times = step_times(model, batches, optimizer)
        print(
            f"threads {threads}: median step {statistics.median(times):.2f} s "
            f"(all: {', '.join(f'{t:.2f}' for t in times)}), load {os.getloadavg()[0]:.1f}"
        )

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            step_times(model, batches, optimizer)
        for by_shape in (False, True):
            table = prof.key_averages(group_by_input_shape=by_shape).table(
                sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40, max_shapes_column_width=60
            )
            print(f"{len(batches)} steps under torch.profiler, by operator{' and input shapes' * by_shape}:\n{table}")


if __name__ == "__main__":
    main()
