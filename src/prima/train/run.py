"""`prima train`: build the data, the processor and `PrimaModel` from a `RunConfig`, train, export the model.

RUN_DIR gets ``config.yaml`` (the resolved run config), ``processor/`` (the tokenizer, trained once on the
training text so a resumed run reuses it), ``log.jsonl``, ``checkpoints/`` and, at the end, ``final/`` and
``best/`` model folders that `PrimaModel.from_pretrained` (and `prima eval --checkpoint`) load.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prima.config import save_config, to_dict
from prima.data.schema import Sample, Segment
from prima.errors import PrimaError
from prima.train.checkpoint import list_checkpoints, load_model_weights
from prima.train.config import RunConfig, covers, load_run_config
from prima.train.data import FeatureCache, SampleSet, load_samples, module_digest, sample_lengths
from prima.train.ema import EMA_FILE
from prima.train.trainer import Trainer, TrainResult, make_accelerator

CONFIG_FILE = "config.yaml"
PROCESSOR_DIR = "processor"


class TrainCollator:
    """Samples -> the model's batch; with a `FeatureCache`, cached frozen-encoder features replace pixels; with
    ``cache_queries`` (``train.cache_seg_queries``), each sample's [SEG] queries come along (`seg_queries`)."""

    def __init__(
        self, model: Any, cache: FeatureCache | None = None, encode_batch: int = 32, *, cache_queries: bool = False
    ):
        self.model = model  # the unwrapped PrimaModel
        self.processor = model.processor
        self.cfg = model.config
        self.cache = cache
        self.encode_batch = encode_batch
        # sample -> its grounding queries (num [SEG], Hq), kept in memory for the run: the first batch computes
        # those of every sample given to `expect_queries` in fixed batches (after a resume has loaded the
        # weights), so a resumed run recomputes the very same values
        self.queries: dict[tuple, torch.Tensor] | None = {} if cache_queries else None
        self.pending: Sequence[Sample] = []
        self.accelerator: Any = None

    def expect_queries(self, samples: Sequence[Sample], accelerator: Any) -> None:
        """Have the first batch compute the grounding queries of ``samples``, split over ``accelerator``'s
        processes (every process keeps every sample's: the samplers deal them out anew each epoch)."""
        self.pending, self.accelerator = samples, accelerator

    def encode(self, paths: list[str]) -> list[list[torch.Tensor]]:
        """Frozen-encoder features of image files, one list of per-scale tensors per image."""
        from prima.model.vision import split_image_features

        out: list[list[torch.Tensor]] = []
        for i in range(0, len(paths), self.encode_batch):
            pixels = self.processor.preprocess_images(paths[i : i + self.encode_batch])
            with torch.no_grad():
                out.extend(split_image_features(self.model.encode_images(pixels)))
        return [[t.cpu() for t in f] for f in out]

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        batch = self._collate(samples)
        if self.pending:
            pending, self.pending = self.pending, []
            self.fill_queries(pending, self.accelerator)
        if self.queries is not None:
            batch["seg_queries"] = torch.cat([self._queries(s) for s in samples])
        return batch

    def _collate(self, samples: list[Sample]) -> dict[str, Any]:
        from prima.data.collate import collate_samples
        from prima.model.vision import stack_image_features

        batch = collate_samples(samples, None, self.processor, self.cfg, include_pixels=self.cache is None)
        if self.cache is not None:
            paths = [p for s in samples for p in s.images]
            levels = self.model.feature_levels()  # training the image prior alone: one level of several
            batch["image_features"] = stack_image_features(self.cache.features(paths, self.encode, levels))
        return batch

    def _queries(self, sample: Sample) -> torch.Tensor:
        """The sample's grounding queries (computed now if `fill_queries` did not see it)."""
        assert self.queries is not None
        key = _sample_key(sample)
        if key not in self.queries:
            self.fill_queries([sample])
        return self.queries[key]

    def fill_queries(self, samples: Sequence[Sample], accelerator: Any = None, batch: int = 16) -> None:
        """Compute and keep the grounding queries of ``samples`` (in eval mode: no dropout), ``batch`` at a time;
        with an ``accelerator`` of several processes each computes every n-th sample and all keep all."""
        from accelerate.utils import gather_object

        assert self.queries is not None
        world = accelerator.num_processes if accelerator is not None else 1
        mine = samples[accelerator.process_index :: world] if world > 1 else samples
        model, training = self.model, self.model.training
        model.eval()
        found = []
        try:
            for i in range(0, len(mine), batch):
                chunk = list(mine[i : i + batch])
                found += [(_sample_key(s), q.cpu()) for s, q in zip(chunk, model.seg_queries(self._collate(chunk)))]
        finally:
            model.train(training)
        self.queries.update(gather_object(found) if world > 1 else found)


def _sample_key(sample: Sample) -> tuple:
    return (sample.id, sample.question, sample.answer, tuple(sample.images))


def make_feature_cache(model: Any, folder: str | os.PathLike) -> FeatureCache:
    """A cache keyed by the encoder's kind, input size, normalisation and weights."""
    cfg = model.config
    if not cfg.vision.frozen:
        raise PrimaError("data.feature_cache needs a frozen vision encoder (model.vision.frozen: true)")
    proc = model.processor
    key = f"{cfg.vision.kind}|size={proc.image_size}|mean={proc.image_mean}|std={proc.image_std}"
    return FeatureCache(folder, key, module_digest(model.vision))


def fill_cache(collator: TrainCollator, samples: Sequence[Sample], accelerator: Any, batch: int = 64) -> None:
    """Encode every image not cached yet (processes split the images), with a progress bar."""
    from tqdm.auto import tqdm

    assert collator.cache is not None
    paths = sorted({p for s in samples for p in s.images})[accelerator.process_index :: accelerator.num_processes]
    todo = [p for p in paths if not collator.cache.has(p)]
    bar = tqdm(total=len(todo), desc="cache features", unit="img", disable=not accelerator.is_main_process)
    for i in range(0, len(todo), batch):
        chunk = todo[i : i + batch]
        collator.cache.features(chunk, collator.encode)
        bar.update(len(chunk))
    bar.close()
    accelerator.wait_for_everyone()


GENERATION_METRICS = ("miou", "recall", "ss", "siou", "no_mask_acc", "giou")  # logged as val_<name>


def check_best_metric(cfg: RunConfig) -> None:
    """Fail before step 1, not at the first validation, when ``train.best_metric`` will never be computed."""
    metric, train = cfg.train.best_metric, cfg.train
    if not train.val_every or not metric.startswith("val_"):
        return
    if metric.removeprefix("val_") in GENERATION_METRICS and not (cfg.data.val and train.val_generate):
        raise PrimaError(
            f"train.best_metric={metric!r} comes from generated validation answers, but "
            f"{'train.val_generate is 0' if cfg.data.val else 'data.val names no validation set'}; set "
            "train.val_generate (e.g. 16) or pick train.best_metric=val_loss"
        )
    if metric.startswith("val_loss") and not cfg.data.val:
        raise PrimaError(f"train.best_metric={metric!r} needs a validation set: set data.val")


def make_generation_validator(val_samples: list[Sample], limit: int) -> Any:
    """validate_fn: greedy answers + masks for the first ``limit`` validation samples, scored like `prima eval`."""
    from accelerate.utils import gather_object

    from prima.data.masks import binarize, encode_rle
    from prima.evaluation.scorer import M4SegEvaluator, PredictionRecord

    samples = val_samples[:limit]
    evaluator = M4SegEvaluator(wordnet="none")  # METEOR is not used for model selection

    def validate(model: Any, accelerator: Any) -> dict[str, float]:
        net = accelerator.unwrap_model(model)
        rows = []
        for i in range(accelerator.process_index, len(samples), accelerator.num_processes):
            s = samples[i]
            out = net.generate(s.images, s.question)
            cut = net.config.grounding
            segs = [
                Segment(g.phrase, g.image, encode_rle(binarize(g.mask, cut.mask_threshold, cut.mask_regions)), g.score)
                for g in out.segments
            ]
            rows.append((i, out.answer, [seg.to_dict() for seg in segs]))
        if accelerator.num_processes > 1:
            rows = gather_object(rows)
        evaluator.reset()
        for i, answer, segs in sorted(rows, key=lambda r: r[0]):
            segments = [Segment(d["phrase"], d["image"], d["mask"], d["kind"], d.get("score")) for d in segs]
            evaluator.process(samples[i], PredictionRecord(samples[i].id, answer, segments))
        result = evaluator.evaluate()
        return {f"val_{k}": float(result[k]) for k in GENERATION_METRICS if result.get(k) is not None}

    return validate


def _load_config(config: str | None, overrides: Sequence[str], run_dir: Path, resume: bool) -> RunConfig:
    saved = run_dir / CONFIG_FILE
    if resume:
        if not saved.is_file():
            raise PrimaError(f"--resume: {saved} not found; is {run_dir} a run folder made by `prima train --out`?")
        cfg = load_run_config(saved, overrides)  # the run's own config; overrides may extend it (max_steps)
        if config is not None:
            given = load_run_config(config, overrides)
            if to_dict(given) != to_dict(cfg):
                raise PrimaError(
                    f"--resume with --config {config}: it differs from the run's saved {saved}; "
                    "drop --config (the saved one is used) or start a new --out"
                )
        return cfg
    if config is None:
        raise PrimaError("prima train needs --config FILE (or --resume to continue a run)")
    return load_run_config(config, overrides)


def _texts(samples: Sequence[Sample]) -> list[str]:
    return [t for s in samples for t in (s.question, s.answer)]


def run_training(
    config: str | None,
    overrides: Sequence[str],
    out: str | os.PathLike,
    *,
    resume: bool = False,
    stop_at_step: int | None = None,
) -> TrainResult:
    """Everything `prima train` does; returns where the run ended and its best checkpoint."""
    from accelerate.utils import set_seed

    from prima.data.processor import PrimaProcessor, load_tokenizers
    from prima.model.prima import PrimaModel

    run_dir = Path(out)
    if not resume and list_checkpoints(run_dir):
        raise PrimaError(f"{run_dir} already has checkpoints; pass --resume to continue it or use a new --out")
    cfg = _load_config(config, overrides, run_dir, resume)
    check_best_metric(cfg)
    accelerator = make_accelerator(cfg.train)
    if accelerator.device.type == "cpu":
        # trained weights drift into denormal floats, which a CPU multiplies slowly: a trained tiny model's step
        # took 0.85 s instead of 0.71 s (docs/PERFORMANCE.md); flushing them to 0 changes no result that matters
        torch.set_flush_denormal(True)
    set_seed(cfg.train.seed)  # the same initial weights on every process and every run of this config
    train_set = SampleSet(cfg.data.train)
    val_samples = load_samples(cfg.data.val, limit=cfg.data.val_max_samples) if cfg.data.val else None

    processor_dir = run_dir / PROCESSOR_DIR
    if resume and not processor_dir.is_dir():
        raise PrimaError(f"--resume: {processor_dir} is missing; the run's tokenizer cannot be recovered")
    init_from = Path(cfg.train.init_from) if cfg.train.init_from and not resume else None
    if init_from is not None and not (init_from / "model.safetensors").is_file():
        raise PrimaError(f"train.init_from: {init_from / 'model.safetensors'} not found; give a model folder (final/)")
    if accelerator.is_main_process and not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        if init_from is not None:  # the trained model's token ids: its own tokenizer
            PrimaProcessor.from_pretrained(init_from).save_pretrained(processor_dir)
        else:
            tokenizer, qformer_tokenizer = load_tokenizers(cfg.model, _texts(train_set.samples))
            PrimaProcessor.from_config(cfg.model, tokenizer, qformer_tokenizer).save_pretrained(processor_dir)
    if accelerator.is_main_process and (not resume or overrides):
        # a resume may change the run (e.g. train.max_steps to train longer): the saved config follows it
        save_config(cfg, run_dir / CONFIG_FILE)
    accelerator.wait_for_everyone()
    processor = PrimaProcessor.from_pretrained(processor_dir)  # every process: the one saved tokenizer
    set_seed(cfg.train.seed)
    model = PrimaModel(cfg.model, processor)
    names = [n for n, _ in model.named_parameters()]
    for key in ("reinit", "train_only"):  # a module path must name something: a typo would silently do nothing
        for entry in getattr(cfg.train, key):
            if not any(covers([entry], n, model.group_of(n)) for n in names):
                raise PrimaError(f"train.{key}: {entry!r} names no parameter of this model")
    if init_from is not None:
        reinit = cfg.train.reinit
        fresh = load_model_weights(
            model,
            init_from / "model.safetensors",
            allow_missing=True,
            skip=lambda k: covers(reinit, k, model.group_of(k)),
        )
        if accelerator.is_main_process:
            print(f"init_from {init_from}: {len(fresh)} weight(s) start fresh {fresh[:6]}", flush=True)
        if hasattr(model.grounding, "warm_start"):
            model.grounding.warm_start({k.removeprefix("grounding.") for k in fresh})
    groups = model.parameter_groups()
    for name in cfg.train.freeze:  # before the optimizer is made: it takes the parameters that still train
        for p in groups[name]:
            p.requires_grad_(False)
    if cfg.train.train_only:
        for name, p in model.named_parameters():
            if not covers(cfg.train.train_only, name, model.group_of(name)):
                p.requires_grad_(False)

    cache = make_feature_cache(model, cfg.data.feature_cache) if cfg.data.feature_cache else None
    collator = TrainCollator(model, cache, cache_queries=cfg.train.cache_seg_queries)
    if cache is not None and cfg.data.prefill_cache:
        fill_cache(collator, train_set.samples + (val_samples or []), accelerator)
    if collator.queries is not None:
        collator.expect_queries(train_set.samples + (val_samples or []), accelerator)
    validate_fn = None
    if val_samples and cfg.train.val_generate:
        validate_fn = make_generation_validator(val_samples, cfg.train.val_generate)

    trainer = Trainer(
        model,
        train_set,
        collator,
        cfg.train,
        run_dir,
        sampler=train_set.sampler(
            cfg.train.seed,
            cfg.data.epoch_size,
            lengths=sample_lengths(model.processor, train_set.samples) if cfg.data.group_by_length > 1 else None,
            group=cfg.data.group_by_length,
            batch_size=cfg.train.batch_size,
        ),
        val_set=val_samples,
        validate_fn=validate_fn,
        config_text=(run_dir / CONFIG_FILE).read_text(encoding="utf-8"),
        accelerator=accelerator,
    )
    result = trainer.fit(resume=resume, stop_at_step=stop_at_step)
    if result.step >= cfg.train.max_steps:
        export_models(trainer, result)
    if accelerator.is_main_process:  # one line, not one per process
        print(
            f"step {result.step}: last checkpoint {result.last_checkpoint}, best {result.best_checkpoint}", flush=True
        )
    # several processes: leave their group before exiting, or gloo's threads may abort the exit of one of them
    accelerator.end_training()
    return result


def export_models(trainer: Trainer, result: TrainResult) -> None:
    """Write RUN_DIR/final (last weights) and RUN_DIR/best (best validation) as `from_pretrained` folders; with
    ``train.ema_decay`` both hold the averaged weights (those validation judged)."""
    acc = trainer.accelerator
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return
    model = acc.unwrap_model(trainer.model)
    with trainer.averaged():
        model.save_pretrained(trainer.run_dir / "final")
    if result.best_checkpoint is not None:
        best = Path(result.best_checkpoint)
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        load_model_weights(model, best / "model.safetensors")
        if trainer.ema is not None:  # the averaged trainable weights over the raw ones
            load_model_weights(model, best / EMA_FILE, allow_missing=True)
        model.save_pretrained(trainer.run_dir / "best")
        model.load_state_dict(current)
