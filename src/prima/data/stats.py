"""`prima data stats`: what a dataset holds, per category, family, number of images, object and part class."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from prima.data.masks import rle_area
from prima.data.schema import iter_samples
from prima.data.synth_shapes import COLOURS
from prima.errors import PrimaError


def samples_path(path: str | os.PathLike) -> Path:
    """A dataset folder's ``samples.jsonl``, or the JSONL file itself."""
    path = Path(path)
    if path.is_dir():
        path = path / "samples.jsonl"
    if not path.is_file():
        raise PrimaError(f"no samples found at {path}: give a dataset folder (with samples.jsonl) or a JSONL file")
    return path


def segment_classes(phrase: str, kind: str) -> tuple[str, str | None]:
    """(object class, part class or None) of a phrase: 'red mug's handle' -> ('mug', "mug's handle").

    A leading colour word is dropped, so synthetic phrases group by class; other phrases are kept whole.
    """
    obj, sep, part = phrase.lower().partition("'s ")
    words = obj.split()
    if len(words) > 1 and words[0] in COLOURS:
        words = words[1:]
    obj = " ".join(words)
    if kind == "part" and sep:
        return obj, f"{obj}'s {part.strip()}"
    return obj, (obj if kind == "part" else None)


def dataset_stats(path: str | os.PathLike) -> dict[str, Any]:
    """Counts over a dataset (structure validated; images are not opened)."""
    per_category: Counter = Counter()
    per_family: Counter = Counter()
    per_images: Counter = Counter()
    per_segments: Counter = Counter()
    objects: Counter = Counter()
    parts: Counter = Counter()
    areas: dict[str, list[int]] = {}  # class -> mask areas in pixels
    kinds: Counter = Counter()
    n = no_mask = answer_words = 0
    for sample in iter_samples(samples_path(path), validate=True, check_images=False):
        n += 1
        per_category[sample.category] += 1
        per_family[sample.family or "-"] += 1
        per_images[len(sample.images)] += 1
        per_segments[len(sample.segments)] += 1
        no_mask += not sample.segments
        answer_words += len(sample.answer.split())
        for seg in sample.segments:
            kinds[seg.kind] += 1
            obj, part = segment_classes(seg.phrase, seg.kind)
            if part is None:
                objects[obj] += 1
            else:
                parts[part] += 1
            areas.setdefault(part or obj, []).append(rle_area(seg.mask))
    total_segments = sum(k * v for k, v in per_segments.items())
    return {
        "samples": n,
        "segments": total_segments,
        "segments_per_sample": round(total_segments / n, 3) if n else 0.0,
        "no_mask_samples": no_mask,
        "mean_answer_words": round(answer_words / n, 2) if n else 0.0,
        "per_category": dict(sorted(per_category.items())),
        "per_family": dict(sorted(per_family.items())),
        "per_num_images": {str(k): v for k, v in sorted(per_images.items())},
        "per_num_segments": {str(k): v for k, v in sorted(per_segments.items())},
        "segment_kinds": dict(sorted(kinds.items())),
        "object_classes": dict(sorted(objects.items(), key=lambda kv: (-kv[1], kv[0]))),
        "part_classes": dict(sorted(parts.items(), key=lambda kv: (-kv[1], kv[0]))),
        # smallest first: what a model at this resolution finds hardest to segment
        "median_mask_area_px": {
            k: int(np.median(v)) for k, v in sorted(areas.items(), key=lambda kv: (np.median(kv[1]), kv[0]))
        },
    }


def format_stats(stats: dict[str, Any]) -> str:
    """The stats as aligned plain-text tables."""
    lines = [
        f"samples              {stats['samples']}",
        f"segments             {stats['segments']} ({stats['segments_per_sample']} per sample)",
        f"samples with no mask {stats['no_mask_samples']}",
        f"mean answer words    {stats['mean_answer_words']}",
    ]
    n = max(stats["samples"], 1)
    for title, key in (
        ("category", "per_category"),
        ("family", "per_family"),
        ("images per sample", "per_num_images"),
        ("segments per sample", "per_num_segments"),
        ("segment kind", "segment_kinds"),
        ("object class (segments)", "object_classes"),
        ("part class (segments)", "part_classes"),
        ("median mask area in pixels, per class", "median_mask_area_px"),
    ):
        table = stats[key]
        lines += ["", title]
        width = max((len(k) for k in table), default=0)
        share = key.startswith("per_")  # shares of samples; class counts are of segments
        for k, v in table.items():
            lines.append(f"  {k:<{width}}  {v:>7}" + (f"  {100 * v / n:5.1f}%" if share else ""))
    return "\n".join(lines)
