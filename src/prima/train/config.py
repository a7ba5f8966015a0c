"""The run configuration: `RunConfig(model, data, train)`, loaded from YAML through `prima.config.load_config`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prima.config import ConfigError, load_config

try:  # the model area owns its own section; until it exists the section is kept as a plain mapping
    from prima.model.config import ModelConfig
except ModuleNotFoundError as e:  # pragma: no cover - only while the model package is being written
    if not (e.name or "").startswith("prima.model"):
        raise
    ModelConfig = dict[str, Any]  # type: ignore[misc,assignment]


@dataclass
class DataSource:
    """One sample JSONL and its share of each epoch (weights are normalised over all sources)."""

    path: str
    weight: float = 1.0

    def validate(self) -> None:
        if self.weight <= 0:
            raise ConfigError(f"data.train: source {self.path!r} has weight {self.weight}; weights must be > 0")


@dataclass
class DataConfig:
    train: list[DataSource] = field(default_factory=list)
    val: str | None = None  # a sample JSONL used for periodic validation
    val_max_samples: int | None = 200  # the first N validation samples (None: all)
    epoch_size: int | None = None  # samples per epoch; None: the sum of the sources' sizes
    feature_cache: str | None = None  # folder for cached frozen-encoder features (None: no cache)
    prefill_cache: bool = False  # encode every image before step 1 (else: on first use, paid once either way)
    # > 1: batches of similar length (the LLM's prompt + answer tokens): each run of this many global batches of
    # the epoch order is sorted by length, cut into batches and those are shuffled, so padding wastes less compute
    # (docs/TRAINING.md, "Batches of similar length"); 0 or 1: off
    group_by_length: int = 0

    def validate(self) -> None:
        if self.epoch_size is not None and self.epoch_size <= 0:
            raise ConfigError(f"data.epoch_size must be > 0, got {self.epoch_size}")
        if self.group_by_length < 0:
            raise ConfigError(f"data.group_by_length must be >= 0, got {self.group_by_length}")


# the groups of `PrimaModel.parameter_groups`, in its order (a test keeps the two in step)
FREEZABLE = ("language", "query_module", "square", "projector", "grounding", "image_prior")


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # global: samples per optimizer step, summed over all processes
    micro_batch_size: int | None = None  # per process and forward pass; None: batch_size / processes
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # final lr of the cosine/linear schedule, as a fraction of lr
    grad_clip: float | None = 1.0  # max global gradient norm (None: no clipping)
    # torch's fused AdamW kernel (CPU and CUDA; its step 3-4x quicker than the per-tensor loop on this 2-core CPU,
    # docs/PERFORMANCE.md "Session 37"); false: the per-tensor loop, which every run before session 37 used
    fused_optimizer: bool = True
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    deepspeed: str | None = None  # a DeepSpeed JSON (configs/deepspeed/...) for ZeRO-2/3 on GPUs
    find_unused_parameters: bool = True  # DDP: batches without masks leave the mask decoder unused
    log_every: int = 10
    val_every: int = 200  # steps between validations (0: never)
    val_generate: int = 0  # also generate answers + masks for this many validation samples and score them
    save_every: int = 200  # steps between checkpoints (0: only at the end)
    keep_last: int = 2  # completed checkpoints kept besides the best one
    best_metric: str = "val_loss"
    best_mode: Literal["min", "max"] = "min"
    progress_bar: bool = True
    # start from a trained model folder (`final/`, a bundled checkpoint) instead of random weights: its tokenizer
    # and every weight it has; parts it lacks (e.g. a decoder option switched on) start fresh (docs/TRAINING.md)
    init_from: str | None = None
    # parameter groups kept fixed (`PrimaModel.parameter_groups`: language, query_module, square, projector,
    # grounding, image_prior); e.g. everything but `grounding` to train a mask decoder under a trained LLM
    freeze: list[str] = field(default_factory=list)
    # groups NOT taken from init_from: they start fresh; an entry may also be a module path that starts with its
    # group's name ("image_prior.cells", "grounding.checker": the parameters whose names start with it)
    reinit: list[str] = field(default_factory=list)
    # instead of freeze: the only parameters that train, each a group or a module path inside one; all else is frozen
    # (e.g. [image_prior.cells] trains a prior's answer cells over the prior as it is)
    train_only: list[str] = field(default_factory=list)
    # with everything but `grounding` frozen, the decoder's [SEG] queries depend on the sample alone: compute every
    # training and validation sample's once (in eval mode, at the first batch) and reuse them, so the LLM does not
    # run in the steps; its text and visual-words losses are then not computed (their weights are frozen anyway)
    cache_seg_queries: bool = False
    # > 0: keep an exponential moving average of the trainable weights, this decay per step (warmed up as
    # min(decay, (1 + step) / (10 + step))); validation, best/ and final/ use the average, the optimizer the raw
    # weights; checkpoints hold both (docs/TRAINING.md, "Averaged weights"). 0: off
    ema_decay: float = 0.0

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size <= 0:
            raise ConfigError(f"train.micro_batch_size must be > 0, got {self.micro_batch_size}")
        if self.keep_last < 1:
            raise ConfigError(f"train.keep_last must be >= 1, got {self.keep_last}")
        if len(self.betas) != 2:
            raise ConfigError(f"train.betas must be two numbers, got {self.betas}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        for key in ("freeze", "reinit", "train_only"):
            paths = key != "freeze"  # these may name a module inside a group too
            unknown = sorted(e for e in getattr(self, key) if (e.split(".")[0] if paths else e) not in FREEZABLE)
            if unknown:
                what = "group(s) or module path(s) in one" if paths else "group(s)"
                raise ConfigError(f"train.{key}: unknown {what} {unknown}; known groups: {list(FREEZABLE)}")
        if self.reinit and not self.init_from:
            raise ConfigError("train.reinit names groups not to take from train.init_from, which is not set")
        if self.freeze and self.train_only:
            raise ConfigError("train.freeze and train.train_only are two ways to say the same: set one of them")
        upstream = [g for g in FREEZABLE if g not in ("grounding", "image_prior")]  # what the LLM's pass reads
        if self.cache_seg_queries and not set(upstream) <= set(self.frozen_groups()):
            raise ConfigError(
                f"train.cache_seg_queries needs {upstream} frozen: cached [SEG] queries must not change while "
                f"training (train.freeze is {self.freeze}, train.train_only {self.train_only})"
            )
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_decay and self.deepspeed:
            # under ZeRO-3 a process holds only a shard of each weight, so it cannot average the whole of it
            raise ConfigError("train.ema_decay is not supported with train.deepspeed; set train.ema_decay: 0")
        if set(FREEZABLE) <= set(self.freeze):
            raise ConfigError("train.freeze names every parameter group: nothing would be trained")

    def frozen_groups(self) -> list[str]:
        """The groups no parameter of which trains: ``freeze``, or those ``train_only`` does not reach into."""
        if not self.train_only:
            return list(self.freeze)
        return [g for g in FREEZABLE if not any(e.split(".")[0] == g for e in self.train_only)]


def covers(entries: list[str], name: str, group: str) -> bool:
    """Whether one of ``entries`` (of `TrainConfig.reinit` / ``train_only``: a group, or a module path inside one)
    covers the parameter ``name`` of ``group``."""
    return any(e == group or name.startswith(e + ".") for e in entries)


@dataclass
class RunConfig:
    """Everything one training run needs; saved as RUN_DIR/config.yaml and with every checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)  # type: ignore[valid-type]
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        hiding = {"model.images_from_step": self.model.images_from_step, "model.hide_images": self.model.hide_images}
        hiding = {k: v for k, v in hiding.items() if v}
        if hiding and "language" in self.train.freeze:
            # hiding images from an LLM that does not learn only blinds it (e.g. a stage 2 built on configs/tiny.yaml)
            raise ConfigError(
                f"{', '.join(f'{k}={v}' for k, v in hiding.items())} hides images from the LLM in training, but "
                f"train.freeze holds 'language': set {' and '.join(f'{k}: 0' for k in hiding)}"
            )


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """A RunConfig from a YAML preset (``base:`` inheritance) plus ``section.key=value`` overrides."""
    return load_config(RunConfig, path, overrides)
