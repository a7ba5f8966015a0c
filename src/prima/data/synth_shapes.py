"""M4Seg-Synth object catalogue: the categories, their named parts and colours, and how each is drawn.

Each category draws a part-label image (0 = not the object, i = part number i) at the exact pixel size it
will have in the scene, so masks are rendered, never estimated. Shapes are drawn in unit coordinates of
the object's box; a per-object ``style`` seed jitters proportions, so the same ``style`` draws the same
object again (used when one object must appear in two images).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

# Named colours: the words answers use ("the red mug"), chosen to stay apart from the muted backgrounds.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 35, 35),
    "orange": (240, 130, 20),
    "yellow": (240, 210, 40),
    "green": (40, 150, 60),
    "blue": (35, 80, 210),
    "purple": (125, 55, 175),
    "pink": (245, 120, 185),
    "brown": (125, 75, 35),
    "black": (30, 30, 30),
    "white": (245, 245, 245),
}

# Colours of parts that keep their own material whatever the object's colour.
MATERIALS: dict[str, tuple[int, int, int]] = {
    "glass": (170, 215, 240),
    "tyre": (45, 45, 50),
    "wood": (115, 72, 40),
    "screen": (35, 45, 70),
    "canvas": (240, 236, 220),
    "metal": (150, 152, 160),
}


@dataclass(frozen=True)
class Part:
    name: str  # the word in answers: "handle", "legs" (plural when the mask holds several pieces)
    colour: str  # "main", "dark", "light" (shades of the object's colour) or a MATERIALS key
    named: bool = True  # False: drawn (e.g. a mast) but never asked about or masked on its own


@dataclass(frozen=True)
class Category:
    name: str
    plural: str
    aspect: tuple[float, float]  # width / height range
    parts: tuple[Part, ...]
    draw: Callable[[Pen, np.random.Generator], None]
    colours: tuple[str, ...] = tuple(COLOURS)

    @property
    def named_parts(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts if p.named)

    def part_id(self, name: str) -> int:
        for i, p in enumerate(self.parts, start=1):
            if p.name == name:
                return i
        raise KeyError(f"{self.name} has no part {name!r}")


class Pen:
    """Draws part ids into an 'L' image of size (w, h), in unit coordinates of that box."""

    def __init__(self, w: int, h: int, category: Category):
        self.w, self.h, self.category = w, h, category
        self.image = Image.new("L", (w, h), 0)
        self.draw = ImageDraw.Draw(self.image)

    def _xy(self, pts):
        # Map unit coordinates to the last pixel inclusively, so 0..1 spans the whole box.
        return [(x * (self.w - 1), y * (self.h - 1)) for x, y in pts]

    def _id(self, part: str | None) -> int:
        return 0 if part is None else self.category.part_id(part)

    def rect(self, x0, y0, x1, y1, part):
        self.draw.rectangle(self._xy([(x0, y0), (x1, y1)]), fill=self._id(part))

    def rounded(self, x0, y0, x1, y1, radius, part):
        r = radius * min(self.w, self.h)
        self.draw.rounded_rectangle(self._xy([(x0, y0), (x1, y1)]), radius=r, fill=self._id(part))

    def ellipse(self, x0, y0, x1, y1, part):
        self.draw.ellipse(self._xy([(x0, y0), (x1, y1)]), fill=self._id(part))

    def polygon(self, pts, part):
        self.draw.polygon(self._xy(pts), fill=self._id(part))

    def labels(self) -> np.ndarray:
        return np.asarray(self.image, dtype=np.uint8)


def _u(rng: np.random.Generator, a: float, b: float) -> float:
    return float(rng.uniform(a, b))


def _chair(p: Pen, r: np.random.Generator) -> None:
    seat_y = _u(r, 0.48, 0.58)
    back_w = _u(r, 0.2, 0.26)
    leg_w = _u(r, 0.16, 0.2)
    p.rect(0.0, 0.0, back_w, seat_y, "back")
    p.rect(0.0, seat_y, 1.0, seat_y + 0.14, "seat")
    p.rect(0.02, seat_y + 0.14, 0.02 + leg_w, 1.0, "legs")
    p.rect(0.98 - leg_w, seat_y + 0.14, 0.98, 1.0, "legs")


def _mug(p: Pen, r: np.random.Generator) -> None:
    body_x1 = _u(r, 0.68, 0.74)
    p.ellipse(body_x1 - 0.2, 0.16, 1.0, 0.8, "handle")
    p.ellipse(body_x1 - 0.06, 0.32, 0.86, 0.64, None)  # the hole through the handle
    p.rounded(0.0, 0.0, body_x1, 1.0, 0.12, "body")


def _car(p: Pen, r: np.random.Generator) -> None:
    roof = _u(r, 0.0, 0.08)
    cab0, cab1 = _u(r, 0.18, 0.26), _u(r, 0.7, 0.8)
    p.polygon([(cab0, 0.42), (cab0 + 0.1, roof), (cab1 - 0.08, roof), (cab1, 0.42)], "body")
    p.rounded(0.0, 0.38, 1.0, 0.8, 0.15, "body")
    mid = (cab0 + cab1) / 2
    p.polygon([(cab0 + 0.06, 0.4), (cab0 + 0.13, roof + 0.07), (mid - 0.03, roof + 0.07), (mid - 0.03, 0.4)], "windows")
    p.polygon([(mid + 0.03, 0.4), (mid + 0.03, roof + 0.07), (cab1 - 0.1, roof + 0.07), (cab1 - 0.04, 0.4)], "windows")
    wheel_r = _u(r, 0.11, 0.13)
    wheel_h = wheel_r * p.w / p.h  # round wheels in pixels, whatever the box's aspect
    for cx in (0.22, 0.78):
        p.ellipse(cx - wheel_r, 1.0 - 2 * wheel_h, cx + wheel_r, 1.0, "wheels")


def _house(p: Pen, r: np.random.Generator) -> None:
    eave = _u(r, 0.38, 0.46)
    p.rect(0.08, eave, 0.92, 1.0, "walls")
    p.polygon([(0.0, eave + 0.02), (0.5, 0.0), (1.0, eave + 0.02)], "roof")
    door_w = _u(r, 0.16, 0.2)
    p.rect(0.5 - door_w / 2, 0.66, 0.5 + door_w / 2, 1.0, "door")
    win = _u(r, 0.15, 0.19)
    for x0 in (0.15, 0.85 - win):
        p.rect(x0, eave + 0.1, x0 + win, eave + 0.1 + win * 1.1, "windows")


def _lamp(p: Pen, r: np.random.Generator) -> None:
    shade_h = _u(r, 0.3, 0.36)
    top = _u(r, 0.2, 0.3)
    p.rect(0.38, shade_h - 0.02, 0.62, 0.92, "pole")
    p.polygon([(top, 0.0), (1.0 - top, 0.0), (1.0, shade_h), (0.0, shade_h)], "shade")
    p.rounded(0.1, 0.88, 0.9, 1.0, 0.05, "base")


def _tree(p: Pen, r: np.random.Generator) -> None:
    trunk_w = _u(r, 0.18, 0.24)
    crown_bottom = _u(r, 0.6, 0.7)
    p.rect(0.5 - trunk_w / 2, crown_bottom - 0.1, 0.5 + trunk_w / 2, 1.0, "trunk")
    p.ellipse(0.0, 0.0, 1.0, crown_bottom, "crown")


def _table(p: Pen, r: np.random.Generator) -> None:
    top_h = _u(r, 0.14, 0.18)
    leg_w = _u(r, 0.08, 0.1)
    p.rect(0.04, top_h, 0.04 + leg_w, 1.0, "legs")
    p.rect(0.96 - leg_w, top_h, 0.96, 1.0, "legs")
    p.rect(0.0, 0.0, 1.0, top_h, "top")


def _bottle(p: Pen, r: np.random.Generator) -> None:
    shoulder = _u(r, 0.36, 0.42)
    neck_w = _u(r, 0.4, 0.46)
    x0 = 0.5 - neck_w / 2
    p.rect(x0, 0.1, 1.0 - x0, shoulder + 0.05, "neck")
    p.rect(x0 - 0.04, 0.0, 1.0 - x0 + 0.04, 0.12, "cap")
    p.rounded(0.0, shoulder, 1.0, 1.0, 0.2, "body")


def _laptop(p: Pen, r: np.random.Generator) -> None:
    hinge = _u(r, 0.6, 0.66)
    p.rect(0.1, 0.0, 0.9, hinge, "frame")
    p.rect(0.18, 0.08, 0.82, hinge - 0.08, "screen")
    p.polygon([(0.1, hinge), (0.9, hinge), (1.0, 1.0), (0.0, 1.0)], "keyboard")


def _boat(p: Pen, r: np.random.Generator) -> None:
    deck = _u(r, 0.62, 0.7)
    p.rect(0.46, 0.0, 0.54, deck, "mast")
    p.polygon([(0.44, 0.04), (0.44, deck - 0.06), (_u(r, 0.08, 0.16), deck - 0.06)], "sail")
    p.polygon([(0.0, deck), (1.0, deck), (0.82, 1.0), (0.18, 1.0)], "hull")


def _kettle(p: Pen, r: np.random.Generator) -> None:
    p.polygon([(0.0, 0.2), (0.15, 0.2), (0.42, 0.5), (0.38, 0.82)], "spout")
    p.ellipse(0.62, 0.28, 1.0, 0.82, "handle")
    p.ellipse(0.72, 0.4, 0.9, 0.7, None)
    p.rounded(0.22, 0.28, 0.82, 1.0, _u(r, 0.2, 0.3), "body")
    p.ellipse(0.36, 0.14, 0.68, 0.34, "lid")


def _television(p: Pen, r: np.random.Generator) -> None:
    bottom = _u(r, 0.78, 0.84)
    p.rect(0.0, 0.0, 1.0, bottom, "frame")
    p.rect(0.09, 0.1, 0.91, bottom - 0.1, "screen")
    p.rect(0.4, bottom, 0.6, 0.92, "stand")
    p.rect(0.22, 0.9, 0.78, 1.0, "stand")


CATEGORIES: dict[str, Category] = {
    c.name: c
    for c in (
        Category(
            "chair", "chairs", (0.6, 0.72), (Part("back", "main"), Part("seat", "light"), Part("legs", "dark")), _chair
        ),
        Category("mug", "mugs", (1.0, 1.15), (Part("body", "main"), Part("handle", "dark")), _mug),
        Category(
            "car", "cars", (1.7, 2.0), (Part("body", "main"), Part("wheels", "tyre"), Part("windows", "glass")), _car
        ),
        Category(
            "house",
            "houses",
            (0.9, 1.1),
            (Part("walls", "main"), Part("roof", "dark"), Part("door", "wood"), Part("windows", "glass")),
            _house,
        ),
        Category(
            "lamp", "lamps", (0.55, 0.65), (Part("shade", "main"), Part("pole", "metal"), Part("base", "dark")), _lamp
        ),
        Category(
            "tree",
            "trees",
            (0.75, 0.9),
            (Part("crown", "main"), Part("trunk", "wood")),
            _tree,
            colours=("green", "orange", "yellow", "red", "pink"),
        ),
        Category("table", "tables", (1.4, 1.7), (Part("top", "main"), Part("legs", "dark")), _table),
        Category(
            "bottle",
            "bottles",
            (0.42, 0.5),
            (Part("body", "main"), Part("neck", "light"), Part("cap", "dark")),
            _bottle,
        ),
        Category(
            "laptop",
            "laptops",
            (1.1, 1.25),
            (Part("screen", "screen"), Part("keyboard", "main"), Part("frame", "main", named=False)),
            _laptop,
        ),
        Category(
            "boat",
            "boats",
            (1.1, 1.3),
            (Part("hull", "main"), Part("sail", "canvas"), Part("mast", "wood", named=False)),
            _boat,
        ),
        Category(
            "kettle",
            "kettles",
            (1.15, 1.3),
            (Part("body", "main"), Part("spout", "dark"), Part("handle", "dark"), Part("lid", "light")),
            _kettle,
        ),
        Category(
            "television",
            "televisions",
            (1.25, 1.4),
            (Part("screen", "screen"), Part("stand", "dark"), Part("frame", "main", named=False)),
            _television,
        ),
    )
}


def shade(rgb: tuple[int, int, int], role: str) -> tuple[int, int, int]:
    """A part's colour from its object's colour: darker or lighter, flipped when the colour is already extreme."""
    c = np.asarray(rgb, dtype=np.float32)
    luma = float(c @ np.asarray([0.299, 0.587, 0.114]))
    if role == "dark":
        out = c * 0.55 if luma > 70 else c + (255 - c) * 0.4
    elif role == "light":
        out = c + (255 - c) * 0.45 if luma < 190 else c * 0.72
    else:
        out = c
    return tuple(int(v) for v in out.round())


def part_colours(category: Category, colour: str, recolour: tuple[tuple[str, str], ...] = ()) -> np.ndarray:
    """(1 + parts, 3) uint8 lookup: row i is part i's colour for an object of ``colour``.

    ``recolour`` paints named parts in a named colour of their own (the odd part of an otherwise equal object).
    """
    main = COLOURS[colour]
    own = dict(recolour)
    rows = [(0, 0, 0)]
    for part in category.parts:
        if part.name in own:
            rows.append(COLOURS[own[part.name]])
            continue
        if part.colour in MATERIALS:
            rgb = MATERIALS[part.colour]
            # A material too close to the object's own colour would hide the part's outline: shade instead.
            if np.abs(np.subtract(rgb, main)).sum() < 120:
                rgb = shade(main, "dark" if part.name != "body" else "light")
        else:
            rgb = shade(main, part.colour)
        rows.append(rgb)
    return np.asarray(rows, dtype=np.uint8)


@lru_cache(maxsize=512)
def draw_object(category: Category, style: int, height: int, flip: bool) -> np.ndarray:
    """Part-label array (h, w) of one object ``height`` pixels tall; ``style`` fixes its proportions.

    Cached (read-only): a scene laid out again, or the same object in another image, often asks again.
    """
    rng = np.random.default_rng(style)
    aspect = _u(rng, *category.aspect)
    width = max(8, int(round(height * aspect)))
    pen = Pen(width, height, category)
    category.draw(pen, rng)
    labels = pen.labels()
    labels = labels[:, ::-1] if flip else labels
    labels.flags.writeable = False
    return labels
