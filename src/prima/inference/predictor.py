"""`PrimaPredictor`: images + question in, grounded answer with per-image boolean masks out.

It hides everything between a user's files and the model: loading and converting images
(`prima.inference.images`), checking the question, running `PrimaModel.generate`, and turning mask
probabilities into boolean masks with boxes. `Prediction.to_json()` is the JSON that `prima predict`
writes and `prima eval` reads back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prima.constants import MAX_IMAGES, SPECIAL_TOKENS
from prima.data.masks import MASK_REGIONS, binarize, encode_rle, mask_bbox, resize_mask
from prima.data.schema import strip_markup
from prima.errors import PrimaError
from prima.inference.images import MAX_IMAGE_SIDE, ImageInput, LoadedImage, load_images

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[3]
BUNDLED_CHECKPOINT = REPO_ROOT / "checkpoints" / "prima-tiny-synth"
MAX_QUESTION_CHARS = 1000  # far above any benchmark question; keeps the prompt inside the model's context
MASK_THRESHOLD = 0.5  # a pixel is in the mask when the probability reaches this (models without their own)
# the image prior's heads a read-out option needs, as its error names them
PRIOR_HEADS = {
    "cells": "answer cells (model.image_prior_cells is off)",
    "nowhere": "`NothingThere` (model.image_prior_nowhere is off)",
}


@dataclass
class Segment:
    """One grounded phrase of an answer and its mask in image ``image`` (1-based, as in the answer)."""

    phrase: str
    image: int
    mask: np.ndarray  # bool, (height, width) of that image
    score: float
    bbox: list[int]  # COCO [x, y, w, h] of the mask; [0, 0, 0, 0] when the mask is empty
    support: float | None = None  # grounding.phrase_check: how surely the pixels show the phrase (None: no check)

    def to_json(self) -> dict[str, Any]:
        out = {
            "phrase": self.phrase,
            "image": self.image,
            "score": round(float(self.score), 6),
            "bbox": list(self.bbox),
            "mask": encode_rle(self.mask),
        }
        if self.support is not None:
            out["support"] = round(float(self.support), 6)
        return out


@dataclass
class Prediction:
    """The model's answer (with `<p>`/`[SEG]`/`(IMAGEk)` markup) and one Segment per `[SEG]`, in order."""

    answer: str
    segments: list[Segment] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) the masks have
    # the answer the model wrote first, when the read-out replaced it: the phrase check (grounding.phrase_check: its
    # pixels showed none of its phrases, or it had none and the pixels show every phrase of ``answer``) or the
    # answer's cells (model.image_prior_cells: its first phrase written again)
    first_answer: str | None = None

    @property
    def text(self) -> str:
        """The answer as plain text, markup removed."""
        return strip_markup(self.answer)

    def to_json(self) -> dict[str, Any]:
        """``{"answer", "segments": [{"phrase", "image", "score", "bbox", "mask": COCO RLE[, "support"]}]
        [, "first_answer"]}``."""
        out: dict[str, Any] = {"answer": self.answer, "segments": [s.to_json() for s in self.segments]}
        if self.first_answer is not None:
            out["first_answer"] = self.first_answer
        return out


class PrimaPredictor:
    """Answers questions about 1..max_images images with a loaded PRIMA model (see `from_pretrained`)."""

    def __init__(
        self,
        model: Any,
        *,
        max_images: int | None = None,
        max_question_chars: int = MAX_QUESTION_CHARS,
        mask_threshold: float | None = None,
        mask_regions: str | None = None,
        max_image_side: int = MAX_IMAGE_SIDE,
        max_new_tokens: int | None = None,
    ):
        self.model = model
        self.max_new_tokens = max_new_tokens  # None: the model's own default answer length
        self.max_images = max_images or _model_max_images(model)
        self.max_question_chars = max_question_chars
        grounding = getattr(getattr(model, "config", None), "grounding", None)  # the model's own cut, if it has one
        if mask_threshold is None:
            mask_threshold = getattr(grounding, "mask_threshold", MASK_THRESHOLD)
        self.mask_threshold = mask_threshold
        if not 0.0 < self.mask_threshold < 1.0:
            raise PrimaError(f"--mask-threshold must be between 0 and 1, got {self.mask_threshold}")
        self.mask_regions = mask_regions or getattr(grounding, "mask_regions", "all")
        if self.mask_regions not in MASK_REGIONS:
            raise PrimaError(f"--mask-regions must be one of {', '.join(MASK_REGIONS)}, got {self.mask_regions!r}")
        if self.mask_regions == "supported" and getattr(getattr(model, "grounding", None), "checker", None) is None:
            raise PrimaError(
                "--mask-regions supported needs a checkpoint with the phrase check (grounding.phrase_check)"
            )
        if grounding is not None:  # the model cuts its masks' regions ("supported") with the same threshold
            grounding.mask_threshold, grounding.mask_regions = self.mask_threshold, self.mask_regions
        self.max_image_side = max_image_side

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: str = "cpu",
        dtype: Any = None,
        image_choice_weight: float | None = None,
        distinct_images: bool | None = None,
        word_readout: bool | None = None,
        phrase_check: float | None = None,
        image_support_weight: float | None = None,
        image_prior_weight: float | None = None,
        image_prior_after_phrase: float | None = None,
        image_prior_cells_weight: float | None = None,
        image_prior_cells_below: float | None = None,
        image_prior_cells_temperature: float | None = None,
        image_prior_cells_nowhere: float | None = None,
        image_prior_nowhere_below: float | None = None,
        image_prior_rewrite_above: float | None = None,
        every_image_check: bool | None = None,
        **kwargs: Any,
    ) -> PrimaPredictor:
        """Load a checkpoint folder (default: the bundled ``checkpoints/prima-tiny-synth``) onto ``device``;
        ``image_choice_weight`` replaces the checkpoint's ``grounding.image_choice_weight`` (0: the LLM alone
        picks each [SEG]'s image), ``distinct_images`` its ``grounding.distinct_images``, ``word_readout`` its
        ``grounding.word_readout`` (False: the LLM's first phrase words stand), ``phrase_check`` its
        ``grounding.phrase_check_threshold`` (0: the check off, every answer as the LLM wrote it),
        ``image_support_weight`` its ``grounding.image_support_weight`` (0: the pixels' support has no say in the
        image choice), ``image_prior_weight`` its ``model.image_prior_weight`` (0: the LLM alone names the answer's
        first image), ``image_prior_after_phrase`` its ``model.image_prior_after_phrase`` (0: not once a phrase is
        written), ``image_prior_cells_weight`` its ``model.image_prior_cells_weight`` (0: the answer's cells do not
        re-rank its first phrase), ``image_prior_cells_below`` its ``model.image_prior_cells_below`` (0: no first
        phrase is written again), ``image_prior_cells_temperature`` its ``model.image_prior_cells_temperature``
        (> 0; below 1 the cells' likeliest cells weigh more), ``image_prior_cells_nowhere`` its
        ``model.image_prior_cells_nowhere`` (0..1: how much `NothingThere`'s cells weigh in the cells' read-out,
        everywhere; in place of a learnt `WhichCells`' weight, ``model.image_prior_cells_mix``),
        ``image_prior_nowhere_below`` its ``model.image_prior_nowhere_below`` (0: nothing
        reads whether the answer grounds anything in its image), ``image_prior_rewrite_above`` its
        ``model.image_prior_rewrite_above`` (0: the cells are read on the first [SEG]'s image, whatever the prior
        says), ``every_image_check`` its ``grounding.every_image_check`` (False: an answer that says an object is in
        every image is checked only as any other)."""
        path = resolve_checkpoint(path)
        _check_device(device)
        from prima.model import PrimaModel

        model = PrimaModel.from_pretrained(path, device=device, dtype=_torch_dtype(dtype))
        if image_choice_weight is not None:
            if not model.config.grounding.image_choice:
                raise PrimaError(
                    f"--image-choice-weight: {path} has no image choice (model.grounding.image_choice is off)"
                )
            if not image_choice_weight >= 0:
                raise PrimaError(f"--image-choice-weight must be >= 0, got {image_choice_weight}")
            model.config.grounding.image_choice_weight = float(image_choice_weight)
        if distinct_images is not None:
            model.config.grounding.distinct_images = bool(distinct_images)
        if word_readout is not None:
            if word_readout and getattr(model.grounding, "reader", None) is None:
                raise PrimaError(f"word_readout: {path} has no word reader (model.grounding.word_readout is off)")
            model.config.grounding.word_readout = bool(word_readout)
        if phrase_check is not None:
            if getattr(model.grounding, "checker", None) is None:
                raise PrimaError(f"--phrase-check: {path} has no phrase check (model.grounding.phrase_check is off)")
            if not 0.0 <= phrase_check <= 1.0:
                raise PrimaError(f"--phrase-check must be between 0 and 1, got {phrase_check}")
            model.config.grounding.phrase_check_threshold = float(phrase_check)
        if every_image_check is not None:
            if every_image_check and getattr(model.grounding, "checker", None) is None:
                raise PrimaError(f"every_image_check: {path} has no phrase check (model.grounding.phrase_check is off)")
            model.config.grounding.every_image_check = bool(every_image_check)
        if image_support_weight is not None:
            grounding = model.config.grounding
            if image_support_weight and not (grounding.image_choice and grounding.phrase_check):
                raise PrimaError(
                    f"--image-support-weight: {path} needs the image choice and the phrase check "
                    "(model.grounding.image_choice, model.grounding.phrase_check)"
                )
            if not image_support_weight >= 0:
                raise PrimaError(f"--image-support-weight must be >= 0, got {image_support_weight}")
            grounding.image_support_weight = float(image_support_weight)
        for option, value in (
            ("image_prior_weight", image_prior_weight),
            ("image_prior_after_phrase", image_prior_after_phrase),
            ("image_prior_cells_weight", image_prior_cells_weight),
        ):
            if value is None:
                continue
            flag = "--" + option.replace("_", "-")
            if value and model.image_prior is None:
                raise PrimaError(f"{flag}: {path} has no image prior (model.image_prior is off)")
            if value and option == "image_prior_cells_weight" and model.image_prior.cells is None:
                raise PrimaError(f"{flag}: {path}'s image prior has no {PRIOR_HEADS['cells']}")
            if not value >= 0:
                raise PrimaError(f"{flag} must be >= 0, got {value}")
            setattr(model.config, option, float(value))
        unit, positive = (lambda v: 0.0 <= v <= 1.0, "between 0 and 1"), (lambda v: v > 0, "> 0")
        for option, flag, head, value, (valid, bounds) in (
            ("image_prior_cells_below", "--image-prior-cells-below", "cells", image_prior_cells_below, unit),
            ("image_prior_nowhere_below", "--image-prior-nowhere", "nowhere", image_prior_nowhere_below, unit),
            ("image_prior_cells_nowhere", "--image-prior-cells-nowhere", "nowhere", image_prior_cells_nowhere, unit),
            ("image_prior_rewrite_above", "--image-prior-rewrite", "cells", image_prior_rewrite_above, unit),
            (
                "image_prior_cells_temperature",
                "--image-prior-cells-temperature",
                "cells",
                image_prior_cells_temperature,
                positive,
            ),
        ):  # a share, a probability, a mixing weight or a temperature, read from a head of the image prior
            if value is None:
                continue
            if value and getattr(model.image_prior, head, None) is None:
                raise PrimaError(f"{flag}: {path}'s image prior has no {PRIOR_HEADS[head]}")
            if not valid(value):
                raise PrimaError(f"{flag} must be {bounds}, got {value}")
            setattr(model.config, option, float(value))
        if image_prior_cells_nowhere is not None:  # a fixed weight asked for: `WhichCells`' learnt one is not read
            model.config.image_prior_cells_mix = False
        model.eval()
        return cls(model, **kwargs)

    def check_question(self, question: Any) -> str:
        """The question stripped of surrounding space; a PrimaError if empty, too long or holding markup."""
        return check_question(question, self.max_question_chars)

    def load(self, images: Any) -> list[LoadedImage]:
        """Load and convert the images of one query (see `prima.inference.images`)."""
        return load_images(images, max_images=self.max_images, max_side=self.max_image_side)

    def predict(self, images: Sequence[ImageInput], question: str) -> Prediction:
        """Answer ``question`` about ``images`` (paths, PIL images or arrays; 1..max_images of them)."""
        q = self.check_question(question)
        return self._run(self.load(images), q)

    def predict_loaded(self, images: Sequence[LoadedImage], question: str) -> Prediction:
        """`predict` for images already loaded with `load` (the CLI and web demo reuse them for overlays)."""
        return self._run(list(images), self.check_question(question))

    def predict_batch(self, queries: Iterable[tuple[Sequence[ImageInput], str]]) -> list[Prediction]:
        """Answer many ``(images, question)`` queries; every query is checked before the first one runs."""
        prepared = []
        for n, (images, question) in enumerate(queries, start=1):
            try:
                prepared.append((self.load(images), self.check_question(question)))
            except PrimaError as e:
                raise PrimaError(f"query {n}: {e}") from None
        return [self._run(images, q) for images, q in prepared]

    def _run(self, images: list[LoadedImage], question: str) -> Prediction:
        import torch

        if not images:
            raise PrimaError(f"no image given: pass 1 to {self.max_images} images")
        if len(images) > self.max_images:
            raise PrimaError(f"{len(images)} images given, but this model takes at most {self.max_images}")

        with torch.inference_mode():
            kwargs = {} if self.max_new_tokens is None else {"max_new_tokens": self.max_new_tokens}
            out = self.model.generate([im.image for im in images], question, **kwargs)
        sizes = [im.size for im in images]
        segments = [self._segment(s, sizes) for s in out.segments]
        return Prediction(out.answer, segments, sizes, getattr(out, "first_answer", None))

    def _segment(self, generated: Any, sizes: list[tuple[int, int]]) -> Segment:
        k = int(generated.image)
        if not 1 <= k <= len(sizes):
            raise PrimaError(f"the model grounded {generated.phrase!r} in image {k}, but there are {len(sizes)}")
        probs = _to_numpy(generated.mask)
        mask = binarize(probs, self.mask_threshold, self.mask_regions)
        if mask.shape != sizes[k - 1]:  # the model promises original size; be safe for foreign models
            mask = resize_mask(mask, sizes[k - 1])
        support = getattr(generated, "support", None)
        return Segment(generated.phrase, k, mask, float(generated.score), mask_bbox(mask), support)


def resolve_checkpoint(path: str | Path | None) -> Path:
    """The checkpoint folder to load (``None``: the bundled one); a PrimaError saying what to do if absent."""
    path = Path(path) if path is not None else BUNDLED_CHECKPOINT
    if not path.is_dir():
        if path == BUNDLED_CHECKPOINT:
            raise PrimaError(
                f"the bundled checkpoint is not there yet: {path} does not exist "
                "(train one with `prima train --config configs/tiny.yaml`, or pass --checkpoint DIR)"
            )
        raise PrimaError(f"checkpoint folder not found: {path}")
    return path


def check_question(question: Any, max_chars: int = MAX_QUESTION_CHARS) -> str:
    """The question stripped of surrounding space; a PrimaError if empty, too long or holding markup."""
    if not isinstance(question, str):
        raise PrimaError(f"the question must be text, got {type(question).__name__}")
    q = question.strip()
    if not q:
        raise PrimaError("the question is empty: ask something about the images")
    if len(q) > max_chars:
        raise PrimaError(f"the question is {len(q)} characters long; the limit is {max_chars}")
    reserved = [t for t in SPECIAL_TOKENS if t in q]
    if reserved:
        raise PrimaError(f"the question contains reserved markup {reserved[0]!r}; rephrase it without it")
    return q


def _to_numpy(mask: Any) -> np.ndarray:
    if hasattr(mask, "detach"):
        mask = mask.detach().float().cpu().numpy()
    return np.asarray(mask, dtype=np.float32)


def _model_max_images(model: Any) -> int:
    config = getattr(model, "config", None)
    for holder in (config, getattr(config, "model", None), getattr(config, "data", None)):
        value = getattr(holder, "max_images", None)
        if isinstance(value, int) and value > 0:
            return value
    return MAX_IMAGES


def _check_device(device: str) -> None:
    import torch

    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise PrimaError(f"unknown device {device!r}: use cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PrimaError(f"device {device!r} was asked for, but this machine has no usable CUDA GPU; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise PrimaError("device 'mps' was asked for, but it is not available; use --device cpu")


def _torch_dtype(dtype: Any) -> Any:
    if dtype is None or not isinstance(dtype, str):
        return dtype
    import torch

    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    if dtype not in names:
        raise PrimaError(f"unknown dtype {dtype!r}: use one of {', '.join(names)}")
    return names[dtype]
