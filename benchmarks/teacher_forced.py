"""What the teacher-forced benchmarks share: their options, the model with its collator, and the batches.

A teacher-forced benchmark feeds validation samples' ground-truth answers through a model folder, as the trainer's
validation does (frozen features from a run's cache when given), and measures one part of the model on them:

    parser = teacher_forced.options(__doc__, samples=200)
    parser.add_argument(...)                     # the benchmark's own options
    args = teacher_forced.parse(parser)          # also sets torch's threads
    model, collate = teacher_forced.load(args.checkpoint, args.feature_cache)
    samples = teacher_forced.samples(args)
    with torch.no_grad():
        for chunk, batch in teacher_forced.batches(samples, args.batch, collate): ...
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from prima.data.masks import decode_rle
from prima.data.schema import Sample
from prima.model import PrimaModel
from prima.model.prior import PriorReading
from prima.train.data import load_samples
from prima.train.run import TrainCollator, make_feature_cache


def options(
    doc: str | None,
    *,
    data: str = "data/synth/val/samples.jsonl",
    samples: int = 200,
    batch: int = 8,
    threads: int = 2,
    several_checkpoints: bool = False,
) -> argparse.ArgumentParser:
    """A parser described by the first line of ``doc`` with a checkpoint argument (``checkpoints``, one or more, with
    ``several_checkpoints``) and --data, --samples, --batch, --feature-cache, --threads."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0] if doc else None)
    if several_checkpoints:
        parser.add_argument("checkpoints", nargs="+", help="model folders")
    else:
        parser.add_argument("checkpoint", help="a model folder")
    parser.add_argument("--data", default=data, help=f"samples JSONL (default: {data}; never a test split)")
    parser.add_argument("--samples", type=int, default=samples, help="the first N samples")
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--feature-cache", default=None, help="the training run's data.feature_cache folder")
    parser.add_argument("--threads", type=int, default=threads, help="torch threads")
    return parser


def fit_options(parser: argparse.ArgumentParser, fit: str) -> None:
    """The options of a probe that trains a small head on ``--fit`` (default ``fit``) before scoring ``--data``:
    --fit, --steps, --every (score every N steps), --lr."""
    parser.add_argument("--fit", default=fit, help="samples to train on")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--lr", type=float, default=1e-3)


def pooled_mask(rle: dict, grid: int) -> torch.Tensor:
    """A GT mask pooled to a ``grid`` x ``grid`` of cells (grid * grid,), as a distribution over them."""
    m = torch.from_numpy(decode_rle(rle).astype(np.float32))[None, None]
    m = F.adaptive_avg_pool2d(m, grid).flatten()
    return m / m.sum().clamp_min(1e-6)


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def load(checkpoint: str, feature_cache: str | None) -> tuple[PrimaModel, TrainCollator]:
    """The model in eval mode and the trainer's collator for it (with the feature cache, when given)."""
    model = PrimaModel.from_pretrained(checkpoint).eval()
    return model, TrainCollator(model, make_feature_cache(model, feature_cache) if feature_cache else None)


def samples(args: argparse.Namespace) -> list[Sample]:
    """The first ``args.samples`` samples of ``args.data``."""
    return load_samples(args.data, limit=args.samples)


def batches(
    samples: Sequence[Sample], size: int, collate: TrainCollator, *, with_masks: bool = False
) -> Iterator[tuple[Sequence[Sample], dict[str, Any]]]:
    """(samples, collated batch), ``size`` samples at a time; with ``with_masks`` only the batches that have masks."""
    for i in range(0, len(samples), size):
        chunk = samples[i : i + size]
        batch = collate(chunk)
        if with_masks and (batch.get("masks") is None or not len(batch["masks"])):
            continue
        yield chunk, batch


def image_features(model: PrimaModel, batch: dict[str, Any]) -> list[torch.Tensor]:
    """The batch's frozen-encoder features: from the feature cache, or encoded now (and kept in ``batch``)."""
    if "image_features" not in batch:
        batch["image_features"] = model.encode_images(batch.pop("pixel_values"))
    return batch["image_features"]


def prior_reading(model: PrimaModel, batch: dict[str, Any]) -> PriorReading:
    """The image prior's reading of the batch from its questions and frozen-encoder features, as generation reads it."""
    return model.image_prior.read(
        image_features(model, batch)[model.vision.token_index],
        batch["image_sample_index"],
        batch["qformer_input_ids"],
        batch["qformer_attention_mask"],
    )


def visual_tokens(model: PrimaModel, batch: dict[str, Any]) -> torch.Tensor:
    """V_i (images, T, H): the visual tokens the LLM gets for the batch's images, question-conditioned as in training."""
    return model.visual_tokens(
        image_features(model, batch),
        batch["image_sample_index"],
        batch["qformer_input_ids"],
        batch["qformer_attention_mask"],
    )
