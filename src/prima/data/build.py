"""`prima data build`: M4Seg-style multi-image samples from COCO-format object (and part) annotations.

DESIGN §3.4. Groups of 2–5 images that share categories get one question each, from templates in M4Seg's
four categories (the ``family`` field names the template):

- numerical: ``count-total`` (how many X across the images), ``count-most`` (which image shows most X);
- spatial: ``left-right`` / ``above-below`` (two objects within one image), ``leftmost`` (which image's X
  sits furthest left in its picture);
- functional: ``use-object`` (which of these could you sit on; every instance grounded), ``use-none``
  (nothing affords it: an answer with no mask), ``use-part`` (which part of the mug do you hold), from
  the table in ``prima.data.affordances``;
- open-ended: ``common`` (what every image shows), ``difference`` (what image i shows that image j
  lacks; may have no mask), ``common-parts`` (which parts of the X every image shows).

What is skipped, and counted in the report: crowd annotations (a region of many instances, not one
object: never grounded), masks smaller than ``min_area`` of their image, segmentations that can't be
decoded, annotations on unknown images or categories, images whose file is missing or whose size
differs from the annotation file, parts without a known object of their own category. Because a skipped crowd or tiny
instance would make a count wrong, a category with a skipped instance in an image is never counted
or called absent in that image. Stuff classes (``isthing: 0``, e.g. COCO-panoptic sky and grass) are
only used in open-ended questions: they can't be counted and have no position.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prima.constants import SEG_TOKEN, image_tag
from prima.data.affordances import OBJECT_AFFORDANCES, object_uses, part_uses
from prima.data.coco import (
    Annotation,
    CocoIndex,
    Id,
    ImageInfo,
    display_name,
    load_coco,
    load_isthing,
    rle_box,
    rle_pixels,
    segmentation_to_rle,
)
from prima.data.masks import RLE
from prima.data.schema import CATEGORIES, Sample, Segment, image_size, validate_sample, write_jsonl
from prima.errors import PrimaError, SampleError

# How often a question writer may draw a new group before giving up on one sample.
ATTEMPTS_PER_SAMPLE = 200
# How often a functional question may be a negative ("is there anything you could drink from?" "No").
NEGATIVE_SHARE = 0.25


@dataclass
class BuildOptions:
    num: int
    seed: int = 0
    min_images: int = 2
    max_images: int = 5
    min_area: float = 0.001  # share of the image; smaller masks are skipped as tiny
    max_segments: int = 12  # most [SEG] masks in one answer
    relative_paths: bool = False  # image paths relative to the output folder instead of absolute
    id_prefix: str = "build"

    def check(self) -> None:
        if self.num < 1:
            raise PrimaError(f"--num must be at least 1, got {self.num}")
        if not 2 <= self.min_images <= self.max_images <= 5:
            raise PrimaError(
                f"need 2 <= --min-images <= --max-images <= 5, got {self.min_images} and {self.max_images}"
            )
        if not 0 <= self.min_area < 1:
            raise PrimaError(f"--min-area is a share of the image in [0, 1), got {self.min_area}")
        if self.max_segments < 1:
            raise PrimaError(f"--max-segments must be at least 1, got {self.max_segments}")


@dataclass
class Instance:
    """One usable object annotation: its mask, box and the masks of its annotated parts."""

    ann_id: Id
    image_id: Id
    name: str  # display name of the category
    isthing: bool
    rle: RLE
    area: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    parts: dict[str, RLE] = field(default_factory=dict)  # part display name -> mask (first annotation)


@dataclass
class ImageEntry:
    """An image with its usable instances by category, and the categories that lost an instance."""

    info: ImageInfo
    path: str  # as written into samples
    instances: dict[str, list[Instance]] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)  # categories with a skipped (crowd/tiny/bad) instance

    @property
    def size(self) -> tuple[int, int]:
        return self.info.height, self.info.width

    def countable(self, name: str) -> bool:
        """True when every instance of ``name`` in this image is usable, so its count (maybe 0) is known."""
        return name not in self.dropped

    def absent(self, name: str) -> bool:
        return name not in self.instances and name not in self.dropped

    def unique(self, name: str) -> Instance | None:
        """The only instance of ``name`` here (None when there are several, or a skipped one)."""
        found = self.instances.get(name, [])
        return found[0] if len(found) == 1 and self.countable(name) else None


@dataclass
class BuildReport:
    out: Path
    requested: int = 0
    written: int = 0
    images_used: int = 0
    by_category: Counter = field(default_factory=Counter)
    by_family: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)  # reason -> annotations or images skipped
    examples: list[str] = field(default_factory=list)
    load_cpu_s: float = 0.0  # CPU seconds to load, check and index the annotations (for benchmarks)
    write_cpu_s: float = 0.0  # CPU seconds to write the questions

    def skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < 20:
            self.examples.append(f"{detail} [{reason}]")

    def summary(self) -> str:
        lines = [f"wrote {self.written} of {self.requested} samples -> {self.out / 'samples.jsonl'}"]
        if self.written < self.requested:
            lines.append("  the annotations allow no more distinct questions (add images, or lower --num)")
        cats = ", ".join(f"{c} {self.by_category[c]}" for c in CATEGORIES)
        lines.append(f"  by category: {cats}")
        lines.append("  by family: " + ", ".join(f"{k} {v}" for k, v in sorted(self.by_family.items())))
        lines.append(f"  images with usable annotations: {self.images_used}")
        for reason, n in self.skipped.most_common():
            lines.append(f"  skipped, {reason}: {n}")
        for detail in self.examples[:5]:
            lines.append(f"    e.g. {detail}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- loading


def load_images(
    coco: CocoIndex,
    parts: CocoIndex | None,
    *,
    image_dir: Path,
    out: Path,
    options: BuildOptions,
    report: BuildReport,
) -> list[ImageEntry]:
    """The usable images with their instances and parts; everything skipped is counted in ``report``."""
    for index in (coco, parts):
        if index is not None:
            for reason, n in index.skipped.items():
                report.skipped[reason] += n
            report.examples.extend(index.examples[: max(0, 20 - len(report.examples))])

    by_image: dict[Id, list[Annotation]] = defaultdict(list)
    part_anns: list[tuple[CocoIndex, Annotation]] = []
    for index in (coco, parts):
        if index is None:
            continue
        for ann in index.annotations.values():
            category = index.categories[ann.category_id]
            if category.part_of is not None:
                part_anns.append((index, ann))
            elif index is coco:
                by_image[ann.image_id].append(ann)

    entries: dict[Id, ImageEntry] = {}
    instances: dict[Id, Instance] = {}
    for image_id, anns in by_image.items():
        info = coco.images[image_id]
        entry = _open_image(info, image_dir, out, options, report)
        if entry is None:
            continue
        for ann in anns:
            category = coco.categories[ann.category_id]
            name = display_name(category.name)
            where = f"{coco.path.name}: annotation {ann.id} ({category.name}, image {image_id})"
            made = _instance(ann, name, category.isthing, info, options, report, where)
            if made is None:
                entry.dropped.add(name)
                continue
            entry.instances.setdefault(name, []).append(made)
            instances[ann.id] = made
        if entry.instances:
            entries[image_id] = entry

    for index, ann in part_anns:
        category = index.categories[ann.category_id]
        where = f"{index.path.name}: part annotation {ann.id} ({category.name})"
        if ann.obj_ann_id is None:
            report.skip("part without obj_ann_id", f"{where} has no obj_ann_id")
            continue
        obj = instances.get(ann.obj_ann_id)
        if obj is None:
            report.skip("part of an unknown or skipped object", f"{where}: object {ann.obj_ann_id} is not usable")
            continue
        if display_name(category.part_of or "") != obj.name:
            report.skip(
                "part whose object has another category",
                f"{where}: object {ann.obj_ann_id} is a {obj.name}, not a {display_name(category.part_of or '')}",
            )
            continue
        if ann.image_id != obj.image_id:
            report.skip(
                "part on another image than its object",
                f"{where} is on image {ann.image_id}, its object {ann.obj_ann_id} on image {obj.image_id}",
            )
            continue
        info = coco.images[obj.image_id]
        if ann.iscrowd:
            report.skip("crowd part annotation", where)
            continue
        try:
            rle = segmentation_to_rle(ann.segmentation, info.height, info.width)
        except ValueError as e:
            report.skip("bad part segmentation", f"{where}: {e}")
            continue
        if rle_pixels(rle) < options.min_area * info.height * info.width:
            report.skip("tiny part mask", f"{where}: {rle_pixels(rle)} pixels")
            continue
        obj.parts.setdefault(display_name(category.name), rle)

    report.images_used = len(entries)
    return list(entries.values())


def _open_image(
    info: ImageInfo, image_dir: Path, out: Path, options: BuildOptions, report: BuildReport
) -> ImageEntry | None:
    path = (image_dir / info.file_name).resolve()
    if not path.is_file():
        report.skip("image file missing (its annotations unused)", f"image {info.id}: {path} does not exist")
        return None
    try:
        h, w = image_size(path)
    except SampleError as e:
        report.skip("image file unreadable (its annotations unused)", f"image {info.id}: {e}")
        return None
    if (h, w) != (info.height, info.width):
        report.skip(
            "image size differs from the annotation file (its annotations unused)",
            f"image {info.id}: {path} is {h}x{w}, the annotations say {info.height}x{info.width}",
        )
        return None
    shown = os.path.relpath(path, out.resolve()) if options.relative_paths else str(path)
    return ImageEntry(info=info, path=shown)


def _instance(
    ann: Annotation, name: str, isthing: bool, info: ImageInfo, options: BuildOptions, report: BuildReport, where: str
) -> Instance | None:
    if ann.iscrowd:
        report.skip("crowd annotation", where)
        return None
    try:
        rle = segmentation_to_rle(ann.segmentation, info.height, info.width)
    except ValueError as e:
        report.skip("bad segmentation", f"{where}: {e}")
        return None
    area = rle_pixels(rle)
    if area < options.min_area * info.height * info.width:
        report.skip("tiny mask", f"{where}: {area} pixels")
        return None
    return Instance(ann.id, ann.image_id, name, isthing, rle, area, rle_box(rle))


# -------------------------------------------------------------------------------------------- wording

_IRREGULAR_PLURALS = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "child": "children"}


def plural(noun: str) -> str:
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR_PLURALS:
        word = _IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "ch", "sh", "z")):
        word = last + "es"
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def counted(n: int, noun: str) -> str:
    return f"{n} {noun if n == 1 else plural(noun)}"


def article(noun: str, isthing: bool = True) -> str:
    """``"a "``/``"an "`` before a countable noun; nothing before stuff ("grass", "sky")."""
    if not isthing:
        return ""
    return "an " if noun[:1].lower() in "aeiou" else "a "


def join_words(items: list[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + ", and " + items[-1]


@dataclass
class Draft:
    """A question under construction: its images, text, and the segments in [SEG] order."""

    category: str
    family: str
    images: list[ImageEntry]
    question: str = ""
    answer_parts: list[str] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)

    def seg(self, phrase: str, entry: ImageEntry, rle: RLE, kind: str = "object") -> str:
        """``<p> phrase </p> [SEG] (IMAGEk)`` for a mask in ``entry``; records the segment."""
        k = self.images.index(entry) + 1
        self.segments.append(Segment(phrase=phrase, image=k, mask=rle, kind=kind))
        return f"<p> {phrase} </p> {SEG_TOKEN} {image_tag(k)}"

    def k(self, entry: ImageEntry) -> int:
        return self.images.index(entry) + 1


# ------------------------------------------------------------------------------------------ questions


class QuestionWriter:
    """Draws image groups and writes one question of a given M4Seg category about each."""

    def __init__(self, entries: list[ImageEntry], rng: random.Random, options: BuildOptions):
        self.entries = entries
        self.rng = rng
        self.options = options
        # Indexes built once, so that writing a question costs the same on 3 images as on 100K.
        self.by_name: dict[str, list[ImageEntry]] = defaultdict(list)  # entries showing the category
        self.countable: dict[str, list[ImageEntry]] = defaultdict(list)  # ... with no skipped instance of it
        self.unique: dict[str, list[ImageEntry]] = defaultdict(list)  # ... with exactly one instance of it
        self.with_parts: dict[str, list[ImageEntry]] = defaultdict(list)  # ... where one of them has parts
        self.users: dict[str, list[ImageEntry]] = defaultdict(list)  # verb -> entries with an object for it
        self.part_users: dict[tuple[str, str, str], list[ImageEntry]] = defaultdict(list)  # (verb, obj, part)
        self.several: list[tuple[ImageEntry, str]] = []  # (entry, thing) with 2+ instances, all usable
        for e in entries:
            for name, found in e.instances.items():
                self.by_name[name].append(e)
                if e.countable(name) and found[0].isthing:
                    self.countable[name].append(e)
                    if len(found) == 1:
                        self.unique[name].append(e)
                    else:
                        self.several.append((e, name))
                parts = {p for i in found for p in i.parts}
                if parts:
                    self.with_parts[name].append(e)
                for verb in object_uses(name):
                    if not self.users[verb] or self.users[verb][-1] is not e:
                        self.users[verb].append(e)
                for part in sorted(parts):
                    for verb in part_uses(name, part):
                        self.part_users[(verb, name, part)].append(e)
        self.names = sorted(self.by_name)
        self.things = sorted(self.countable)
        self.families: dict[str, list[Callable[[], Draft | None]]] = {
            "numerical": [self.count_total, self.count_most],
            "spatial": [self.left_right, self.above_below, self.extreme, self.leftmost],
            "functional": [self.use_object, self.use_none, self.use_part],
            "open-ended": [self.common, self.difference, self.common_parts],
        }

    def write(self, category: str) -> Draft | None:
        families = list(self.families[category])
        self.rng.shuffle(families)
        # "Nothing affords that" questions are always possible; without this they would crowd out the rest.
        families.sort(key=lambda f: f == self.use_none and self.rng.random() > NEGATIVE_SHARE)
        for family in families:
            draft = family()
            if draft is not None and len(draft.segments) <= self.options.max_segments:
                return draft
        return None

    def group(
        self, required: list[ImageEntry], accept: Callable[[ImageEntry], bool] | None = None
    ) -> list[ImageEntry] | None:
        """``required`` images plus random others that ``accept`` allows, 2–5 in all, shuffled.

        Others are drawn from a bounded random sample of all images, so a group costs the same on any
        dataset size; None when too few acceptable images turn up.
        """
        least = max(self.options.min_images, len(required))
        if least > self.options.max_images:
            return None
        want = self.rng.randint(least, self.options.max_images)
        chosen = list(required)
        draws = self.rng.sample(range(len(self.entries)), min(len(self.entries), 8 * self.options.max_images))
        for index in draws:
            if len(chosen) == want:
                break
            e = self.entries[index]
            if all(e is not c for c in chosen) and (accept is None or accept(e)):
                chosen.append(e)
        if len(chosen) < least:
            return None
        self.rng.shuffle(chosen)
        return chosen

    def subset(self, having: list[ImageEntry]) -> list[ImageEntry] | None:
        """2–5 random images out of ``having`` (None when it has too few)."""
        if len(having) < self.options.min_images:
            return None
        k = self.rng.randint(self.options.min_images, min(self.options.max_images, len(having)))
        return self.rng.sample(having, k)

    # numerical ------------------------------------------------------------------------------------

    def _count_group(self) -> tuple[str, list[ImageEntry]] | None:
        if not self.things:
            return None
        name = self.rng.choice(self.things)
        group = self.group([self.rng.choice(self.countable[name])], accept=lambda e: e.countable(name))
        return None if group is None else (name, group)

    def count_total(self) -> Draft | None:
        picked = self._count_group()
        if picked is None:
            return None
        name, group = picked
        d = Draft("numerical", "count-total", group)
        d.question = f"How many {plural(name)} are there across these images?"
        total = sum(len(e.instances.get(name, [])) for e in group)
        per_image = []
        for e in group:
            found = e.instances.get(name, [])
            if found:
                segs = ", ".join(d.seg(name, e, i.rle) for i in found)
                per_image.append(f"{len(found)} in image {d.k(e)} ({segs})")
        verb = "is" if total == 1 else "are"
        d.answer_parts = [f"There {verb} {counted(total, name)} across the images: {join_words(per_image)}."]
        return d

    def count_most(self) -> Draft | None:
        picked = self._count_group()
        if picked is None:
            return None
        name, group = picked
        counts = [len(e.instances.get(name, [])) for e in group]
        best = max(counts)
        if counts.count(best) > 1:
            return None  # a tie has no single answer
        d = Draft("numerical", "count-most", group)
        top = group[counts.index(best)]
        d.question = f"Which image shows the most {plural(name)}?"
        segs = ", ".join(d.seg(name, top, i.rle) for i in top.instances[name])
        others = join_words([f"{c} in image {k}" for k, c in enumerate(counts, start=1) if k != d.k(top)])
        d.answer_parts = [f"Image {d.k(top)} does, with {counted(best, name)} ({segs}), against {others}."]
        return d

    # spatial --------------------------------------------------------------------------------------

    def _pair(self, axis: int) -> tuple[ImageEntry, Instance, Instance] | None:
        """An image with two unique things of different categories, clearly apart along ``axis`` (0 = x)."""
        for index in self.rng.sample(range(len(self.entries)), min(len(self.entries), 20)):
            entry = self.entries[index]
            uniques = [u for n in entry.instances if (u := entry.unique(n)) is not None and u.isthing]
            pairs = [
                (a, b)
                for a in uniques
                for b in uniques
                if a is not b and a.box[axis + 2] <= b.box[axis]  # a ends before b starts
            ]
            if pairs:
                a, b = self.rng.choice(pairs)
                return entry, a, b
        return None

    def _relation(self, axis: int, family: str, words: tuple[str, str]) -> Draft | None:
        found = self._pair(axis)
        if found is None:
            return None
        entry, first, second = found
        group = self.group([entry])
        if group is None:
            return None
        d = Draft("spatial", family, group)
        k = d.k(entry)
        a, b = (first, second) if self.rng.random() < 0.5 else (second, first)
        relation = words[0] if a is first else words[1]
        d.question = f"In image {k}, is the {a.name} {words[0]} or {words[1]} the {b.name}?"
        d.answer_parts = [
            f"The {d.seg(a.name, entry, a.rle)} is {relation} the {d.seg(b.name, entry, b.rle)} in image {k}."
        ]
        return d

    def left_right(self) -> Draft | None:
        return self._relation(0, "left-right", ("to the left of", "to the right of"))

    def above_below(self) -> Draft | None:
        return self._relation(1, "above-below", ("above", "below"))

    def extreme(self) -> Draft | None:
        """Which of several X in one image is furthest left/right/up/down (all X annotated, none skipped)."""
        if not self.several:
            return None
        entry, name = self.rng.choice(self.several)
        side, axis, sign = self.rng.choice([("left", 0, 1), ("right", 0, -1), ("top", 1, 1), ("bottom", 1, -1)])
        size = entry.info.width if axis == 0 else entry.info.height

        def centre(i: Instance) -> float:
            return sign * (i.box[axis] + i.box[axis + 2]) / 2 / size

        ranked = sorted(entry.instances[name], key=centre)
        if centre(ranked[1]) - centre(ranked[0]) < 0.05:
            return None  # too close to call
        group = self.group([entry])
        if group is None:
            return None
        d = Draft("spatial", "extreme", group)
        k = d.k(entry)
        d.question = f"In image {k}, which {name} is closest to the {side} edge?"
        d.answer_parts = [f"The {d.seg(name, entry, ranked[0].rle)} is the one closest to the {side} of image {k}."]
        return d

    def leftmost(self) -> Draft | None:
        if not self.things:
            return None
        name = self.rng.choice(self.things)
        group = self.subset(self.unique[name])
        if group is None:
            return None

        def centre(e: ImageEntry) -> float:
            x0, _, x1, _ = e.instances[name][0].box  # the only one: ``unique`` lists images with exactly one
            return (x0 + x1) / 2 / e.info.width

        ranked = sorted(group, key=centre)
        if centre(ranked[1]) - centre(ranked[0]) < 0.1:
            return None  # too close to call
        d = Draft("spatial", "leftmost", group)
        best = ranked[0]
        seg = d.seg(name, best, best.instances[name][0].rle)
        d.question = f"Each image shows one {name}. In which image is the {name} furthest to the left?"
        d.answer_parts = [
            f"In image {d.k(best)}: the {seg} sits further left in its picture than the {name} in any other image."
        ]
        return d

    # functional -----------------------------------------------------------------------------------

    def _users(self, verb: str, entry: ImageEntry) -> list[Instance]:
        names = OBJECT_AFFORDANCES[verb]
        return [i for n in names for i in entry.instances.get(n, [])]

    def use_object(self) -> Draft | None:
        if not self.users:
            return None
        verb = self.rng.choice(sorted(self.users))
        group = self.group([self.rng.choice(self.users[verb])])
        if group is None:
            return None
        d = Draft("functional", "use-object", group)
        d.question = f"What in these images could you {verb}?"
        found = [f"the {d.seg(i.name, e, i.rle)}" for e in group for i in self._users(verb, e)]
        d.answer_parts = [f"You could {verb} {join_words(found)}."]
        return d

    def use_none(self) -> Draft | None:
        group = self.group([self.rng.choice(self.entries)])
        if group is None:
            return None
        verbs = [v for v, names in OBJECT_AFFORDANCES.items() if all(e.absent(n) for e in group for n in names)]
        if not verbs:
            return None
        verb = self.rng.choice(verbs)
        d = Draft("functional", "use-none", group)
        d.question = f"Is there anything in these images that you could {verb}?"
        d.answer_parts = [f"No, none of the images shows anything you could {verb}."]
        return d

    def use_part(self) -> Draft | None:
        if not self.part_users:
            return None
        verb, obj_name, part = self.rng.choice(sorted(self.part_users))
        with_part = self.part_users[(verb, obj_name, part)]
        entry = self.rng.choice(with_part)
        extra = [e for e in with_part if e is not entry][: 8 * self.options.max_images]
        required = [entry] + self.rng.sample(extra, min(len(extra), self.rng.randint(0, self.options.max_images - 1)))
        group = self.group(required)
        if group is None:
            return None
        d = Draft("functional", "use-part", group)
        phrase = f"{obj_name}'s {part}"
        found = [
            f"the {d.seg(phrase, e, i.parts[part], 'part')}"
            for e in group
            for i in e.instances.get(obj_name, [])
            if part in i.parts
        ]
        where = "in these images" if len(required) > 1 else f"in image {d.k(entry)}"
        d.question = f"Which part of the {obj_name} {where} do you {verb}?"
        d.answer_parts = [f"You {verb} {join_words(found)}."]
        return d

    # open-ended -----------------------------------------------------------------------------------

    def common(self) -> Draft | None:
        name = self.rng.choice(self.names)
        group = self.subset(self.by_name[name])
        if group is None:
            return None
        k = len(group)
        shared = sorted(set.intersection(*(set(e.instances) for e in group)))
        self.rng.shuffle(shared)
        shared = shared[: max(1, self.options.max_segments // k)]
        d = Draft("open-ended", "common", group)
        d.question = "What do these images have in common?"
        listed = []
        for n in shared:
            segs = ", ".join(d.seg(n, e, max(e.instances[n], key=lambda i: i.area).rle) for e in group)
            listed.append(f"{article(n, group[0].instances[n][0].isthing)}{n} ({segs})")
        d.answer_parts = [f"Every image shows {join_words(listed)}."]
        return d

    def difference(self) -> Draft | None:
        group = self.group([self.rng.choice(self.entries)])
        if group is None:
            return None
        first, second = self.rng.sample(group, 2)
        only = sorted(n for n in first.instances if second.absent(n))
        d = Draft("open-ended", "difference", group)
        i, j = d.k(first), d.k(second)
        d.question = f"What does image {i} show that image {j} does not?"
        if not only:
            d.answer_parts = [f"Nothing: every kind of thing in image {i} also appears in image {j}."]
            return d
        self.rng.shuffle(only)
        listed = [
            article(n, first.instances[n][0].isthing)
            + d.seg(n, first, max(first.instances[n], key=lambda x: x.area).rle)
            for n in only[: self.options.max_segments]
        ]
        d.answer_parts = [f"Image {i} shows {join_words(listed)}, which image {j} does not."]
        return d

    def common_parts(self) -> Draft | None:
        if not self.with_parts:
            return None
        name = self.rng.choice(sorted(self.with_parts))
        group = self.subset(self.with_parts[name])
        if group is None:
            return None
        k = len(group)

        def first_with(e: ImageEntry, part: str) -> Instance:
            return next(i for i in e.instances[name] if part in i.parts)

        shared = sorted(set.intersection(*({p for i in e.instances[name] for p in i.parts} for e in group)))
        if not shared:
            return None
        self.rng.shuffle(shared)
        shared = shared[: max(1, self.options.max_segments // k)]
        d = Draft("open-ended", "common-parts", group)
        d.question = f"Which parts of the {name} can be seen in every image?"
        listed = []
        for part in shared:
            segs = ", ".join(d.seg(f"{name}'s {part}", e, first_with(e, part).parts[part], "part") for e in group)
            listed.append(f"{part} ({segs})")
        d.answer_parts = [f"Every image shows the {name}'s {join_words(listed)}."]
        return d


# ----------------------------------------------------------------------------------------------- run


def _dedup_key(draft: Draft) -> tuple:
    """The same question about the same images, whatever their order, is one sample."""
    ids = [str(e.info.id) for e in draft.images]
    question = re.sub(r"\bimage (\d)\b", lambda m: f"image #{ids[int(m.group(1)) - 1]}", draft.question)
    return (draft.family, tuple(sorted(ids)), question)


def build_dataset(
    coco: str | os.PathLike,
    *,
    images: str | os.PathLike,
    out: str | os.PathLike,
    options: BuildOptions,
    parts: str | os.PathLike | None = None,
    categories: str | os.PathLike | None = None,
) -> BuildReport:
    """Write ``options.num`` samples (fewer when the annotations allow no more) to ``out/samples.jsonl``.

    Deterministic for a given seed and input. The four categories take turns; a category the
    annotations can't make a question for (say, spatial without two separated objects) is skipped
    for another.
    """
    options.check()
    image_dir = Path(images)
    if not image_dir.is_dir():
        raise PrimaError(f"--images {image_dir}: no such folder")
    out = Path(out)
    isthing = load_isthing(categories) if categories else None
    coco_index = load_coco(coco, stuff_categories=isthing)
    parts_index = load_coco(parts, stuff_categories=isthing) if parts else None
    report = BuildReport(out=out, requested=options.num)
    out.mkdir(parents=True, exist_ok=True)
    started = time.process_time()
    entries = load_images(coco_index, parts_index, image_dir=image_dir, out=out, options=options, report=report)
    if len(entries) < options.min_images:
        raise PrimaError(
            f"{coco}: only {len(entries)} image(s) have usable annotations; a group needs {options.min_images}"
            + (f" (skipped: {dict(report.skipped)})" if report.skipped else "")
        )
    rng = random.Random(options.seed)
    writer = QuestionWriter(entries, rng, options)
    report.load_cpu_s = time.process_time() - started
    source = f"build/{Path(coco).stem}"

    def samples():
        seen: set[tuple] = set()
        order = list(CATEGORIES)
        for n in range(options.num):
            sample = None
            for attempt in range(ATTEMPTS_PER_SAMPLE):
                category = order[(n + attempt) % len(order)]
                draft = writer.write(category)
                if draft is None:
                    continue
                negatives = report.by_family["use-none"]
                if draft.family == "use-none" and negatives >= NEGATIVE_SHARE * (report.by_category["functional"] + 1):
                    continue  # once the positive questions run out, negatives must not fill the file
                key = _dedup_key(draft)
                if key in seen:
                    continue
                seen.add(key)
                sample = Sample(
                    id=f"{options.id_prefix}-{n:06d}",
                    images=[e.path for e in draft.images],
                    question=draft.question,
                    answer=" ".join(draft.answer_parts),
                    category=draft.category,
                    segments=draft.segments,
                    family=draft.family,
                    source=source,
                )
                validate_sample(sample, check_images=False, image_sizes=[e.size for e in draft.images])
                break
            if sample is None:
                return  # the annotations allow no more distinct questions
            report.written += 1
            report.by_category[sample.category] += 1
            report.by_family[sample.family] += 1
            yield sample.to_dict()

    started = time.process_time()
    write_jsonl(out / "samples.jsonl", samples())
    report.write_cpu_s = time.process_time() - started
    return report
