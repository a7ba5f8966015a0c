"""Every M4Seg metric, defined once (DESIGN §4): per-sample scores and how they aggregate.

A prediction and its ground truth are each a list of segments (phrase, 1-based image index, COCO
RLE mask) plus the answer text. Per sample:

- **mIoU** (GLaMM): IoU matrix predicted × GT masks, 0 for a pair on different images; greedy
  one-to-one pairing that takes the highest remaining IoU while it is > 0 (ties: lowest predicted
  index, then lowest GT index, as numpy's row-major argmax in GLaMM's code); the sample's score is
  the mean IoU of its pairs, 0 when nothing pairs. Averaged over samples with GT masks. Extra or
  missing predictions do not lower a sample's mIoU except by leaving GT masks unpaired: this is
  GLaMM's definition, which Recall complements.
- **Recall** (GLaMM): the same IoU matrix, GT × predicted; repeatedly take the highest remaining IoU
  (ties: lowest GT index, then lowest predicted index) and stop at the first such pair whose IoU
  < 0.5 or whose phrase similarity < 0.5, even when a lower pair would pass both. Matched pairs are
  true positives; Recall = Σ TP / Σ #GT segments over the set.
- **SS / SIoU**: over the mIoU pairs, the mean clipped cosine similarity of the phrase embeddings
  (SS) and the mean word-set IoU of the phrases (SIoU); 0 when nothing pairs; averaged over samples
  with GT masks.
- **I-SS / I-SIoU**: per image that has a GT or a predicted phrase, the set of predicted phrases on
  it vs the set of GT phrases on it: clipped cosine of the means of their embeddings (I-SS) and IoU
  of the union of their words (I-SIoU); an image with phrases on one side only scores 0. Averaged
  over those images, then over samples with GT masks.
- **METEOR**: nltk's `meteor_score` of the predicted vs GT answer, both stripped of markup,
  lowercased and split into words and punctuation; WordNet synonyms when a reader is given, else
  exact + Porter-stem matches only. An empty answer on either side scores 0.
- **gIoU / cIoU** (LISA): per sample, I = Σ over images of |∪pred ∩ ∪GT| and U = Σ |∪pred ∪ ∪GT|
  (all predicted, resp. GT, masks of an image merged); gIoU = mean over all samples of I/U, where a
  sample with U = 0 (no mask on either side) scores 1, as LISA's `acc_iou[union == 0] += 1.0`;
  cIoU = Σ I / Σ U.
- **no-mask accuracy**: over samples whose GT has no segment, the share whose prediction has none.

An empty phrase (or one without letters or digits) is similar to nothing: its embedding is the zero
vector and its word set is empty, so every similarity and IoU involving it is 0. Aggregates of a
group in which no sample qualifies for a metric are None (null in JSON).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from prima.data.masks import _as_compressed, rle_iou_matrix
from prima.data.schema import Segment, strip_markup

IOU_THRESHOLD = 0.5  # GLaMM's Recall: a match needs IoU >= 0.5 ...
SIMILARITY_THRESHOLD = 0.5  # ... and phrase cosine similarity >= 0.5

METRIC_KEYS = ("miou", "recall", "ss", "siou", "i_ss", "i_siou", "meteor", "giou", "ciou", "no_mask_acc")

# (n, d) unit-norm rows, one per phrase; a zero row for a phrase with nothing to embed.
EmbedFn = Callable[[Sequence[str]], np.ndarray]

_WORD_RE = re.compile(r"[a-z0-9]+")
_METEOR_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


# --- masks ---------------------------------------------------------------------------------------


def iou_matrix(pred: Sequence[Segment], gt: Sequence[Segment]) -> np.ndarray:
    """IoU of every predicted mask (rows) with every GT mask (columns); 0 for pairs on different images.

    Masks on the same image must share a size (the scorer checks this and names the line if not).
    """
    out = np.zeros((len(pred), len(gt)))
    # One pycocotools call per mask size (usually one per sample), then pairs across images are zeroed.
    for size in {tuple(s.mask["size"]) for s in pred} & {tuple(s.mask["size"]) for s in gt}:
        rows = [i for i, s in enumerate(pred) if tuple(s.mask["size"]) == size]
        cols = [j for j, s in enumerate(gt) if tuple(s.mask["size"]) == size]
        block = rle_iou_matrix([pred[i].mask for i in rows], [gt[j].mask for j in cols])
        same_image = np.equal.outer([pred[i].image for i in rows], [gt[j].image for j in cols])
        out[np.ix_(rows, cols)] = np.where(same_image, block, 0.0)
    return out


def intersection_union(pred: Sequence[Segment], gt: Sequence[Segment]) -> tuple[int, int]:
    """LISA-style (I, U) of a sample: per image, all predicted masks merged vs all GT masks merged; summed."""
    inter = union = 0
    for image in {s.image for s in pred} | {s.image for s in gt}:
        p = _merged([s.mask for s in pred if s.image == image])
        g = _merged([s.mask for s in gt if s.image == image])
        area_p = int(mask_utils.area(p)) if p is not None else 0
        area_g = int(mask_utils.area(g)) if g is not None else 0
        i = int(mask_utils.area(mask_utils.merge([p, g], intersect=True))) if p is not None and g is not None else 0
        inter += i
        union += area_p + area_g - i
    return inter, union


def _merged(rles: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not rles:
        return None
    compressed = [_as_compressed(r) for r in rles]
    return compressed[0] if len(compressed) == 1 else mask_utils.merge(compressed, intersect=False)


def giou_of(inter: int, union: int) -> float:
    """A sample's LISA IoU: I/U, and 1 when neither side has any mask pixel (U = 0)."""
    return inter / union if union else 1.0


# --- greedy matching -----------------------------------------------------------------------------


def miou_pairs(iou: np.ndarray) -> list[tuple[int, int]]:
    """GLaMM's mIoU pairing on a predicted × GT IoU matrix: ``(pred, gt)`` pairs, highest IoU first."""
    m = np.array(iou, dtype=np.float64, copy=True)
    pairs = []
    while m.size and m.max() > 0:
        i, j = np.unravel_index(np.argmax(m), m.shape)  # first maximum in row-major order breaks ties
        pairs.append((int(i), int(j)))
        m[i, :] = -1.0
        m[:, j] = -1.0
    return pairs


def sample_miou(iou: np.ndarray, pairs: list[tuple[int, int]] | None = None) -> float:
    """Mean IoU of the GLaMM pairs of a predicted × GT IoU matrix; 0 when nothing pairs."""
    pairs = miou_pairs(iou) if pairs is None else pairs
    return _mean([float(iou[i, j]) for i, j in pairs])


def _mean(values: Sequence[float]) -> float:
    """Mean of a short list, 0 when empty (numpy's mean costs more than the metrics on 4 segments)."""
    return sum(values) / len(values) if values else 0.0


def recall_matches(
    iou_gt_pred: np.ndarray,
    similarity_gt_pred: np.ndarray,
    iou_threshold: float = IOU_THRESHOLD,
    similarity_threshold: float = SIMILARITY_THRESHOLD,
) -> list[tuple[int, int]]:
    """GLaMM's Recall matching on GT × predicted matrices: ``(gt, pred)`` true positives.

    Takes the highest remaining IoU each round and stops at the first one that fails either
    threshold, even if a lower-IoU pair would pass both (GLaMM's `find_best_matches`).
    """
    m = np.array(iou_gt_pred, dtype=np.float64, copy=True)
    matches = []
    while m.size:
        g, p = np.unravel_index(np.argmax(m), m.shape)
        if m[g, p] < iou_threshold or similarity_gt_pred[g, p] < similarity_threshold:
            break
        matches.append((int(g), int(p)))
        m[g, :] = -1.0
        m[:, p] = -1.0
    return matches


# --- phrases -------------------------------------------------------------------------------------


@lru_cache(maxsize=65536)
def phrase_words(phrase: str) -> frozenset[str]:
    """The word set SIoU compares: lowercased runs of letters and digits ("chair's back" -> chair, s, back)."""
    return frozenset(_WORD_RE.findall(phrase.lower()))


def word_set_iou(a: set[str] | frozenset[str], b: set[str] | frozenset[str]) -> float:
    """|a ∩ b| / |a ∪ b|; 0 when either set is empty (an empty phrase matches nothing)."""
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


def phrase_siou(a: str, b: str) -> float:
    return word_set_iou(phrase_words(a), phrase_words(b))


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of unit-norm (or zero) rows; a zero row is 0-similar to everything."""
    return np.asarray(a, dtype=np.float64) @ np.asarray(b, dtype=np.float64).T


def clipped(x: float) -> float:
    """A cosine as a score in [0, 1]: negatives (rare for sentence models) count as 0."""
    return float(min(max(x, 0.0), 1.0))


def set_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Clipped cosine of the mean embeddings of two phrase sets; 0 if either set is empty or all-zero."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    sa, sb = np.asarray(a, np.float64).sum(0), np.asarray(b, np.float64).sum(0)  # same direction as the means
    na, nb = math.sqrt(float(sa @ sa)), math.sqrt(float(sb @ sb))
    if na == 0 or nb == 0:
        return 0.0
    return clipped(float(sa @ sb) / (na * nb))


@dataclass
class PhraseScores:
    """The phrase-dependent scores of one sample (those that need embeddings)."""

    true_positives: int
    ss: float
    siou: float
    i_ss: float
    i_siou: float


def phrase_scores(
    iou: np.ndarray,
    pred_phrases: Sequence[str],
    pred_images: Sequence[int],
    gt_phrases: Sequence[str],
    gt_images: Sequence[int],
    embed: EmbedFn,
    pairs: list[tuple[int, int]] | None = None,
) -> PhraseScores:
    """Recall TPs, SS, SIoU, I-SS and I-SIoU of a sample from its predicted × GT IoU matrix and phrases.

    ``pairs`` are `miou_pairs(iou)` when the caller has them already.
    """
    pe = _embeddings(embed, pred_phrases)
    ge = _embeddings(embed, gt_phrases)
    sim_gt_pred = cosine_matrix(ge, pe) if len(ge) and len(pe) else np.zeros((len(ge), len(pe)))
    tp = len(recall_matches(iou.T, sim_gt_pred))
    pairs = miou_pairs(iou) if pairs is None else pairs
    ss = _mean([clipped(sim_gt_pred[j, i]) for i, j in pairs])
    siou = _mean([phrase_siou(pred_phrases[i], gt_phrases[j]) for i, j in pairs])
    i_ss_values, i_siou_values = [], []
    for image in sorted(set(pred_images) | set(gt_images)):
        pi = _distinct_indices(pred_phrases, pred_images, image)
        gi = _distinct_indices(gt_phrases, gt_images, image)
        i_ss_values.append(set_cosine(pe[pi], ge[gi]))
        pw = set().union(*(phrase_words(pred_phrases[i]) for i in pi))
        gw = set().union(*(phrase_words(gt_phrases[j]) for j in gi))
        i_siou_values.append(word_set_iou(pw, gw))
    return PhraseScores(tp, ss, siou, _mean(i_ss_values), _mean(i_siou_values))


def _embeddings(embed: EmbedFn, phrases: Sequence[str]) -> np.ndarray:
    if not phrases:
        return np.zeros((0, 1))
    return np.asarray(embed(list(phrases)), dtype=np.float64)


def _distinct_indices(phrases: Sequence[str], images: Sequence[int], image: int) -> list[int]:
    """Indices of the distinct phrases grounded on ``image`` (a phrase set counts each phrase once)."""
    seen: dict[str, int] = {}
    for i, (p, k) in enumerate(zip(phrases, images)):
        if k == image and p not in seen:
            seen[p] = i
    return list(seen.values())


# --- answer text ---------------------------------------------------------------------------------


def meteor_tokens(answer: str) -> list[str]:
    """The tokens METEOR compares: markup stripped, lowercased, words and punctuation marks."""
    return _METEOR_TOKEN_RE.findall(strip_markup(answer).lower())


class _NoWordNet:
    """Stands in for a WordNet reader when none is installed: no synonyms, so exact + stem matching only."""

    def synsets(self, word: str) -> list:
        return []


class _CachedStemmer:
    """nltk's Porter stemmer (METEOR's default) with a memo: answers repeat words, stemming dominated scoring."""

    def __init__(self) -> None:
        from nltk.stem.porter import PorterStemmer

        self._stemmer = PorterStemmer()
        self._memo: dict[str, str] = {}

    def stem(self, word: str) -> str:
        out = self._memo.get(word)
        if out is None:
            out = self._memo[word] = self._stemmer.stem(word)
        return out


_STEMMER: _CachedStemmer | None = None


def meteor(reference: str, hypothesis: str, wordnet: Any = None) -> float:
    """nltk METEOR of a predicted answer against the GT answer (markup stripped); 0 if either is empty."""
    global _STEMMER
    from nltk.translate.meteor_score import meteor_score

    ref, hyp = meteor_tokens(reference), meteor_tokens(hypothesis)
    if not ref or not hyp:
        return 0.0
    if _STEMMER is None:
        _STEMMER = _CachedStemmer()
    return float(meteor_score([ref], hyp, stemmer=_STEMMER, wordnet=wordnet if wordnet is not None else _NoWordNet()))


# --- one sample, and aggregation -----------------------------------------------------------------


@dataclass
class SampleScore:
    """Every metric's per-sample ingredients; `aggregate` turns a list of them into the reported numbers."""

    id: str
    category: str
    num_images: int
    family: str | None
    num_gt: int
    num_pred: int
    miou: float | None  # None when the GT has no mask (the sample is not in mIoU's mean)
    true_positives: int
    ss: float | None
    siou: float | None
    i_ss: float | None
    i_siou: float | None
    meteor: float
    intersection: int
    union: int
    no_mask_correct: bool | None  # None when the GT has masks
    missing: bool = False  # no prediction was given for this sample


def score_sample(
    sample_id: str,
    gt_segments: Sequence[Segment],
    pred_segments: Sequence[Segment],
    gt_answer: str,
    pred_answer: str,
    embed: EmbedFn,
    *,
    category: str = "",
    num_images: int = 1,
    family: str | None = None,
    wordnet: Any = None,
    missing: bool = False,
) -> SampleScore:
    """All metrics of one sample (the scorer does the same in two passes to batch the embeddings)."""
    iou = iou_matrix(pred_segments, gt_segments)
    inter, union = intersection_union(pred_segments, gt_segments)
    return finish_sample(
        sample_id,
        iou,
        inter,
        union,
        [s.phrase for s in pred_segments],
        [s.image for s in pred_segments],
        [s.phrase for s in gt_segments],
        [s.image for s in gt_segments],
        meteor(gt_answer, pred_answer, wordnet),
        embed,
        category=category,
        num_images=num_images,
        family=family,
        missing=missing,
    )


def finish_sample(
    sample_id: str,
    iou: np.ndarray,
    inter: int,
    union: int,
    pred_phrases: Sequence[str],
    pred_images: Sequence[int],
    gt_phrases: Sequence[str],
    gt_images: Sequence[int],
    meteor_value: float,
    embed: EmbedFn,
    *,
    category: str = "",
    num_images: int = 1,
    family: str | None = None,
    missing: bool = False,
) -> SampleScore:
    """A SampleScore from the mask-stage results (IoU matrix, I, U, METEOR) and the phrases."""
    has_gt = len(gt_phrases) > 0
    if has_gt:
        pairs = miou_pairs(iou)
        ps = phrase_scores(iou, pred_phrases, pred_images, gt_phrases, gt_images, embed, pairs)
    return SampleScore(
        id=sample_id,
        category=category,
        num_images=num_images,
        family=family,
        num_gt=len(gt_phrases),
        num_pred=len(pred_phrases),
        miou=sample_miou(iou, pairs) if has_gt else None,
        true_positives=ps.true_positives if has_gt else 0,
        ss=ps.ss if has_gt else None,
        siou=ps.siou if has_gt else None,
        i_ss=ps.i_ss if has_gt else None,
        i_siou=ps.i_siou if has_gt else None,
        meteor=meteor_value,
        intersection=inter,
        union=union,
        no_mask_correct=None if has_gt else len(pred_phrases) == 0,
        missing=missing,
    )


PER_SAMPLE_KEY = "per_sample"  # the key of evaluate()'s per-sample rows (`SampleScore` as a dict): scores.jsonl


def aggregate(scores: Iterable[SampleScore]) -> dict[str, Any]:
    """The reported numbers of a set of samples: every key of METRIC_KEYS (in [0, 1] or None) plus counts."""
    scores = list(scores)

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    with_gt = [s for s in scores if s.num_gt > 0]
    negatives = [s for s in scores if s.no_mask_correct is not None]
    num_gt = sum(s.num_gt for s in scores)
    total_union = sum(s.union for s in scores)
    return {
        "miou": mean([s.miou for s in with_gt]),
        "recall": sum(s.true_positives for s in scores) / num_gt if num_gt else None,
        "ss": mean([s.ss for s in with_gt]),
        "siou": mean([s.siou for s in with_gt]),
        "i_ss": mean([s.i_ss for s in with_gt]),
        "i_siou": mean([s.i_siou for s in with_gt]),
        "meteor": mean([s.meteor for s in scores]),
        "giou": mean([giou_of(s.intersection, s.union) for s in scores]),
        "ciou": sum(s.intersection for s in scores) / total_union if total_union else None,
        "no_mask_acc": mean([float(s.no_mask_correct) for s in negatives]),
        "num_samples": len(scores),
        "num_with_masks": len(with_gt),
        "num_without_masks": len(negatives),
        "num_gt_segments": num_gt,
        "num_pred_segments": sum(s.num_pred for s in scores),
        "num_missing_predictions": sum(s.missing for s in scores),
    }


def aggregate_by(scores: Sequence[SampleScore], key: Callable[[SampleScore], Any]) -> dict[str, dict[str, Any]]:
    """`aggregate` per group, groups named by ``str(key(score))`` and sorted (numbers numerically)."""
    groups: dict[Any, list[SampleScore]] = {}
    for s in scores:
        groups.setdefault(key(s), []).append(s)
    numbers = sorted(k for k in groups if isinstance(k, (int, float)))
    names = sorted((k for k in groups if not isinstance(k, (int, float))), key=str)
    return {str(k): aggregate(groups[k]) for k in numbers + names}
