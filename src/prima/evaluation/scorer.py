"""Scores a predictions JSONL against a samples JSONL: `score_predictions` and the `M4SegEvaluator` it uses.

Predictions come from `prima eval` or from any other system: one JSON object a line with `id`,
`answer` and `segments` (phrase, 1-based image, score, COCO RLE mask at the image's own size;
`bbox` optional and unused). A GT sample with no prediction is scored as an empty prediction and
listed; a malformed prediction, or one that does not fit its GT sample, is an error naming the file,
line and field. Mask metrics run on RLEs (pycocotools), never on decoded masks; phrase embeddings are
computed once per distinct phrase, in batches, after all masks are scored.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prima.data.schema import Sample, Segment, iter_jsonl, iter_samples, segment_from_dict
from prima.errors import PrimaError, SampleError
from prima.evaluation import metrics
from prima.evaluation.wordnet import MeteorResources, load_wordnet

NO_FAMILY = "(none)"  # group name for samples without a `family` when others have one


@dataclass
class PredictionRecord:
    """One line of a predictions JSONL, with where it came from (for error messages)."""

    id: str
    answer: str
    segments: list[Segment] = field(default_factory=list)
    path: str | None = None
    line: int | None = None


def prediction_from_dict(d: Any, *, path: str | os.PathLike | None = None, line: int | None = None) -> PredictionRecord:
    """Check one parsed prediction line's fields and build a PredictionRecord."""
    where: dict[str, Any] = {"path": path, "line": line}
    if not isinstance(d, dict):
        raise SampleError(f"expected a JSON object, got {type(d).__name__}", **where)
    if "id" not in d:
        raise SampleError("missing required field (the id of the GT sample it answers)", field="id", **where)
    if not isinstance(d["id"], (str, int)) or isinstance(d["id"], bool):
        raise SampleError(f"expected a string, got {type(d['id']).__name__}", field="id", **where)
    where["sample_id"] = str(d["id"])
    answer = d.get("answer")
    if not isinstance(answer, str):
        problem = "missing required field" if answer is None else f"expected a string, got {type(answer).__name__}"
        raise SampleError(problem, field="answer", **where)
    segs = d.get("segments", [])
    if not isinstance(segs, list):
        raise SampleError(f"expected a list, got {type(segs).__name__}", field="segments", **where)
    segments = [segment_from_dict(s, where=where, index=i, prediction=True) for i, s in enumerate(segs)]
    return PredictionRecord(str(d["id"]), answer, segments, None if path is None else str(path), line)


def read_predictions(path: str | os.PathLike) -> dict[str, PredictionRecord]:
    """All predictions of a JSONL file by id; a SampleError naming the line for bad JSON, fields or a repeated id."""
    path = Path(path)
    if not path.is_file():
        raise PrimaError(f"no such predictions file: {path}")
    out: dict[str, PredictionRecord] = {}
    for line_no, d in iter_jsonl(path):
        rec = prediction_from_dict(d, path=path, line=line_no)
        if rec.id in out:
            raise SampleError(
                f"a second prediction for this id (the first is on line {out[rec.id].line})",
                path=path,
                line=line_no,
                sample_id=rec.id,
                field="id",
            )
        out[rec.id] = rec
    return out


def check_prediction(pred: PredictionRecord, gt: Sample) -> None:
    """A prediction must name images its GT sample has, with masks at those images' sizes."""
    where = {"path": pred.path, "line": pred.line, "sample_id": pred.id}
    sizes: dict[int, list[int]] = {}
    for seg in gt.segments:
        sizes.setdefault(seg.image, list(seg.mask["size"]))
    for i, seg in enumerate(pred.segments):
        if not 1 <= seg.image <= len(gt.images):
            raise SampleError(
                f"image index {seg.image} is out of range: the GT sample has {len(gt.images)} image(s)",
                field=f"segments[{i}].image",
                **where,
            )
        size = list(seg.mask["size"])
        expected = sizes.setdefault(seg.image, size)
        if size != expected:
            raise SampleError(
                f"mask size {size} differs from image {seg.image}'s size {expected} "
                "(masks must be at the image's original size)",
                field=f"segments[{i}].mask.size",
                **where,
            )


@dataclass
class _Pending:
    """A sample after the mask stage, waiting for phrase embeddings (no masks kept: memory stays small)."""

    id: str
    category: str
    num_images: int
    family: str | None
    gt_phrases: list[str]
    gt_images: list[int]
    iou: np.ndarray
    intersection: int
    union: int
    pred_phrases: list[str]
    pred_images: list[int]
    meteor: float
    missing: bool


class M4SegEvaluator:
    """detectron2-style evaluator: `reset`, then `process(gt, prediction)` per sample, then `evaluate()`.

    ``embed`` maps phrases to unit-norm embeddings (default: a `PhraseEmbedder` on ``phrase_model``);
    ``wordnet`` is "auto", "none", a WordNet folder, or ready `MeteorResources`.
    """

    def __init__(
        self,
        embed: metrics.EmbedFn | None = None,
        *,
        phrase_model: str | os.PathLike | None = None,
        wordnet: str | os.PathLike | MeteorResources = "auto",
        device: str = "cpu",
    ):
        if embed is None:
            from prima.evaluation.similarity import PhraseEmbedder

            embed = PhraseEmbedder(phrase_model, device=device)
        self.embed = embed
        self.meteor_resources = wordnet if isinstance(wordnet, MeteorResources) else load_wordnet(wordnet)
        self.reset()

    @property
    def phrase_model_name(self) -> str:
        return getattr(self.embed, "name", type(self.embed).__name__)

    def reset(self) -> None:
        self._pending: list[_Pending] = []

    def process(self, gt: Sample, prediction: PredictionRecord | dict | Any | None) -> None:
        """Score the masks and answer text of one sample.

        ``prediction`` is a PredictionRecord, its JSON dict (``{"answer", "segments"}``, id optional),
        an object with ``to_json()`` such as the predictor's `Prediction`, or None (nothing predicted).
        """
        missing = prediction is None
        if missing:
            prediction = PredictionRecord(gt.id, "", [])
        else:
            if not isinstance(prediction, PredictionRecord):
                d = prediction.to_json() if hasattr(prediction, "to_json") else prediction
                prediction = prediction_from_dict({"id": gt.id, **d} if isinstance(d, dict) else d)
            check_prediction(prediction, gt)
        pred = prediction.segments
        inter, union = metrics.intersection_union(pred, gt.segments)
        self._pending.append(
            _Pending(
                id=gt.id,
                category=gt.category,
                num_images=len(gt.images),
                family=gt.family,
                gt_phrases=[s.phrase for s in gt.segments],
                gt_images=[s.image for s in gt.segments],
                iou=metrics.iou_matrix(pred, gt.segments),
                intersection=inter,
                union=union,
                pred_phrases=[s.phrase for s in pred],
                pred_images=[s.image for s in pred],
                meteor=metrics.meteor(gt.answer, prediction.answer, self.meteor_resources.wordnet),
                missing=missing,
            )
        )

    def sample_scores(self) -> list[metrics.SampleScore]:
        """Per-sample scores of everything processed so far (embeds all distinct phrases first)."""
        prefetch = getattr(self.embed, "prefetch", None)
        if prefetch is not None:
            phrases = {p for x in self._pending for p in x.pred_phrases}
            phrases.update(p for x in self._pending for p in x.gt_phrases)
            prefetch(sorted(phrases))
        return [
            metrics.finish_sample(
                x.id,
                x.iou,
                x.intersection,
                x.union,
                x.pred_phrases,
                x.pred_images,
                x.gt_phrases,
                x.gt_images,
                x.meteor,
                self.embed,
                category=x.category,
                num_images=x.num_images,
                family=x.family,
                missing=x.missing,
            )
            for x in self._pending
        ]

    def evaluate(self) -> dict[str, Any]:
        """metrics.json's content: overall metrics, `by_category`, `by_num_images`, `by_family`, provenance; and under
        `metrics.PER_SAMPLE_KEY` each sample's `SampleScore` as a dict, which `write_outputs` writes to
        scores.jsonl instead."""
        scores = self.sample_scores()
        result = metrics.aggregate(scores)
        result["by_category"] = metrics.aggregate_by(scores, lambda s: s.category)
        result["by_num_images"] = metrics.aggregate_by(scores, lambda s: s.num_images)
        if any(s.family is not None for s in scores):
            result["by_family"] = metrics.aggregate_by(scores, lambda s: s.family or NO_FAMILY)
        result["missing_prediction_ids"] = [s.id for s in scores if s.missing]
        result["phrase_model"] = self.phrase_model_name
        result["meteor_resources"] = self.meteor_resources.description
        result[metrics.PER_SAMPLE_KEY] = [asdict(s) for s in scores]
        return result


def score_predictions(
    predictions: str | os.PathLike,
    ground_truth: str | os.PathLike | Sequence[Sample],
    out_dir: str | os.PathLike | None = None,
    *,
    phrase_model: str | os.PathLike | None = None,
    wordnet: str | os.PathLike | MeteorResources = "auto",
    embed: metrics.EmbedFn | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Score a predictions JSONL against GT (a samples JSONL or samples); with ``out_dir`` also write
    metrics.json, report.md and the plots there. Returns metrics.json's content.

    GT images need not exist: sizes come from the RLE masks. Every prediction must answer a GT sample.
    """
    preds = read_predictions(predictions)
    if isinstance(ground_truth, (str, os.PathLike)):
        gt_name = str(ground_truth)
        gt_samples: Iterable[Sample] = iter_samples(ground_truth, check_images=False)
    else:
        gt_name = "(samples given in memory)"
        gt_samples = ground_truth
    evaluator = M4SegEvaluator(embed, phrase_model=phrase_model, wordnet=wordnet, device=device)
    seen: set[str] = set()
    for gt in gt_samples:
        seen.add(gt.id)
        evaluator.process(gt, preds.get(gt.id))
    unknown = [p for p in preds.values() if p.id not in seen]
    if unknown:
        first = min(unknown, key=lambda p: p.line or 0)
        raise SampleError(
            f"no ground-truth sample has this id ({len(unknown)} prediction(s) like this); "
            "are the predictions and ground truth from the same split?",
            path=first.path,
            line=first.line,
            sample_id=first.id,
            field="id",
        )
    if not seen:
        raise PrimaError(f"the ground truth {gt_name} has no samples")
    result = evaluator.evaluate()
    result["predictions"] = str(predictions)
    result["ground_truth"] = gt_name
    if out_dir is not None:
        from prima.evaluation.report import write_outputs

        write_outputs(result, out_dir)
    return result
