"""CPU time of one stage-2 training step: only the grounding decoder trains, the [SEG] queries come cached.

What `configs/tiny-masks.yaml` runs per step (`train.freeze` everything but `grounding`,
`train.cache_seg_queries`): forward through the mask decoder (masks and, with ``grounding.image_choice``, the
image choice; with ``grounding.word_readout`` and ``grounding.phrase_check`` their readers), backward, AdamW.
Prints the median step time over the batches as trained and with each optional head switched off, one thread (as
each of the two training processes runs).

    .venv/bin/python benchmarks/decoder_step.py checkpoints/prima-tiny-synth --feature-cache .cache/features-v9
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
from model_step import step_times  # benchmarks/ is on sys.path when this script runs

from prima.model import PrimaModel
from prima.train.data import load_samples
from prima.train.run import TrainCollator, make_feature_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a model whose decoder reads phrase words (stage 2's config)")
    parser.add_argument("--data", default="data/synth/train6k/samples.jsonl")
    parser.add_argument("--feature-cache", default=None, help="the training run's data.feature_cache folder")
    parser.add_argument("--batch", type=int, default=4, help="samples per step (per process; default %(default)s)")
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # as the trainer does on a CPU
    model = PrimaModel.from_pretrained(args.checkpoint)
    for group, params in model.parameter_groups().items():
        for p in params:
            p.requires_grad_(group == "grounding")
    cache = make_feature_cache(model, args.feature_cache) if args.feature_cache else None
    collate = TrainCollator(model, cache, cache_queries=True)
    samples = load_samples(args.data, limit=args.batch * args.steps)
    batches = [collate(samples[i : i + args.batch]) for i in range(0, len(samples), args.batch)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = model.config.grounding
    variants = {"as trained": {}}  # then each optional head of the checkpoint switched off
    for head in ("image_choice", "word_readout", "phrase_check"):
        if getattr(g, head):
            variants[f"{head} off"] = {head: False}
    for name, switches in variants.items():
        saved = {k: getattr(g, k) for k in switches}
        for k, v in switches.items():
            setattr(g, k, v)
        times = step_times(model, batches, optimizer)
        print(
            f"{name}: median step {1000 * statistics.median(times[2:]):.0f} ms "
            f"({args.batch} samples, {len(times) - 2} steps after 2 warm-up), load {os.getloadavg()[0]:.1f}"
        )
        for k, v in saved.items():
            setattr(g, k, v)


if __name__ == "__main__":
    main()
