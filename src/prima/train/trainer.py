"""The training loop: accelerate (1 CPU process, DDP over gloo/NCCL, DeepSpeed ZeRO), generic over the model.

The model's ``forward(batch)`` returns an object with ``.loss`` (a per-sample mean, so the gradient of a
global batch does not depend on how it is split over processes) and optionally ``loss_*`` parts, which are
logged. Batches come from a ``WeightedEpochSampler`` by step number, so resuming is exact by construction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prima.errors import PrimaError
from prima.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    write_json_atomic,
)
from prima.train.config import TrainConfig
from prima.train.ema import WeightAverage
from prima.train.sampler import WeightedEpochSampler, shard

LOG_FILE = "log.jsonl"


class TrainingDiverged(PrimaError):
    """The loss or gradient became NaN/inf; the run stopped before the bad update was applied."""


@dataclass
class TrainResult:
    step: int
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_value: float | None


def make_accelerator(cfg: TrainConfig) -> Any:
    """An Accelerator for this config: bf16 autocast only on CUDA, DeepSpeed when configured."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    precision = cfg.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    kwargs: dict[str, Any] = {}
    if cfg.deepspeed:
        from accelerate import DeepSpeedPlugin

        if not Path(cfg.deepspeed).is_file():
            raise PrimaError(f"train.deepspeed: no such DeepSpeed config: {cfg.deepspeed}")
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=cfg.deepspeed)
    return Accelerator(
        # without CUDA, run on CPU explicitly: accelerate only forms a gloo group under torchrun when told so
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        # the trainer steps its scheduler once per optimizer step itself; accelerate would step it once
        # per process, which makes the lr depend on the number of processes
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[
            DistributedDataParallelKwargs(
                find_unused_parameters=cfg.find_unused_parameters,
                # the gradients are views of DDP's all-reduce buckets: no copy back after each all-reduce
                gradient_as_bucket_view=True,
            )
        ],
        **kwargs,
    )


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """The lr multiplier after ``step`` optimizer steps: linear warmup, then cosine/linear decay or constant."""

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return factor


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no weight decay on biases and norm scales (1-D tensors); torch's fused
    kernel where ``cfg.fused_optimizer``."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise PrimaError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), fused=cfg.fused_optimizer or None
    )


def loss_parts(output: Any) -> dict[str, torch.Tensor]:
    """``loss`` and every scalar ``loss_*`` field of a model output (dataclass, ModelOutput or dict)."""
    if isinstance(output, dict):
        items = output.items()
    elif dataclasses.is_dataclass(output):
        items = ((f.name, getattr(output, f.name)) for f in dataclasses.fields(output))
    else:
        items = vars(output).items()
    parts = {
        k: v
        for k, v in items
        if (k == "loss" or k.startswith("loss_")) and isinstance(v, torch.Tensor) and v.numel() == 1
    }
    if "loss" not in parts:
        raise PrimaError("the model's forward(batch) must return an object with a scalar `.loss`")
    return parts


def move_to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


class Trainer:
    """Trains ``model`` on ``train_set`` (indexable) batched by ``collate_fn``; see the module docstring.

    ``validate_fn(model, accelerator) -> dict`` replaces the default validation (mean loss over
    ``val_set``, sharded over processes). ``config_text`` (the resolved YAML) is stored with each checkpoint.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_set: Sequence[Any],
        collate_fn: Callable[[list[Any]], Any],
        cfg: TrainConfig,
        run_dir: str | os.PathLike,
        *,
        sampler: WeightedEpochSampler | None = None,
        val_set: Sequence[Any] | None = None,
        validate_fn: Callable[[torch.nn.Module, Any], dict[str, float]] | None = None,
        config_text: str | None = None,
        accelerator: Any = None,
    ):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.train_set = train_set
        self.collate_fn = collate_fn
        self.val_set = val_set
        self.validate_fn = validate_fn
        self.config_text = config_text
        self.sampler = sampler or WeightedEpochSampler([len(train_set)], seed=cfg.seed)
        self.accelerator = accelerator or make_accelerator(cfg)
        acc = self.accelerator
        self.world_size = acc.num_processes
        self.rank = acc.process_index
        if cfg.batch_size % self.world_size:
            raise PrimaError(
                f"train.batch_size={cfg.batch_size} (the global batch) must be divisible by the "
                f"{self.world_size} processes"
            )
        self.per_process = cfg.batch_size // self.world_size
        self.micro = min(cfg.micro_batch_size or self.per_process, self.per_process)
        if self.per_process % self.micro:
            raise PrimaError(
                f"each process gets {self.per_process} samples per step, not a multiple of "
                f"train.micro_batch_size={self.micro}"
            )
        self.accum = self.per_process // self.micro
        acc.gradient_accumulation_steps = self.accum
        if acc.state.deepspeed_plugin is not None:
            ds = acc.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = self.micro
            ds["gradient_accumulation_steps"] = self.accum
            ds["train_batch_size"] = cfg.batch_size
            ds["gradient_clipping"] = cfg.grad_clip or 0.0
        # parameters a model trains by a loss of their own (no gradient path shared with the rest) are clipped on
        # their own, group by group, so adding them leaves every other update exactly as it was
        # (`separately_clipped_groups`)
        own = getattr(model, "separately_clipped_groups", None)
        self.clip_alone = [list(group) for group in own()] if callable(own) else []
        alone = {id(p) for group in self.clip_alone for p in group}
        self.clip_rest = [p for p in model.parameters() if id(p) not in alone]
        # a model whose training depends on the step (e.g. a loss switched on late) is told it before each step
        self.tell_step = getattr(model, "set_training_step", None)
        optimizer = make_optimizer(model, cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.model, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        self.ema = WeightAverage(acc.unwrap_model(self.model), cfg.ema_decay) if cfg.ema_decay else None
        self.step = 0
        self.best_value: float | None = None
        self.best_step: int | None = None

    # ----------------------------------------------------------------- state
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "best_metric": self.cfg.best_metric,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "world_size": self.world_size,
            "batch_size": self.cfg.batch_size,
        }

    def resume(self) -> Path | None:
        """Load the latest completed checkpoint of the run (if any) and trim the log to its step."""
        folder = latest_checkpoint(self.run_dir)
        if folder is None:
            return None
        state = load_checkpoint(self.accelerator, folder)
        self.step = int(state["step"])
        if self.ema is not None:
            self.ema.load(folder, updates=self.step)
        self.best_value = state.get("best_value")
        self.best_step = state.get("best_step")
        if self.accelerator.is_main_process:
            self._trim_log(self.step)
        self.accelerator.wait_for_everyone()
        return folder

    def _trim_log(self, step: int) -> None:
        # lines written after the checkpoint by the interrupted run are replaced by the resumed run's
        path = self.run_dir / LOG_FILE
        if not path.is_file():
            return
        kept = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")

    def _log(self, record: dict[str, Any]) -> None:
        if self.accelerator.is_main_process:
            with (self.run_dir / LOG_FILE).open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------ data
    def _micro_batches(self, step: int) -> list[list[int]]:
        mine = shard(self.sampler.batch_for_step(step, self.cfg.batch_size), self.rank, self.world_size)
        return [mine[i : i + self.micro] for i in range(0, len(mine), self.micro)]

    def _load(self, indices: list[int]) -> Any:
        return move_to_device(self.collate_fn([self.train_set[i] for i in indices]), self.accelerator.device)

    # ------------------------------------------------------------- training
    def _check_finite(self, value: torch.Tensor, what: str) -> None:
        bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=self.accelerator.device)
        if self.world_size > 1:  # every process must stop together, or the others hang in a collective
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:
            last = latest_checkpoint(self.run_dir)
            keep = f"the last good checkpoint is {last}" if last else "no checkpoint had been saved yet"
            raise TrainingDiverged(
                f"{what} became {value.item() if value.numel() == 1 else 'non-finite'} at step {self.step + 1}; "
                f"the run stopped before applying that update ({keep}). Lower train.lr, set train.grad_clip, "
                "or check the data; `--resume` continues from the last checkpoint"
            )

    def _train_step(self) -> dict[str, float]:
        acc, model = self.accelerator, self.model
        sums: dict[str, torch.Tensor] = {}
        if callable(self.tell_step):
            self.tell_step(self.step)
        for indices in self._micro_batches(self.step):
            batch = self._load(indices)
            with acc.accumulate(model):
                with acc.autocast():
                    output = model(batch)
                parts = loss_parts(output)
                self._check_finite(parts["loss"].detach(), "the training loss")
                acc.backward(parts["loss"])
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() / self.accum
        grad_norm = None
        if self.cfg.grad_clip is not None and acc.sync_gradients and acc.state.deepspeed_plugin is None:
            grad_norm = acc.clip_grad_norm_(self.clip_rest, self.cfg.grad_clip)
            self._check_finite(grad_norm.detach(), "the gradient norm")
            for group in self.clip_alone:  # already unscaled and synchronised by the call above
                torch.nn.utils.clip_grad_norm_(group, self.cfg.grad_clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        names = sorted(sums)
        stacked = torch.stack([sums[k] for k in names])
        if self.world_size > 1:
            stacked = acc.reduce(stacked, reduction="mean")
        stats = {k: float(v) for k, v in zip(names, stacked.tolist())}
        if grad_norm is not None:
            stats["grad_norm"] = float(grad_norm)
        return stats

    def averaged(self) -> contextlib.AbstractContextManager:
        """A block in which the model holds the weights it is judged and exported by: the average with
        ``train.ema_decay``, else its own."""
        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Validation metrics (``val_*``): the mean loss parts over ``val_set`` plus ``validate_fn``'s metrics,
        of the averaged weights with ``train.ema_decay``."""
        model = self.model
        if callable(self.tell_step):  # the losses as the next step would weigh them
            self.tell_step(self.step)
        model.eval()
        try:
            with self.averaged():
                metrics = self._validation_loss() if self.val_set else {}
                if self.validate_fn is not None:
                    metrics.update(self.validate_fn(model, self.accelerator))
                return metrics
        finally:
            model.train()

    def _validation_loss(self) -> dict[str, float]:
        acc = self.accelerator
        mine = list(range(self.rank, len(self.val_set), self.world_size))  # type: ignore[arg-type]
        sums: dict[str, torch.Tensor] = {}
        count = 0
        for i in range(0, len(mine), self.micro):
            indices = mine[i : i + self.micro]
            batch = move_to_device(self.collate_fn([self.val_set[j] for j in indices]), acc.device)  # type: ignore[index]
            with acc.autocast():
                parts = loss_parts(self.model(batch))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float() * len(indices)
            count += len(indices)
        names = sorted(sums)
        totals = torch.tensor([float(sums[k]) for k in names] + [float(count)], device=acc.device)
        if self.world_size > 1:
            totals = acc.reduce(totals, reduction="sum")
        n = float(totals[-1])
        return {f"val_{k}": float(v) / n for k, v in zip(names, totals[:-1].tolist())}

    def _is_better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        return value < self.best_value if self.cfg.best_mode == "min" else value > self.best_value

    def _save(self) -> Path:
        folder = save_checkpoint(
            self.accelerator,
            self.run_dir,
            self.step,
            self._trainer_state(),
            config_text=self.config_text,
            write_extra=self.ema.save if self.ema is not None else None,
        )
        if self.accelerator.is_main_process:
            prune_checkpoints(self.run_dir, self.cfg.keep_last, self.best_step)
            if self.best_step == self.step:
                write_json_atomic(
                    self.run_dir / "best.json",
                    {"step": self.step, "metric": self.cfg.best_metric, "value": self.best_value, "path": str(folder)},
                )
        self.accelerator.wait_for_everyone()
        return folder

    def fit(self, *, resume: bool = False, stop_at_step: int | None = None) -> TrainResult:
        """Train to ``cfg.max_steps`` (or stop after ``stop_at_step``, saving a checkpoint there)."""
        from tqdm.auto import tqdm

        acc, cfg = self.accelerator, self.cfg
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        if resume:
            self.resume()
        elif list_checkpoints(self.run_dir):
            raise PrimaError(f"{self.run_dir} already has checkpoints; pass --resume to continue it or use a new --out")
        else:
            from accelerate.utils import set_seed

            # per-process streams (seed + rank) so dropout differs across ranks; restored exactly on resume
            set_seed(cfg.seed, device_specific=True)
            if acc.is_main_process:
                (self.run_dir / LOG_FILE).write_text("", encoding="utf-8")
        end = min(cfg.max_steps, stop_at_step) if stop_at_step is not None else cfg.max_steps
        self.model.train()
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            disable=not (acc.is_main_process and cfg.progress_bar),
            dynamic_ncols=True,
            desc="train",
        )
        last_saved: Path | None = latest_checkpoint(self.run_dir) if resume else None
        window_time, window_samples, smooth = 0.0, 0, None  # speed counts training steps only
        while self.step < end:
            started = time.perf_counter()
            stats = self._train_step()
            window_time += time.perf_counter() - started
            self.step += 1
            window_samples += cfg.batch_size
            smooth = stats["loss"] if smooth is None else 0.9 * smooth + 0.1 * stats["loss"]
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == end:
                speed = window_samples / max(window_time, 1e-9)
                lr = self.scheduler.get_last_lr()[0]
                self._log({"step": self.step, "split": "train", **stats, "lr": lr, "samples_per_s": speed})
                bar.set_postfix(loss=f"{smooth:.4f}", samples_s=f"{speed:.1f}")
                window_time, window_samples = 0.0, 0
            improved = False
            if cfg.val_every and (self.step % cfg.val_every == 0 or self.step == cfg.max_steps):
                metrics = self.validate()
                if metrics:
                    self._log({"step": self.step, "split": "val", **metrics})
                    if cfg.best_metric not in metrics:
                        raise PrimaError(
                            f"train.best_metric={cfg.best_metric!r} is not among the validation metrics "
                            f"({', '.join(sorted(metrics))})"
                        )
                    value = metrics[cfg.best_metric]
                    if math.isfinite(value) and self._is_better(value):
                        self.best_value, self.best_step, improved = value, self.step, True
                    if acc.is_main_process:
                        bar.write(f"step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
            due = cfg.save_every and self.step % cfg.save_every == 0
            if due or improved or self.step == end:
                last_saved = self._save()
        bar.close()
        best = None
        if self.best_step is not None:
            best = next((p for s, p in list_checkpoints(self.run_dir) if s == self.best_step), None)
        return TrainResult(self.step, last_saved, best, self.best_value)
