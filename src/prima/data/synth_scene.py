"""M4Seg-Synth scenes: a textured background with objects placed on it, and the exact visible masks.

Objects are pasted in z-order; a later object may hide part of an earlier one, but never more than
allows the earlier object (and each of its named parts) to stay recognisable. Masks hold the visible
pixels only. Everything is numpy over whole arrays or box-sized slices: no per-pixel Python.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from prima.data.synth_shapes import CATEGORIES, draw_object, part_colours

MIN_VISIBLE_OBJECT = 0.6  # share of an object's pixels that must stay visible
MIN_VISIBLE_PART = 0.5  # share of each named part's pixels that must stay visible
MIN_PART_AREA = 0.0012  # a named part's visible area as a share of the image (≈20 px at 128 px)
PLACEMENT_TRIES = 40
CODE_STRIDE = 16  # label code = (object number + 1) * CODE_STRIDE + part id; parts per object < 16


class SceneRetry(Exception):
    """The requested scene could not be laid out with these draws; the caller draws again."""


@dataclass(frozen=True)
class ObjectSpec:
    """What to draw: the same (category, colour, style) draws the same-looking object."""

    category: str
    colour: str
    style: int

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


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    h = rng.uniform()
    s = rng.uniform(0.12, 0.3)
    v = rng.uniform(0.62, 0.88)
    return np.asarray(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32) * 255


def _smooth_field(rng: np.random.Generator, size: int, cells: int, amplitude: float) -> np.ndarray:
    small = rng.uniform(-amplitude, amplitude, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small, mode="F").resize((size, size), Image.BILINEAR))


def make_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted textured background (S, S, 3) float32: wall and floor, stripes, tiles or soft blotches."""
    kind = rng.integers(4)
    first, second = _muted_colour(rng), _muted_colour(rng)
    ys = np.arange(size)[:, None]
    xs = np.arange(size)[None, :]
    use_second = np.zeros((size, size), dtype=bool)  # where the second colour shows
    shade = np.ones((size, size), dtype=np.float32)  # multiplicative pattern
    if kind == 0:  # wall and floor, the floor with boards
        horizon = int(size * rng.uniform(0.45, 0.7))
        period = max(4, int(size * rng.uniform(0.06, 0.12)))
        use_second |= ys >= horizon
        shade = np.where((ys >= horizon) & ((ys - horizon) % period == 0), np.float32(0.85), shade)
    elif kind == 1:  # wallpaper stripes
        period = max(4, int(size * rng.uniform(0.04, 0.1)))
        axis = xs + 0 * ys if rng.uniform() < 0.5 else xs + ys
        shade = np.where((axis // period) % 2 == 1, np.float32(rng.uniform(0.88, 0.95)), shade)
    elif kind == 2:  # floor tiles in two colours
        tile = max(6, int(size * rng.uniform(0.08, 0.18)))
        use_second |= ((xs // tile) + (ys // tile)) % 2 == 1
        second = 0.5 * first + 0.5 * second
    field = _smooth_field(rng, size, int(rng.integers(3, 7)), 14.0)
    image = np.where(use_second[..., None], second, first).astype(np.float32)
    image *= shade[..., None]
    image += field[..., None]
    return image


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


def render_scene(rng: np.random.Generator, specs: list[ObjectSpec], size: int) -> Scene:
    """Draw ``specs`` (each (category, colour) at most once) on a fresh background, in random z-order."""
    if len({(s.category, s.colour) for s in specs}) != len(specs):
        raise ValueError("a scene may hold each (category, colour) once, so that phrases name one object")
    order = [int(i) for i in rng.permutation(len(specs))]
    z_specs = [specs[i] for i in order]
    scale = 1.0 if len(specs) <= 2 else 0.75 if len(specs) == 3 else 0.6
    labels = np.zeros((size, size), dtype=np.int16)
    placed = _place(rng, z_specs, size, labels, scale)

    image = make_background(rng, size)
    objects: dict[int, PlacedObject] = {}
    for number, (spec, (x, y, part_labels)) in enumerate(zip(z_specs, placed)):
        category = CATEGORIES[spec.category]
        lut = part_colours(category, spec.colour).astype(np.float32)
        base_code = (number + 1) * CODE_STRIDE
        h, w = part_labels.shape
        view = labels[y : y + h, x : x + w]
        visible = (view > base_code) & (view < base_code + CODE_STRIDE)
        image[y : y + h, x : x + w][visible] = lut[view[visible] - base_code]
        mask = np.zeros((size, size), dtype=bool)
        mask[y : y + h, x : x + w] = visible
        parts = {}
        for i, part in enumerate(category.parts, start=1):
            if part.named:
                pm = np.zeros((size, size), dtype=bool)
                pm[y : y + h, x : x + w] = view == base_code + i
                parts[part.name] = pm
        objects[order[number]] = PlacedObject(spec, mask, parts, (x, y, x + w, y + h))

    # Dark outlines where one part or object meets another make parts readable, as shading does in photos.
    edge = np.zeros((size, size), dtype=bool)
    diff_x = labels[:, 1:] != labels[:, :-1]
    diff_y = labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= diff_x
    edge[:, :-1] |= diff_x
    edge[1:, :] |= diff_y
    edge[:-1, :] |= diff_y
    edge &= labels > 0
    image *= np.where(edge, np.float32(0.6), np.float32(1.0))[..., None]
    pixels = np.clip(image, 0, 255).astype(np.uint8)
    return Scene(pixels, [objects[i] for i in range(len(specs))])
