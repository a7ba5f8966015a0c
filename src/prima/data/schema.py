"""The project's sample format (DESIGN §3.1): dataclasses, JSONL read/write and validation.

Every error names the file, line, sample id and field, so a broken line in a 700K-line file can be
found and fixed without a debugger.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from prima.constants import GROUNDED_PHRASE_RE, MAX_IMAGES, SEG_RE
from prima.errors import SampleError

CATEGORIES = ("functional", "spatial", "numerical", "open-ended")
SEGMENT_KINDS = ("object", "part")


@dataclass
class Segment:
    """One grounded phrase: its mask lies in image ``image`` (1-based, as in the answer text)."""

    phrase: str
    image: int
    mask: dict[str, Any]  # COCO RLE: {"size": [h, w], "counts": str}
    kind: str = "object"
    score: float | None = None  # predictions only

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"phrase": self.phrase, "image": self.image, "kind": self.kind, "mask": self.mask}
        if self.score is not None:
            d["score"] = self.score
        return d


@dataclass
class Sample:
    id: str
    images: list[str]
    question: str
    answer: str
    category: str
    segments: list[Segment] = field(default_factory=list)
    family: str | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "images": list(self.images),
            "question": self.question,
            "answer": self.answer,
            "category": self.category,
        }
        if self.family is not None:
            d["family"] = self.family
        d["segments"] = [s.to_dict() for s in self.segments]
        if self.source is not None:
            d["source"] = self.source
        return d


def parse_answer(answer: str) -> list[tuple[str, int | None]]:
    """The ``(phrase, image)`` of every ``[SEG]`` in a grounded answer, in order.

    ``image`` is the 1-based index of the ``(IMAGEk)`` tag right after the ``[SEG]``, or None when
    the tag is missing. Phrases repeated without ``[SEG]`` (later mentions) are not returned.
    """
    out = []
    for m in GROUNDED_PHRASE_RE.finditer(answer):
        if m.group("seg"):
            out.append((m.group("phrase"), int(m.group("image")) if m.group("image") else None))
    return out


def strip_markup(answer: str) -> str:
    """The answer as plain text: phrases kept, ``<p>``, ``</p>``, ``[SEG]`` and image tags removed."""
    text = GROUNDED_PHRASE_RE.sub(lambda m: m.group("phrase"), answer)
    text = SEG_RE.sub("", text)
    return " ".join(text.split())


def _require(d: dict, key: str, types: type | tuple[type, ...], where: dict) -> Any:
    if key not in d:
        raise SampleError("missing required field", field=key, **where)
    value = d[key]
    if not isinstance(value, types) or isinstance(value, bool) and types is int:
        names = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise SampleError(f"expected {names}, got {type(value).__name__}", field=key, **where)
    return value


def segment_from_dict(d: Any, *, where: dict, index: int, prediction: bool = False) -> Segment:
    name = f"segments[{index}]"
    if not isinstance(d, dict):
        raise SampleError(f"expected an object, got {type(d).__name__}", field=name, **where)
    phrase = d.get("phrase", "")
    if not isinstance(phrase, str):
        raise SampleError("expected a string", field=f"{name}.phrase", **where)
    image = d.get("image")
    if not isinstance(image, int) or isinstance(image, bool):
        raise SampleError(f"expected a 1-based integer image index, got {image!r}", field=f"{name}.image", **where)
    mask = d.get("mask")
    if not (isinstance(mask, dict) and "size" in mask and "counts" in mask):
        raise SampleError("expected a COCO RLE object with 'size' and 'counts'", field=f"{name}.mask", **where)
    size = mask["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise SampleError(f"expected [height, width], got {size!r}", field=f"{name}.mask.size", **where)
    if not isinstance(mask["counts"], (str, list)):
        raise SampleError("expected an RLE string (or list)", field=f"{name}.mask.counts", **where)
    kind = d.get("kind", "object")
    if kind not in SEGMENT_KINDS:
        raise SampleError(f"expected one of {SEGMENT_KINDS}, got {kind!r}", field=f"{name}.kind", **where)
    score = d.get("score")
    if score is not None and not isinstance(score, (int, float)):
        raise SampleError("expected a number", field=f"{name}.score", **where)
    return Segment(phrase=phrase, image=image, mask=mask, kind=kind, score=None if score is None else float(score))


def sample_from_dict(d: Any, *, path: str | os.PathLike | None = None, line: int | None = None) -> Sample:
    """Build a Sample from one parsed JSON line, checking field types (not images or masks)."""
    where: dict[str, Any] = {"path": path, "line": line}
    if not isinstance(d, dict):
        raise SampleError(f"expected a JSON object, got {type(d).__name__}", **where)
    sample_id = _require(d, "id", (str, int), where)
    where["sample_id"] = str(sample_id)
    images = _require(d, "images", list, where)
    if not 1 <= len(images) <= MAX_IMAGES:
        raise SampleError(f"expected 1..{MAX_IMAGES} images, got {len(images)}", field="images", **where)
    for i, im in enumerate(images):
        if not isinstance(im, str) or not im:
            raise SampleError("expected a non-empty path string", field=f"images[{i}]", **where)
    question = _require(d, "question", str, where)
    answer = _require(d, "answer", str, where)
    category = _require(d, "category", str, where)
    segs = d.get("segments", [])
    if not isinstance(segs, list):
        raise SampleError("expected a list", field="segments", **where)
    segments = [segment_from_dict(s, where=where, index=i) for i, s in enumerate(segs)]
    family = d.get("family")
    source = d.get("source")
    return Sample(str(sample_id), list(images), question, answer, category, segments, family, source)


def validate_sample(
    sample: Sample,
    *,
    root: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
    line: int | None = None,
    check_images: bool = True,
    image_sizes: list[tuple[int, int]] | None = None,
) -> None:
    """Check a sample's meaning: `[SEG]` count, tags, image indices, mask sizes and readable images.

    ``root`` is the folder that image paths are relative to (the JSONL's folder). With
    ``check_images`` each image is opened (header only) to read its size; ``image_sizes``
    (height, width) can be given instead when the caller already knows them.
    """
    where = {"path": path, "line": line, "sample_id": sample.id}
    if not sample.question.strip():
        raise SampleError("the question is empty", field="question", **where)
    if sample.category not in CATEGORIES:
        raise SampleError(f"expected one of {CATEGORIES}, got {sample.category!r}", field="category", **where)
    grounded = parse_answer(sample.answer)
    n_seg = len(SEG_RE.findall(sample.answer))
    if n_seg != len(grounded):
        raise SampleError("every [SEG] must follow a '<p> phrase </p>'", field="answer", **where)
    if n_seg != len(sample.segments):
        raise SampleError(
            f"the answer has {n_seg} [SEG] token(s) but there are {len(sample.segments)} segment(s)",
            field="segments",
            **where,
        )
    n_images = len(sample.images)
    for i, ((_phrase, tag), seg) in enumerate(zip(grounded, sample.segments)):
        if tag is None:
            raise SampleError(f"[SEG] number {i + 1} has no (IMAGEk) tag after it", field="answer", **where)
        if not 1 <= seg.image <= n_images:
            raise SampleError(
                f"image index {seg.image} is out of range 1..{n_images}", field=f"segments[{i}].image", **where
            )
        if tag != seg.image:
            raise SampleError(
                f"the answer tags [SEG] number {i + 1} with (IMAGE{tag}) but the segment is on image {seg.image}",
                field=f"segments[{i}].image",
                **where,
            )
    if image_sizes is None and check_images:
        image_sizes = [image_size(resolve_image(sample, i, root), where=where, index=i) for i in range(n_images)]
    if image_sizes is not None:
        for i, seg in enumerate(sample.segments):
            h, w = image_sizes[seg.image - 1]
            if list(seg.mask["size"]) != [h, w]:
                raise SampleError(
                    f"mask size {seg.mask['size']} differs from image {seg.image}'s size [{h}, {w}]",
                    field=f"segments[{i}].mask.size",
                    **where,
                )


def resolve_image(sample: Sample, index: int, root: str | os.PathLike | None) -> Path:
    """Absolute path of the sample's image ``index`` (0-based), relative paths taken from ``root``."""
    p = Path(sample.images[index])
    return p if p.is_absolute() or root is None else Path(root) / p


def image_size(path: Path, *, where: dict | None = None, index: int = 0) -> tuple[int, int]:
    """(height, width) of an image file, reading only its header; a SampleError if it can't be read."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except FileNotFoundError:
        raise SampleError(f"image file not found: {path}", field=f"images[{index}]", **(where or {})) from None
    except Exception as e:  # PIL raises several types for unreadable files
        raise SampleError(f"cannot read image {path}: {e}", field=f"images[{index}]", **(where or {})) from None
    return h, w


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line of a JSONL file; a SampleError names the line
    of any text that is not UTF-8 or not JSON. The one JSONL reader for samples, predictions and queries."""
    path = Path(path)
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield line_no, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise SampleError(f"not UTF-8 text ({e.reason} at byte {e.start})", path=path, line=line_no) from None
            except json.JSONDecodeError as e:
                raise SampleError(f"invalid JSON: {e.msg} (column {e.colno})", path=path, line=line_no) from None


def iter_samples(path: str | os.PathLike, *, validate: bool = True, check_images: bool = True) -> Iterator[Sample]:
    """Stream the samples of a JSONL file, validating each (images relative to the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise SampleError(f"no such file: {path}")
    root = path.parent
    for line_no, d in iter_jsonl(path):
        sample = sample_from_dict(d, path=path, line=line_no)
        if validate:
            validate_sample(sample, root=root, path=path, line=line_no, check_images=check_images)
        yield sample


def read_samples(path: str | os.PathLike, **kwargs: Any) -> list[Sample]:
    return list(iter_samples(path, **kwargs))


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> int:
    """Write dict rows as JSONL atomically (temp file, then rename): a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes files private (0600); give the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return n


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_samples(path: str | os.PathLike, samples: Iterable[Sample]) -> int:
    return write_jsonl(path, (s.to_dict() for s in samples))
