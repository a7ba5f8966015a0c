"""M4Seg-Synth scenes: a textured background with objects placed on it, and the exact visible masks.

Objects are pasted in z-order; a later object may hide part of an earlier one, but never more than
allows the earlier object (and each of its named parts) to stay recognisable. Masks hold the visible
pixels only. Everything is numpy over whole arrays or box-sized slices: no per-pixel Python.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from dataclasses import dataclass, field

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


@dataclass
class PlacedObject:
    spec: ObjectSpec
    mask: np.ndarray  # visible pixels, (S, S) bool
    parts: dict[str, np.ndarray] = field(default_factory=dict)  # named part -> visible pixels
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 of the whole (unoccluded) object

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


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

    Drawn with Pillow primitives (C speed): this runs once per image, 35,000 times for 10,000 samples.
    """
    kind = int(rng.integers(4))
    first, second = _muted_colour(rng), _muted_colour(rng)
    image = Image.new("RGB", (size, size), first)
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
    image = ImageChops.multiply(image, Image.merge("RGB", (light_image,) * 3))
    return np.array(image.convert("RGBX"))  # 4 bytes a pixel, so the painter can treat pixels as uint32


def _place(
    rng: np.random.Generator, specs: list[ObjectSpec], size: int, labels: np.ndarray, scale: float
) -> list[tuple[int, int, np.ndarray]]:
    """Lay out ``specs`` in z-order on ``labels`` (codes written in place); returns (x, y, part labels) each."""
    part_area: dict[int, int] = {}  # code of a named part -> its pixels before any occlusion
    object_area: list[int] = []  # pixels of each placed object before any occlusion
    placed: list[tuple[int, int, np.ndarray]] = []
    min_part_px = MIN_PART_AREA * size * size
    aspect_fit = 0.92 * size
    for number, spec in enumerate(specs):
        category = CATEGORIES[spec.category]
        flip = bool(rng.integers(2))
        codes = (number + 1) * CODE_STRIDE + np.arange(len(category.parts) + 1, dtype=np.int16)
        own_named = [int(codes[i]) for i, p in enumerate(category.parts, start=1) if p.named]
        for _ in range(PLACEMENT_TRIES):
            aspect = sum(category.aspect) / 2
            area = rng.uniform(0.07, 0.15) * scale * size * size
            height = int(min(np.sqrt(area / aspect), 0.75 * size, aspect_fit / category.aspect[1]))
            part_labels = draw_object(category, spec.style, height, flip)
            h, w = part_labels.shape
            if w > size or h > size:
                continue
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            region = labels[y : y + h, x : x + w]
            before = region.copy()
            inside = part_labels > 0
            region[inside] = codes[part_labels[inside]]
            counts = np.bincount(labels.ravel(), minlength=(len(specs) + 1) * CODE_STRIDE)
            per_object = counts.reshape(-1, CODE_STRIDE).sum(axis=1)[1:]
            ok = (
                all(counts[c] >= max(MIN_VISIBLE_PART * a, min_part_px) for c, a in part_area.items())
                and all(per_object[k] >= MIN_VISIBLE_OBJECT * a for k, a in enumerate(object_area))
                and all(counts[c] >= min_part_px for c in own_named)
            )
            if ok:
                part_area.update({c: int(counts[c]) for c in own_named})
                object_area.append(int(per_object[number]))
                placed.append((x, y, part_labels))
                break
            region[...] = before
        else:
            raise SceneRetry(f"no room for a {spec.category}")
    return placed


def render_scene(
    rng: np.random.Generator,
    specs: list[ObjectSpec],
    size: int,
    accept: Callable[[list[PlacedObject]], bool] | None = None,
) -> Scene:
    """Draw ``specs`` (each (category, colour) at most once) on a fresh background, in random z-order.

    ``accept`` sees the laid-out objects (in spec order) before anything is painted; when it says no,
    SceneRetry is raised, so a caller that needs a particular arrangement pays only for the layout.
    """
    if len({(s.category, s.colour) for s in specs}) != len(specs):
        raise ValueError("a scene may hold each (category, colour) once, so that phrases name one object")
    order = [int(i) for i in rng.permutation(len(specs))]
    z_specs = [specs[i] for i in order]
    scale = 1.0 if len(specs) <= 2 else 0.75 if len(specs) == 3 else 0.6
    labels = np.zeros((size, size), dtype=np.int16)
    placed = _place(rng, z_specs, size, labels, scale)

    objects: list[PlacedObject | None] = [None] * len(specs)
    for number, (spec, (x, y, part_labels)) in enumerate(zip(z_specs, placed)):
        category = CATEGORIES[spec.category]
        base_code = (number + 1) * CODE_STRIDE
        h, w = part_labels.shape
        view = labels[y : y + h, x : x + w]
        mask = np.zeros((size, size), dtype=bool)
        mask[y : y + h, x : x + w] = (view > base_code) & (view < base_code + CODE_STRIDE)
        parts = {}
        for i, part in enumerate(category.parts, start=1):
            if part.named:
                pm = np.zeros((size, size), dtype=bool)
                pm[y : y + h, x : x + w] = view == base_code + i
                parts[part.name] = pm
        objects[order[number]] = PlacedObject(spec, mask, parts, (x, y, x + w, y + h))
    if accept is not None and not accept(objects):
        raise SceneRetry("the layout was not accepted")

    # Paint by table lookup on the label map: each code's colour packed as little-endian RGBX in a uint32,
    # and a darker copy at code + EDGE for outlines where one part or object meets another (they make parts
    # readable, as shading does in photos). Whole-array ops only; gathering 3-byte rows is ~30x slower.
    packed = np.zeros(2 * EDGE, dtype=np.uint32)
    for number, spec in enumerate(z_specs):
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
    foreground = packed[labels + EDGE * edge]
    background = make_background(rng, size)
    rgbx = np.where(labels > 0, foreground, background.view(np.uint32)[..., 0])
    # Pillow drops the fourth byte in C; numpy's strided copy of 3 of every 4 bytes is ~10x slower.
    image = Image.frombuffer("RGBX", (size, size), rgbx, "raw", "RGBX", 0, 1).convert("RGB")
    return Scene(np.asarray(image), objects)
