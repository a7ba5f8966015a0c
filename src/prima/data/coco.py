"""COCO-format annotation files: load them once into an index of images, categories and annotations.

Both real-data converters read these files: `prima data m4seg` resolves M4Seg's image ids and a part's
``obj_ann_id`` through them, and `prima data build` makes samples from their instance masks. Entries
that can't be used (an annotation on an unknown image or category, an image entry without a size) are
skipped and counted in ``CocoIndex.skipped`` so the caller can report them; a file that is not a COCO
annotation file at all is a PrimaError.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pycocotools import mask as mask_utils

from prima.data.jsonstream import JsonStream
from prima.data.masks import RLE
from prima.errors import PrimaError

Id = int | str


def normalize_id(value: Any) -> Id:
    """The id as an int when it is one (``123`` and ``"123"`` are the same image), else as a string.

    M4Seg stores PACO-LVIS and PASCAL-Part image ids as strings of digits while the annotation files
    use integers; comparing normalised ids makes both spellings resolve.
    """
    if isinstance(value, bool):
        raise TypeError("a boolean is not an id")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        return text
    raise TypeError(f"expected an int or string id, got {type(value).__name__}")


# COCO-panoptic names its merged stuff classes "sky-other-merged", "wall-brick" etc.; the suffixes
# below carry no meaning in a sentence.
_PANOPTIC_SUFFIX_RE = re.compile(r"(?:-(?:merged|other|stuff))+$")
_QUALIFIER_RE = re.compile(r"_\(.*\)$")  # LVIS disambiguation: "mouse_(computer_equipment)"


def display_name(name: str) -> str:
    """A category name as words for a sentence: ``trash_can`` -> ``trash can``, ``car_(automobile)`` -> ``car``.

    For a PACO part category ``object:part`` only the part is returned (``chair:seat`` -> ``seat``);
    COCO-panoptic suffixes go (``sky-other-merged`` -> ``sky``). This follows the cleaning that the
    PRIMA reference loader applies to PACO-LVIS and PASCAL-Part names.
    """
    name = name.strip().split(":")[-1]
    name = _QUALIFIER_RE.sub("", name)
    name = _PANOPTIC_SUFFIX_RE.sub("", name)
    return " ".join(name.replace("_", " ").split())


def split_part_name(name: str) -> tuple[str, str] | None:
    """``("chair", "seat")`` for a PACO-style part category ``chair:seat``; None for an object category."""
    if ":" not in name:
        return None
    obj, part = name.split(":", 1)
    return obj, part


@dataclass(frozen=True, slots=True)
class ImageInfo:
    id: Id
    file_name: str
    height: int
    width: int


@dataclass(frozen=True)
class Category:
    id: Id
    name: str  # as in the file, e.g. "chair:seat"
    isthing: bool = True  # False for COCO-panoptic stuff (sky, grass): not countable, no left/right

    @property
    def part_of(self) -> str | None:
        """The object category name when this is a part category (``chair`` for ``chair:seat``)."""
        split = split_part_name(self.name)
        return split[0] if split else None


@dataclass(slots=True)
class Annotation:
    id: Id
    image_id: Id
    category_id: Id
    segmentation: Any = None  # None when the index was loaded without segmentations
    iscrowd: bool = False
    obj_ann_id: Id | None = None  # the object annotation a part annotation belongs to (PACO)


@dataclass
class CocoIndex:
    """The parts of one COCO annotation file that the converters use, keyed by normalised id."""

    path: Path
    images: dict[Id, ImageInfo] = field(default_factory=dict)
    categories: dict[Id, Category] = field(default_factory=dict)
    annotations: dict[Id, Annotation] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)  # reason -> entries skipped while loading
    examples: list[str] = field(default_factory=list)  # the first few skipped entries, for people

    def image(self, image_id: Any) -> ImageInfo | None:
        try:
            return self.images.get(normalize_id(image_id))
        except TypeError:
            return None

    def annotation(self, ann_id: Any) -> Annotation | None:
        try:
            return self.annotations.get(normalize_id(ann_id))
        except TypeError:
            return None

    def category(self, category_id: Any) -> Category | None:
        try:
            return self.categories.get(normalize_id(category_id))
        except TypeError:
            return None

    def skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{self.path}: {detail}")


def read_json_file(path: str | os.PathLike, what: str) -> Any:
    """Parse a whole JSON file, turning a missing or broken file into a PrimaError that says which."""
    path = Path(path)
    if not path.is_file():
        raise PrimaError(f"{what} not found: {path}")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise PrimaError(f"{path}:{e.lineno}:{e.colno}: invalid JSON in {what}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise PrimaError(f"{path}: {what} is not UTF-8 text ({e.reason})") from None


def load_coco(
    path: str | os.PathLike,
    *,
    keep_segmentations: bool = True,
    stuff_categories: dict[Id, bool] | None = None,
) -> CocoIndex:
    """Load a COCO-format annotation file (``images``, ``categories``, optional ``annotations``).

    The file is streamed entry by entry (``prima.data.jsonstream``), so a PACO-LVIS file of several
    hundred MB never sits in memory as one parsed tree. ``keep_segmentations=False`` drops the masks
    as they are read, for callers that only need the id lookups (M4Seg carries its own masks).
    ``stuff_categories`` maps category id -> isthing, for files whose categories lack
    COCO-panoptic's ``isthing`` flag (see ``load_isthing``).
    """
    path = Path(path)
    if not path.is_file():
        raise PrimaError(f"COCO annotation file not found: {path}")
    index = CocoIndex(path=path)
    lists: dict[str, bool] = {}
    annotations: list[Annotation] = []
    with _open_text(path, "COCO annotation file") as f:
        stream = JsonStream(f, path=path)
        if stream.peek() != "{":
            raise PrimaError(f"{path}: expected a COCO annotation object with 'images' and 'categories'")
        for key, value in stream.object_items("the COCO annotation file"):
            if key not in ("images", "categories", "annotations"):
                value.value(f"'{key}'")  # info, licenses, ...: not needed
                continue
            if value.peek() != "[":
                raise PrimaError(f"{path}: '{key}' must be a list, got {value.value(repr(key))!r:.60}")
            lists[key] = True
            for i, entry in enumerate(value.array(f"{key}[]")):
                if key == "images":
                    _add_image(index, i, entry)
                elif key == "categories":
                    _add_category(index, i, entry, stuff_categories)
                else:
                    ann = _read_annotation(index, i, entry, keep_segmentations)
                    if ann is not None:
                        annotations.append(ann)
    for key in ("images", "categories"):
        if key not in lists:
            raise PrimaError(f"{path}: a COCO annotation file needs a list '{key}'; this one has none")
    # Annotations usually come before categories in the file: check their references once all is read.
    for ann in annotations:
        if ann.image_id not in index.images:
            index.skip(
                "annotation on an unknown image", f"annotation {ann.id} names image {ann.image_id}, not in 'images'"
            )
        elif ann.category_id not in index.categories:
            index.skip(
                "annotation of an unknown category",
                f"annotation {ann.id} names category {ann.category_id}, not in 'categories'",
            )
        else:
            index.annotations[ann.id] = ann
    return index


def _add_image(index: CocoIndex, i: int, im: Any) -> None:
    try:
        info = ImageInfo(normalize_id(im["id"]), str(im["file_name"]), int(im["height"]), int(im["width"]))
    except (KeyError, TypeError, ValueError) as e:
        index.skip("image entry without id/file_name/height/width", f"images[{i}] is unusable ({e!r})")
        return
    if info.height <= 0 or info.width <= 0:
        index.skip("image entry without id/file_name/height/width", f"images[{i}] has size {info.height}x{info.width}")
        return
    index.images[info.id] = info


def _add_category(index: CocoIndex, i: int, cat: Any, stuff_categories: dict[Id, bool] | None) -> None:
    try:
        cid = normalize_id(cat["id"])
        name = str(cat["name"])
    except (KeyError, TypeError) as e:
        index.skip("category entry without id/name", f"categories[{i}] is unusable ({e!r})")
        return
    isthing = bool(cat.get("isthing", 1))
    if stuff_categories is not None and cid in stuff_categories:
        isthing = stuff_categories[cid]
    index.categories[cid] = Category(cid, name, isthing)


def _read_annotation(index: CocoIndex, i: int, ann: Any, keep_segmentations: bool) -> Annotation | None:
    try:
        obj = ann.get("obj_ann_id")
        return Annotation(
            id=normalize_id(ann["id"]),
            image_id=normalize_id(ann["image_id"]),
            category_id=normalize_id(ann["category_id"]),
            segmentation=ann.get("segmentation") if keep_segmentations else None,
            iscrowd=bool(ann.get("iscrowd", 0)),
            obj_ann_id=None if obj is None else normalize_id(obj),
        )
    except (KeyError, TypeError, AttributeError) as e:
        index.skip("annotation without id/image_id/category_id", f"annotations[{i}] is unusable ({e!r})")
        return None


def _open_text(path: Path, what: str) -> TextIO:
    try:
        return path.open("r", encoding="utf-8")
    except OSError as e:
        raise PrimaError(f"cannot open {what} {path}: {e.strerror}") from None


def load_isthing(path: str | os.PathLike) -> dict[Id, bool]:
    """Category id -> isthing from a category list such as COCO-panoptic's ``panoptic_coco_categories.json``.

    Accepts a JSON list of categories or an object with a ``categories`` list; a category without
    ``isthing`` counts as a thing.
    """
    data = read_json_file(path, "category file")
    cats = data.get("categories") if isinstance(data, dict) else data
    if not isinstance(cats, list):
        raise PrimaError(f"{path}: expected a list of categories (or an object with 'categories')")
    out: dict[Id, bool] = {}
    for i, cat in enumerate(cats):
        if not isinstance(cat, dict) or "id" not in cat:
            raise PrimaError(f"{path}: categories[{i}] has no 'id'")
        out[normalize_id(cat["id"])] = bool(cat.get("isthing", 1))
    return out


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> RLE:
    """Any COCO segmentation (polygons, compressed or uncompressed RLE) as compressed RLE at (height, width).

    Works on run lengths, never on pixels, except to check a compressed RLE string (pycocotools has no
    cheaper check): at 480x640 that is ~0.1 ms for polygons against ~0.9 ms to rasterise and re-encode.
    JSON text (as parquet exports keep nested fields) is parsed first. Raises ValueError, with a
    message for people, for a segmentation that can't be decoded, one whose RLE size differs from the
    image, or one that covers no pixel.
    """
    if isinstance(segmentation, str):
        try:
            segmentation = json.loads(segmentation)
        except json.JSONDecodeError:
            raise ValueError("the segmentation is a string but not JSON") from None
    try:
        rle = _to_compressed(segmentation, height, width)
    except ValueError:
        raise
    except Exception as e:  # pycocotools raises TypeError/IndexError/... for malformed input
        raise ValueError(f"{type(e).__name__}: {e}") from None
    if mask_utils.area(rle) == 0:
        raise ValueError("the segmentation covers no pixel")
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode("utf-8") if isinstance(counts, bytes) else counts}


def _to_compressed(segmentation: Any, height: int, width: int) -> dict:
    if isinstance(segmentation, list):
        polygons = [[float(v) for v in p] for p in segmentation]
        if not polygons:
            raise ValueError("the polygon list is empty")
        for i, p in enumerate(polygons):
            if len(p) < 6 or len(p) % 2:
                raise ValueError(f"polygon {i} has {len(p)} coordinates; need an even number, at least 6")
        return mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    if not (isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation):
        raise ValueError(f"unrecognised segmentation of type {type(segmentation).__name__}")
    size = [int(v) for v in segmentation["size"]]
    if size != [height, width]:
        raise ValueError(f"RLE size {size} differs from the image size {[height, width]}")
    counts = segmentation["counts"]
    if isinstance(counts, list):  # uncompressed, as COCO stores crowd regions
        if sum(int(c) for c in counts) != height * width or any(int(c) < 0 for c in counts):
            raise ValueError(f"the RLE run lengths do not add up to {height}x{width} pixels")
        return mask_utils.frPyObjects({"size": size, "counts": counts}, height, width)
    rle = {"size": size, "counts": counts.encode("utf-8") if isinstance(counts, str) else counts}
    mask_utils.decode(rle)  # the only check that a compressed string is well formed
    return rle


def rle_box(rle: RLE) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)``, x1/y1 exclusive, of a compressed RLE's pixels, without decoding it."""
    x, y, w, h = (int(round(v)) for v in mask_utils.toBbox(_bytes_rle(rle)))
    return x, y, x + w, y + h


def rle_pixels(rle: RLE) -> int:
    return int(mask_utils.area(_bytes_rle(rle)))


def _bytes_rle(rle: RLE) -> dict:
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("utf-8") if isinstance(counts, str) else counts}
