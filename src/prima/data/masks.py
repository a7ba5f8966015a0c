"""Binary masks: COCO RLE encode/decode (counts as UTF-8 text), polygons, resizing, IoU and boxes."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

RLE = dict[str, Any]  # {"size": [h, w], "counts": str}


def encode_rle(mask: np.ndarray) -> RLE:
    """Encode an HxW boolean/0-1 mask as COCO RLE with ``counts`` as a JSON-safe string."""
    if mask.ndim != 2:
        raise ValueError(f"a mask must be 2-D (H, W), got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("utf-8")}


def _as_compressed(rle: RLE) -> dict:
    size = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, list):  # uncompressed RLE, as COCO uses for crowd annotations
        return mask_utils.frPyObjects({"size": list(size), "counts": counts}, int(size[0]), int(size[1]))
    if isinstance(counts, str):
        counts = counts.encode("utf-8")
    return {"size": [int(size[0]), int(size[1])], "counts": counts}


def _decode(rle: dict) -> np.ndarray:
    # pycocotools' Cython decoder trips numpy 2's copy-keyword DeprecationWarning on every call; the
    # result is correct, so hide that one warning instead of flooding every caller's log.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        return mask_utils.decode(rle)


def decode_rle(rle: RLE) -> np.ndarray:
    """Decode compressed (string/bytes counts) or uncompressed (list counts) RLE to an HxW bool array."""
    return _decode(_as_compressed(rle)).astype(bool)


def rle_area(rle: RLE) -> int:
    return int(mask_utils.area(_as_compressed(rle)))


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterise COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` (one instance, maybe several parts)."""
    polys = [list(map(float, p)) for p in polygons]
    for i, p in enumerate(polys):
        if len(p) < 6 or len(p) % 2:
            raise ValueError(f"polygon {i} has {len(p)} coordinates; need an even number, at least 6")
    rles = mask_utils.frPyObjects(polys, height, width)
    return _decode(mask_utils.merge(rles)).astype(bool)


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Any COCO ``segmentation`` (polygon list, compressed or uncompressed RLE) to an HxW bool mask."""
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        mask = decode_rle(segmentation)
        if mask.shape != (height, width):
            raise ValueError(f"RLE size {list(mask.shape)} differs from the image size {[height, width]}")
        return mask
    raise ValueError(f"unrecognised segmentation of type {type(segmentation).__name__}")


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``size`` = (height, width)."""
    h, w = mask.shape
    th, tw = size
    if (h, w) == (th, tw):
        return mask.astype(bool)
    rows = np.minimum(((np.arange(th) + 0.5) * h / th).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(tw) + 0.5) * w / tw).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]].astype(bool)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two same-sized bool masks; two empty masks have IoU 0."""
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def rle_iou_matrix(pred: Sequence[RLE], gt: Sequence[RLE]) -> np.ndarray:
    """IoU of every predicted RLE with every GT RLE (all must share one size), via pycocotools."""
    if not pred or not gt:
        return np.zeros((len(pred), len(gt)))
    p = [_as_compressed(r) for r in pred]
    g = [_as_compressed(r) for r in gt]
    return np.asarray(mask_utils.iou(p, g, [0] * len(g)), dtype=np.float64).reshape(len(p), len(g))


MASK_REGIONS = ("all", "largest", "supported")


def connected_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The connected regions (8-neighbourhood) of a bool mask: a label map (0 outside, 1..n) and n."""
    from scipy import ndimage

    return ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))


def binarize(probs: np.ndarray, threshold: float, regions: str = "all") -> np.ndarray:
    """The mask of a probability map: pixels at ``threshold`` or above; with ``regions`` "largest" only its
    connected region (8-neighbourhood) of the largest probability mass, for a phrase that names one object.
    "supported" (the region the phrase check reads the phrase in) is chosen by the model, which has the pixels'
    features (`PrimaModel`, ``grounding.mask_regions``); here it keeps the largest region of what the model left."""
    mask = probs >= threshold
    if regions == "all" or not mask.any():
        return mask
    if regions not in MASK_REGIONS:
        raise ValueError(f"regions must be one of {MASK_REGIONS}, got {regions!r}")
    labels, n = connected_regions(mask)
    if n == 1:
        return mask
    from scipy import ndimage

    mass = ndimage.sum(probs, labels, index=np.arange(1, n + 1))
    return labels == 1 + int(np.argmax(mass))


def mask_bbox(mask: np.ndarray) -> list[int]:
    """COCO box ``[x, y, w, h]`` of a bool mask; ``[0, 0, 0, 0]`` when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
