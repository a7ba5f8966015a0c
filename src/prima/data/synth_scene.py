"""M4Seg-Synth scenes: a textured background with objects placed on it, and the exact visible masks.

Objects are pasted in z-order; a later object may hide part of an earlier one, but never more than
allows the earlier object (and each of its named parts) to stay recognisable. Masks hold the visible
pixels only. Everything is numpy over whole arrays or box-sized slices: no per-pixel Python.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from prima.data.synth_shapes import CATEGORIES, draw_object, part_colours

MIN_VISIBLE_OBJECT = 0.6  # share of an object's pixels that must stay visible
MIN_VISIBLE_PART = 0.5  # share of each named part's pixels that must stay visible
MIN_PART_AREA = 0.0012  # a named part's visible area as a share of the image (≈20 px at 128 px)
PLACEMENT_TRIES = 40
EDGE = 128  # code offset of a pixel on an outline; codes stay below it (<= 7 objects)
CODE_STRIDE = 16  # label code = (object number + 1) * CODE_STRIDE + part id; parts per object < 16


class SceneRetry(Exception):
    """The requested scene could not be laid out with these draws; the caller draws again."""


@dataclass(frozen=True)
class ObjectSpec:
    """What to draw: the same (category, colour, style) draws the same-looking object."""

    category: str
    colour: str
    style: int
    recolour: tuple[tuple[str, str], ...] = ()  # (part, colour name) pairs painted unlike the rest

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.category}"

    def part_phrase(self, part: str) -> str:
        return f"{self.colour} {self.category}'s {part}"


class PlacedObject:
    """An object in a laid-out scene; its masks (visible pixels only) are cut from the label map on demand."""

    def __init__(self, spec: ObjectSpec, labels: np.ndarray, code: int, box: tuple[int, int, int, int]):
        self.spec = spec
        self.box = box  # x0, y0, x1, y1 of the whole (unoccluded) object
        self._labels = labels  # the scene's label map: code + part id where the object shows
        self._code = code

    def _cut(self, keep: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        x0, y0, x1, y1 = self.box
        mask = np.zeros(self._labels.shape, dtype=bool)
        mask[y0:y1, x0:x1] = keep(self._labels[y0:y1, x0:x1])
        return mask

    @cached_property
    def mask(self) -> np.ndarray:
        """Visible pixels of the whole object, (S, S) bool."""
        return self._cut(lambda view: (view > self._code) & (view < self._code + CODE_STRIDE))

    @cached_property
    def parts(self) -> dict[str, np.ndarray]:
        """Visible pixels of each named part."""
        category = CATEGORIES[self.spec.category]
        return {
            p.name: self._cut(lambda view, i=i: view == self._code + i)
            for i, p in enumerate(category.parts, start=1)
            if p.named
        }


@dataclass
class Layout:
    """Where every object of a scene went, before anything is painted."""

    labels: np.ndarray  # (S, S) int16 codes
    z_specs: list[ObjectSpec]  # specs in drawing order
    objects: list[PlacedObject]  # in the order of the specs that asked for them


@dataclass
class Scene:
    image: np.ndarray  # (S, S, 3) uint8
    objects: list[PlacedObject]  # in the order of the specs that asked for them

    def find(self, spec: ObjectSpec) -> PlacedObject:
        for obj in self.objects:
            if obj.spec == spec:
                return obj
        raise KeyError(spec)


def _muted_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    h = rng.uniform()
    s = rng.uniform(0.12, 0.3)
    v = rng.uniform(0.62, 0.88)
    return tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, s, v))


def _darker(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(c * factor) for c in rgb)


def make_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted textured background (S, S, 4) uint8 RGBX: wall and floor, stripes, tiles or plain, softly lit.

    Drawn with Pillow primitives (C speed); scenes take theirs from ``background_bank`` instead.
    """
    kind = int(rng.integers(4))
    first, second = _muted_colour(rng), _muted_colour(rng)
    image = Image.new("RGBX", (size, size), first)
    draw = ImageDraw.Draw(image)
    if kind == 0:  # wall and floor, the floor with boards
        horizon = int(size * rng.uniform(0.45, 0.7))
        period = max(4, int(size * rng.uniform(0.06, 0.12)))
        draw.rectangle((0, horizon, size, size), fill=second)
        for y in range(horizon, size, period):
            draw.line((0, y, size, y), fill=_darker(second, 0.85))
    elif kind == 1:  # wallpaper stripes, upright or slanted
        period = max(4, int(size * rng.uniform(0.04, 0.1)))
        stripe = _darker(first, float(rng.uniform(0.88, 0.95)))
        slant = size if rng.uniform() < 0.5 else 0
        for x in range(-slant, size, 2 * period):
            draw.polygon([(x, 0), (x + period, 0), (x + period + slant, size), (x + slant, size)], fill=stripe)
    elif kind == 2:  # floor tiles in two colours
        tile = max(6, int(size * rng.uniform(0.08, 0.18)))
        other = tuple((a + b) // 2 for a, b in zip(first, second))
        for row, y in enumerate(range(0, size, tile)):
            for x in range(tile * (row % 2), size, 2 * tile):
                draw.rectangle((x, y, x + tile - 1, y + tile - 1), fill=other)
    # Soft uneven lighting: a coarse random field, smoothly enlarged, darkens the image by up to ~12%.
    cells = int(rng.integers(3, 7))
    light = rng.integers(225, 256, (cells, cells), dtype=np.uint8)
    light_image = Image.fromarray(light, mode="L").resize((size, size), Image.BILINEAR)
    image = ImageChops.multiply(image, Image.merge("RGBX", (light_image,) * 4))
    return np.asarray(image)  # RGBX: 4 bytes a pixel, so the painter can treat pixels as uint32


BACKGROUNDS = 512  # distinct backgrounds per image size; each is also used mirrored
BANK_BYTES = 256 * 2**20  # memory the bank may hold per process; beyond it the oldest are dropped
_bank: dict[tuple[int, int], np.ndarray] = {}


def _banked_background(size: int, number: int) -> np.ndarray:
    key = (size, number)
    if key not in _bank:
        rng = np.random.default_rng(np.random.SeedSequence([0x42A4, size, number]))
        background = make_background(rng, size)
        background.flags.writeable = False  # shared by every scene that draws this number
        while _bank and (len(_bank) + 1) * background.nbytes > BANK_BYTES:
            del _bank[next(iter(_bank))]  # large images: keep fewer; a dropped one is redrawn identically
        _bank[key] = background
    return _bank[key]


def pick_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """One of ``2 * BACKGROUNDS`` backgrounds, each made once per process from its own seed.

    Drawing a fresh background cost ~1.7 ms, a quarter of a scene; 1,024 variants are plenty behind
    objects whose colours, sizes and places are drawn fresh every time. The bank is a function of the
    number alone, so output stays the same whatever process renders it.
    """
    background = _banked_background(size, int(rng.integers(BACKGROUNDS)))
    return background[:, ::-1] if rng.integers(2) else background


def _place(
    rng: np.random.Generator, specs: list[ObjectSpec], size: int, labels: np.ndarray, scale: float
) -> list[tuple[int, int, np.ndarray]]:
    """Lay out ``specs`` in z-order on ``labels`` (codes written in place); returns (x, y, part labels) each.

    Visible-pixel counts per code are kept up to date from the pasted box alone, so trying a position
    costs a box, not the whole image.
    """
    n_codes = (len(specs) + 1) * CODE_STRIDE
    counts = np.zeros(n_codes, dtype=np.int64)  # visible pixels of each code now (code 0: background)
    counts[0] = size * size
    need_part = np.zeros(n_codes)  # visible pixels each placed named part must keep
    need_object = np.zeros(len(specs) + 1)  # visible pixels each placed object must keep (by number + 1)
    min_part_px = MIN_PART_AREA * size * size
    placed: list[tuple[int, int, np.ndarray]] = []
    for number, spec in enumerate(specs):
        category = CATEGORIES[spec.category]
        flip = bool(rng.integers(2))
        codes = (number + 1) * CODE_STRIDE + np.arange(len(category.parts) + 1, dtype=np.int16)
        own_named = [int(codes[i]) for i, p in enumerate(category.parts, start=1) if p.named]
        aspect = sum(category.aspect) / 2
        area = rng.uniform(0.09, 0.18) * scale * size * size
        height = int(min(np.sqrt(area / aspect), 0.75 * size, 0.92 * size / category.aspect[1]))
        part_labels = draw_object(category, spec.style, height, flip)
        for attempt in range(1, PLACEMENT_TRIES + 1):
            h, w = part_labels.shape
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            region = labels[y : y + h, x : x + w]
            inside = part_labels > 0
            new_codes = codes[part_labels[inside]]
            after = counts - np.bincount(region[inside], minlength=n_codes) + np.bincount(new_codes, minlength=n_codes)
            per_object = after.reshape(-1, CODE_STRIDE).sum(axis=1)
            if (
                (after >= need_part).all()
                and (per_object >= need_object).all()
                and (after[own_named] >= min_part_px).all()
            ):
                region[inside] = new_codes
                counts = after
                need_part[own_named] = np.maximum(MIN_VISIBLE_PART * after[own_named], min_part_px)
                need_object[number + 1] = MIN_VISIBLE_OBJECT * per_object[number + 1]
                placed.append((x, y, part_labels))
                break
            if attempt % 10 == 0:  # crowded: try smaller
                height = int(height * 0.85)
                part_labels = draw_object(category, spec.style, height, flip)
        else:
            raise SceneRetry(f"no room for a {spec.category}")
    return placed


def layout_scene(
    rng: np.random.Generator,
    specs: list[ObjectSpec],
    size: int,
    accept: Callable[[list[PlacedObject]], bool] | None = None,
) -> Layout:
    """Place ``specs`` (each (category, colour) at most once) in random z-order; nothing is painted yet.

    ``accept`` sees the placed objects (in spec order); when it says no, SceneRetry is raised, so a
    caller that needs a particular arrangement pays only for layouts, not for painting.
    """
    if len({(s.category, s.colour) for s in specs}) != len(specs):
        raise ValueError("a scene may hold each (category, colour) once, so that phrases name one object")
    order = [int(i) for i in rng.permutation(len(specs))]
    z_specs = [specs[i] for i in order]
    scale = 1.0 if len(specs) <= 2 else 0.7 if len(specs) == 3 else 0.55
    labels = np.zeros((size, size), dtype=np.int16)
    placed = _place(rng, z_specs, size, labels, scale)
    objects: list[PlacedObject] = [None] * len(specs)  # type: ignore[list-item]
    for number, (spec, (x, y, part_labels)) in enumerate(zip(z_specs, placed)):
        h, w = part_labels.shape
        objects[order[number]] = PlacedObject(spec, labels, (number + 1) * CODE_STRIDE, (x, y, x + w, y + h))
    if accept is not None and not accept(objects):
        raise SceneRetry("the layout was not accepted")
    return Layout(labels, z_specs, objects)


def paint_scene(rng: np.random.Generator, layout: Layout) -> Scene:
    """Paint a layout on a fresh background."""
    labels = layout.labels
    size = labels.shape[0]
    # Paint by table lookup on the label map: each code's colour packed as little-endian RGBX in a uint32,
    # and a darker copy at code + EDGE for outlines where one part or object meets another (they make parts
    # readable, as shading does in photos). Whole-array ops only; gathering 3-byte rows is ~30x slower.
    packed = np.zeros(2 * EDGE, dtype=np.uint32)
    for number, spec in enumerate(layout.z_specs):
        lut = part_colours(CATEGORIES[spec.category], spec.colour, spec.recolour).astype(np.uint32)
        codes = (number + 1) * CODE_STRIDE + np.arange(len(lut))
        packed[codes] = lut[:, 0] | lut[:, 1] << 8 | lut[:, 2] << 16
        dark = (lut * 0.6).astype(np.uint32)
        packed[codes + EDGE] = dark[:, 0] | dark[:, 1] << 8 | dark[:, 2] << 16
    edge = np.zeros((size, size), dtype=bool)
    diff_x = labels[:, 1:] != labels[:, :-1]
    diff_y = labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= diff_x
    edge[:, :-1] |= diff_x
    edge[1:, :] |= diff_y
    edge[:-1, :] |= diff_y
    foreground = packed[labels + edge * np.int16(EDGE)]  # int16 throughout: no 8-byte temporaries
    background = pick_background(rng, size)
    rgbx = np.where(labels > 0, foreground, background.view(np.uint32)[..., 0])  # a mirrored view is fine here
    # Pillow drops the fourth byte in C; numpy's strided copy of 3 of every 4 bytes is ~10x slower.
    image = Image.frombuffer("RGBX", (size, size), rgbx, "raw", "RGBX", 0, 1).convert("RGB")
    return Scene(np.asarray(image), layout.objects)


def render_scene(
    rng: np.random.Generator,
    specs: list[ObjectSpec],
    size: int,
    accept: Callable[[list[PlacedObject]], bool] | None = None,
) -> Scene:
    """Lay out and paint one scene (see layout_scene)."""
    return paint_scene(rng, layout_scene(rng, specs, size, accept))
