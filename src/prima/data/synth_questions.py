"""M4Seg-Synth question families: each plans the objects of every image, renders them and writes the Q&A.

Language is templated on purpose: one question form and one answer form per family (variety comes from
scenes, colours, counts and positions), so a tiny model can learn it. Objects are named "red mug", parts
"red mug's handle"; within one image each (category, colour) occurs once, so every phrase names one thing.

Families marked cross-image can only be answered by comparing images (DESIGN §3.3); the others are sums of
per-image decisions. ``FAMILIES`` maps each family to its M4Seg category.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from prima.constants import PHRASE_END, PHRASE_START, SEG_TOKEN, image_tag
from prima.data.masks import encode_rle
from prima.data.schema import Segment
from prima.data.synth_scene import ObjectSpec, PlacedObject, Scene, SceneRetry, layout_scene, paint_scene
from prima.data.synth_shapes import CATEGORIES, COLOURS, part_colours
from prima.errors import PrimaError

MAX_OBJECTS = 4  # per image
SPATIAL_MARGIN = 0.08  # centres closer than this share of the width are neither left nor right


@dataclass
class Draft:
    """One finished sample before it is written: rendered scenes and grounded text."""

    scenes: list[Scene]
    question: str
    answer: str
    segments: list[Segment]
    family: str
    category: str = ""


class Grounder:
    """Writes `<p> phrase </p> [SEG] (IMAGEk)` and records the matching segment, in answer order."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def _seg(self, phrase: str, image: int, mask: np.ndarray, kind: str) -> str:
        self.segments.append(Segment(phrase=phrase, image=image, mask=encode_rle(mask), kind=kind))
        return f"{PHRASE_START} {phrase} {PHRASE_END} {SEG_TOKEN} {image_tag(image)}"

    def obj(self, image: int, placed: PlacedObject) -> str:
        """The object, grounded in ``image`` (0-based here; written 1-based)."""
        return self._seg(placed.spec.phrase, image + 1, placed.mask, "object")

    def part(self, image: int, placed: PlacedObject, part: str) -> str:
        return self._seg(placed.spec.part_phrase(part), image + 1, placed.parts[part], "part")

    def again(self, image: int, placed: PlacedObject) -> str:
        """A later mention of an object grounded before: `<p> phrase </p> (IMAGEk)`, no [SEG], no new mask."""
        return f"{PHRASE_START} {placed.spec.phrase} {PHRASE_END} {image_tag(image + 1)}"


# ----------------------------------------------------------------------------------------------- words

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def join(items: Sequence[str], conjunction: str = "and") -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {conjunction} " + items[-1]


def the(items: Sequence[str], conjunction: str = "and") -> str:
    """'the A', 'the A and the B', 'the A, the B and the C'."""
    return join([f"the {x}" for x in items], conjunction)


def cap(text: str) -> str:
    """First letter upper-cased, the rest untouched (str.capitalize would lower-case '[SEG]')."""
    return text[:1].upper() + text[1:]


def noun(category: str, count: int) -> str:
    return category if count == 1 else CATEGORIES[category].plural


# ------------------------------------------------------------------------------------------- planning

Plan = list[list[ObjectSpec]]  # the objects of each image


def choice(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def new_spec(
    rng: np.random.Generator, category: str, colour: str | None = None, avoid: Sequence[str] = ()
) -> ObjectSpec:
    if colour is None:
        colours = [c for c in CATEGORIES[category].colours if c not in avoid]
        if not colours:
            raise SceneRetry(f"no colour left for a {category}")
        colour = choice(rng, colours)
    return ObjectSpec(category, colour, int(rng.integers(2**31)))


def fill(
    rng: np.random.Generator,
    plan: Plan,
    images: Sequence[int] | None = None,
    ban_categories: Sequence[str] = (),
    ban_colours: Sequence[str] = (),
    low: int = 1,
    high: int = 3,
) -> None:
    """Add distractor objects to ``images`` until each holds low..high objects (never a category twice)."""
    for k in range(len(plan)) if images is None else images:
        target = min(MAX_OBJECTS, max(len(plan[k]), int(rng.integers(low, high + 1))))
        present = {s.category for s in plan[k]}
        allowed = [c for c in CATEGORIES if c not in ban_categories and c not in present]
        while len(plan[k]) < target and allowed:
            category = allowed.pop(int(rng.integers(len(allowed))))
            colours = [c for c in CATEGORIES[category].colours if c not in ban_colours]
            if colours:
                plan[k].append(new_spec(rng, category, choice(rng, colours)))


def render(
    rng: np.random.Generator,
    plan: Plan,
    size: int,
    accept: dict[int, Callable[[list[PlacedObject]], bool]] | None = None,
    tries: int = 12,
) -> list[Scene]:
    """Lay out every image (image k again until ``accept[k]`` holds), then paint them all.

    Laying out first means a sample that fails on its last image has not paid for painting the others.
    """
    layouts = []
    for k, specs in enumerate(plan):
        check = (accept or {}).get(k)
        for _ in range(tries if check else 1):
            try:
                layouts.append(layout_scene(rng, specs, size, check))
                break
            except SceneRetry:
                continue
        else:
            raise SceneRetry(f"no accepted layout for image {k + 1}")
    return [paint_scene(rng, layout) for layout in layouts]


def centre_x(obj: PlacedObject) -> float:
    """Mean of the columns the visible pixels cover: where the object is, left to right, as a person sees it."""
    xs = np.nonzero(obj.mask.any(axis=0))[0]
    return float(xs.mean())


def side_of(obj: PlacedObject, ref: PlacedObject, size: int) -> str | None:
    """'left', 'right', or None when the two are too close to call."""
    dx = centre_x(obj) - centre_x(ref)
    if abs(dx) < SPATIAL_MARGIN * size:
        return None
    return "left" if dx < 0 else "right"


def two_images(rng: np.random.Generator, n: int) -> tuple[int, int]:
    a, b = rng.permutation(n)[:2]
    return int(a), int(b)


# ------------------------------------------------------------------------------------------- families


def common(rng: np.random.Generator, n: int, size: int) -> Draft:
    negative = rng.uniform() < 0.15
    plan: Plan = [[] for _ in range(n)]
    category = choice(rng, list(CATEGORIES))
    if not negative:
        for specs in plan:
            specs.append(new_spec(rng, category))
    fill(rng, plan, ban_categories=[category])
    shared = set.intersection(*({s.category for s in specs} for specs in plan))
    if shared != (set() if negative else {category}):
        raise SceneRetry("another category is in every image")
    scenes = render(rng, plan, size)
    g = Grounder()
    question = "Which object appears in every image?"
    if negative:
        answer = "No object appears in every image."
    else:
        found = [g.obj(k, scenes[k].find(plan[k][0])) for k in range(n)]
        answer = f"{cap(article(category))} {category} appears in every image: {the(found)}."
    return Draft(scenes, question, answer, g.segments, "common")


def attribute_matching(rng: np.random.Generator, n: int, size: int) -> Draft:
    a, b = two_images(rng, n)
    first = choice(rng, list(CATEGORIES))
    colour = choice(rng, CATEGORIES[first].colours)
    others = [c for c in CATEGORIES if c != first and colour in CATEGORIES[c].colours]
    second = choice(rng, others)
    x, y = new_spec(rng, first, colour), new_spec(rng, second, colour)
    plan: Plan = [[] for _ in range(n)]
    plan[a].append(x)
    plan[b].append(y)
    fill(rng, plan, [a], ban_categories=[first, second])
    fill(rng, plan, [b], ban_categories=[second], ban_colours=[colour])
    fill(rng, plan, [k for k in range(n) if k not in (a, b)])
    scenes = render(rng, plan, size)
    g = Grounder()
    question = f"Which object in image {b + 1} has the same colour as the {first} in image {a + 1}?"
    answer = f"The {g.obj(b, scenes[b].find(y))} is {colour}, like the {g.obj(a, scenes[a].find(x))}."
    return Draft(scenes, question, answer, g.segments, "attribute-matching")


def odd_one_out(rng: np.random.Generator, n: int, size: int) -> Draft:
    category = choice(rng, list(CATEGORIES))
    usual = choice(rng, CATEGORIES[category].colours)
    odd_colour = choice(rng, [c for c in CATEGORIES[category].colours if c != usual])
    odd = int(rng.integers(n))
    plan: Plan = [[new_spec(rng, category, odd_colour if k == odd else usual)] for k in range(n)]
    fill(rng, plan, ban_categories=[category])
    scenes = render(rng, plan, size)
    g = Grounder()
    question = f"Each image shows {article(category)} {category}. Which {category} is the odd one out?"
    obj = scenes[odd].find(plan[odd][0])
    answer = (
        f"The {g.obj(odd, obj)} is the odd one out: the {g.again(odd, obj)} is {odd_colour}, "
        f"while the other {CATEGORIES[category].plural} are {usual}."
    )
    return Draft(scenes, question, answer, g.segments, "odd-one-out")


def is_plural(part: str) -> bool:
    return part.endswith("s")  # legs, wheels, windows, walls: the catalogue names every plural part so


def odd_part(rng: np.random.Generator, n: int, size: int) -> Draft:
    category = choice(rng, list(CATEGORIES))
    colour = choice(rng, CATEGORIES[category].colours)
    part = choice(rng, CATEGORIES[category].named_parts)
    usual = part_colours(CATEGORIES[category], colour)[CATEGORIES[category].part_id(part)].astype(int)
    # The odd colour must stand out from the part's usual colour and from the object's own.
    odd_colours = [c for c, rgb in COLOURS.items() if c != colour and np.abs(np.subtract(rgb, usual)).sum() > 200]
    odd_colour = choice(rng, odd_colours)
    same = new_spec(rng, category, colour)
    odd = ObjectSpec(category, colour, same.style, recolour=((part, odd_colour),))
    j = int(rng.integers(n))
    plan: Plan = [[odd if k == j else same] for k in range(n)]
    fill(rng, plan, ban_categories=[category], high=2)
    scenes = render(rng, plan, size)
    g = Grounder()
    verb = "are" if is_plural(part) else "is"
    question = f"Each image shows the same {category}, but in one image a part of it has another colour. Which part?"
    answer = f"In image {j + 1}, the {g.part(j, scenes[j].find(odd), part)} {verb} {odd_colour}."
    return Draft(scenes, question, answer, g.segments, "odd-part")


def parts(rng: np.random.Generator, n: int, size: int) -> Draft:
    k = int(rng.integers(n))
    category = choice(rng, list(CATEGORIES))
    target = new_spec(rng, category)
    plan: Plan = [[] for _ in range(n)]
    plan[k].append(target)
    fill(rng, plan, [k], ban_categories=[category])
    fill(rng, plan, [i for i in range(n) if i != k])
    scenes = render(rng, plan, size)
    g = Grounder()
    obj = scenes[k].find(target)
    found = [g.part(k, obj, p) for p in CATEGORIES[category].named_parts]
    question = f"What are the parts of the {category} in image {k + 1}?"
    return Draft(scenes, question, f"{cap(the(found))}.", g.segments, "parts")


def correspondence(rng: np.random.Generator, n: int, size: int) -> Draft:
    category = choice(rng, list(CATEGORIES))
    colours = list(CATEGORIES[category].colours)
    rng.shuffle(colours)
    twin = new_spec(rng, category, colours.pop())
    i, j = sorted(two_images(rng, n))
    plan: Plan = [[] for _ in range(n)]
    plan[i].append(twin)
    plan[j].append(twin)
    for k in range(n):  # other objects of the category, each seen once, so only the twin recurs
        if rng.uniform() < 0.4 and colours:
            plan[k].append(new_spec(rng, category, colours.pop()))
    fill(rng, plan, ban_categories=[category])
    scenes = render(rng, plan, size)
    g = Grounder()
    parts = CATEGORIES[category].named_parts
    where = f"The {twin.phrase} appears in images {i + 1} and {j + 1}"
    if rng.uniform() < 0.3:
        question = f"One {category} appears in two of the images. Where is it?"
        found = [g.obj(k, scenes[k].find(twin)) for k in (i, j)]
    else:
        part = choice(rng, parts)
        question = f"One {category} appears in two of the images. Segment its {part} in both."
        found = [g.part(k, scenes[k].find(twin), part) for k in (i, j)]
    return Draft(scenes, question, f"{where}: {the(found)}.", g.segments, "correspondence")


def difference(rng: np.random.Generator, n: int, size: int) -> Draft:
    a, b = two_images(rng, n)
    categories = [str(c) for c in rng.permutation(list(CATEGORIES))]
    count = int(rng.integers(2, 4))
    shown = [new_spec(rng, c) for c in categories[:count]]
    negative = rng.uniform() < 0.15
    removed = [] if negative else shown[: 1 + int(rng.uniform() < 0.25 and count == 3)]
    plan: Plan = [[] for _ in range(n)]
    plan[a] = list(shown)
    plan[b] = [s for s in shown if s not in removed]
    if rng.uniform() < 0.5 or not plan[b]:  # something only image b has, so the direction matters
        plan[b].append(new_spec(rng, categories[count]))
    fill(rng, plan, [k for k in range(n) if k not in (a, b)])
    scenes = render(rng, plan, size)
    g = Grounder()
    question = f"What is in image {a + 1} but not in image {b + 1}?"
    if negative:
        answer = f"Nothing: everything in image {a + 1} is also in image {b + 1}."
    else:
        answer = f"{cap(the([g.obj(a, scenes[a].find(s)) for s in removed]))}."
    return Draft(scenes, question, answer, g.segments, "difference")


def _spread(rng: np.random.Generator, category: str, counts: Sequence[int]) -> Plan:
    """``counts[k]`` objects of ``category`` in image k, each image's in distinct colours."""
    plan: Plan = []
    for count in counts:
        colours = [str(c) for c in rng.permutation(list(CATEGORIES[category].colours))[:count]]
        plan.append([new_spec(rng, category, c) for c in colours])
    return plan


def most(rng: np.random.Generator, n: int, size: int) -> Draft:
    category = choice(rng, list(CATEGORIES))
    counts = rng.integers(0, 4, n)
    top = int(counts.argmax())
    if counts[top] == 0 or (counts == counts[top]).sum() > 1:
        raise SceneRetry("no single image has the most")
    plan = _spread(rng, category, counts)
    fill(rng, plan, ban_categories=[category], low=1, high=MAX_OBJECTS)
    scenes = render(rng, plan, size)
    g = Grounder()
    found = [g.obj(top, scenes[top].find(s)) for s in plan[top][: counts[top]]]
    question = f"Which image has the most {CATEGORIES[category].plural}?"
    answer = f"Image {top + 1}, with {NUMBER_WORDS[counts[top]]} {noun(category, counts[top])}: {the(found)}."
    return Draft(scenes, question, answer, g.segments, "most")


def counting(rng: np.random.Generator, n: int, size: int) -> Draft:
    category = choice(rng, list(CATEGORIES))
    counts = np.zeros(n, dtype=int) if rng.uniform() < 0.15 else rng.integers(0, 3, n)
    plan = _spread(rng, category, counts)
    fill(rng, plan, ban_categories=[category])
    scenes = render(rng, plan, size)
    g = Grounder()
    found = [g.obj(k, scenes[k].find(s)) for k in range(n) for s in plan[k][: counts[k]]]
    total = len(found)
    plural = CATEGORIES[category].plural
    question = f"How many {plural} are there in these images?"
    if total == 0:
        answer = f"There are no {plural} in these images."
    else:
        verb = "is" if total == 1 else "are"
        answer = f"There {verb} {NUMBER_WORDS[total]} {noun(category, total)}: {the(found)}."
    return Draft(scenes, question, answer, g.segments, "counting")


def existence(rng: np.random.Generator, n: int, size: int) -> Draft:
    category = choice(rng, list(CATEGORIES))
    counts = np.zeros(n, dtype=int)
    if rng.uniform() < 0.5:
        for k in rng.permutation(n)[: int(rng.integers(1, 3))]:
            counts[k] = 1
    plan = _spread(rng, category, counts)
    fill(rng, plan, ban_categories=[category])
    scenes = render(rng, plan, size)
    g = Grounder()
    found = [g.obj(k, scenes[k].find(s)) for k in range(n) for s in plan[k][: counts[k]]]
    question = f"Is there {article(category)} {category} in any of the images?"
    answer = f"Yes: {the(found)}." if found else f"No, none of the images shows {article(category)} {category}."
    return Draft(scenes, question, answer, g.segments, "existence")


def spatial(rng: np.random.Generator, n: int, size: int) -> Draft:
    k = int(rng.integers(n))
    categories = [str(c) for c in rng.permutation(list(CATEGORIES))]
    reference = new_spec(rng, categories[0])
    plan: Plan = [[] for _ in range(n)]
    plan[k] = [reference] + [new_spec(rng, c) for c in categories[1 : 1 + int(rng.integers(1, 4))]]
    fill(rng, plan, [i for i in range(n) if i != k])

    def clear(objs: list[PlacedObject]) -> bool:  # every object clearly left or right of the reference
        return None not in [side_of(o, objs[0], size) for o in objs[1:]]

    scenes = render(rng, plan, size, accept={k: clear})
    ref = scenes[k].find(reference)
    sides = [side_of(obj, ref, size) for obj in scenes[k].objects[1:]]
    direction = choice(rng, ("left", "right"))
    g = Grounder()
    found = [g.obj(k, obj) for obj, side in zip(scenes[k].objects[1:], sides) if side == direction]
    question = f"What is to the {direction} of the {reference.category} in image {k + 1}?"
    if found:
        verb = "is" if len(found) == 1 else "are"
        answer = f"{cap(the(found))} {verb} to the {direction} of the {g.obj(k, ref)}."
    else:
        answer = f"Nothing is to the {direction} of the {g.obj(k, ref)}."
    return Draft(scenes, question, answer, g.segments, "spatial")


def spatial_compare(rng: np.random.Generator, n: int, size: int) -> Draft:
    first, second = (str(c) for c in rng.permutation(list(CATEGORIES))[:2])
    direction = choice(rng, ("left", "right"))
    other = "right" if direction == "left" else "left"
    target = int(rng.integers(n))
    plan: Plan = [[new_spec(rng, first), new_spec(rng, second)] for _ in range(n)]
    fill(rng, plan, ban_categories=[first, second], low=2, high=3)

    def standing(want: str) -> Callable[[list[PlacedObject]], bool]:  # the pair clearly the ``want`` way round
        return lambda objs: side_of(objs[0], objs[1], size) == want

    scenes = render(rng, plan, size, accept={k: standing(direction if k == target else other) for k in range(n)})
    g = Grounder()
    x, y = scenes[target].objects[0], scenes[target].objects[1]
    question = f"In which image is the {first} to the {direction} of the {second}?"
    answer = f"In image {target + 1}: the {g.obj(target, x)} is to the {direction} of the {g.obj(target, y)}."
    return Draft(scenes, question, answer, g.segments, "spatial-compare")


# What an object is for, and what a part is for: (verb, categories) and (verb, purpose, (category, part)s).
USES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sit on", ("chair",)),
    ("drink from", ("mug", "bottle")),
    ("travel in", ("car", "boat")),
    ("live in", ("house",)),
    ("read under", ("lamp", "tree")),
    ("eat a meal at", ("table",)),
    ("boil water in", ("kettle",)),
    ("watch a film on", ("television", "laptop")),
    ("write an email on", ("laptop",)),
)
PART_USES: tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...] = (
    ("sit on", "", (("chair", "seat"),)),
    ("lean against", "", (("chair", "back"),)),
    ("hold", " to drink", (("mug", "handle"),)),
    ("hold", " to pour tea", (("kettle", "handle"),)),
    ("pour water from", "", (("kettle", "spout"),)),
    ("unscrew", " to open a drink", (("bottle", "cap"),)),
    ("walk through", " to go inside", (("house", "door"),)),
    ("look through", " to see outside", (("house", "windows"), ("car", "windows"))),
    ("watch", " to follow the news", (("television", "screen"), ("laptop", "screen"))),
    ("type on", "", (("laptop", "keyboard"),)),
    ("put a plate on", "", (("table", "top"),)),
    ("put a bulb in", "", (("lamp", "shade"),)),
    ("pump air into", "", (("car", "wheels"),)),
    ("climb", "", (("tree", "trunk"),)),
    ("pick fruit from", "", (("tree", "crown"),)),
    ("raise", " to catch the wind", (("boat", "sail"),)),
    ("repair", " when rain leaks in", (("house", "roof"),)),
)


def _scatter(rng: np.random.Generator, n: int, categories: Sequence[str], negative: bool) -> Plan:
    """1-3 objects of ``categories`` over random images (none when ``negative``), distractors elsewhere."""
    plan: Plan = [[] for _ in range(n)]
    wanted = 0 if negative else int(rng.integers(1, 4))
    for _ in range(wanted):
        k = int(rng.integers(n))
        category = choice(rng, categories)
        taken = [s.colour for s in plan[k] if s.category == category]
        if len(plan[k]) < 2:
            plan[k].append(new_spec(rng, category, avoid=taken))
    fill(rng, plan, ban_categories=categories)
    return plan


def functional(rng: np.random.Generator, n: int, size: int) -> Draft:
    verb, categories = choice(rng, USES)
    plan = _scatter(rng, n, categories, negative=rng.uniform() < 0.2)
    scenes = render(rng, plan, size)
    g = Grounder()
    found = [g.obj(k, scenes[k].find(s)) for k in range(n) for s in plan[k] if s.category in categories]
    question = f"What in these images could you {verb}?"
    if found:
        answer = f"You could {verb} {the(found, 'or')}."
    else:
        answer = f"None of the images shows something you could {verb}."
    return Draft(scenes, question, answer, g.segments, "functional")


def functional_part(rng: np.random.Generator, n: int, size: int) -> Draft:
    verb, purpose, targets = choice(rng, PART_USES)
    part_of = dict(targets)
    plan = _scatter(rng, n, list(part_of), negative=rng.uniform() < 0.2)
    scenes = render(rng, plan, size)
    g = Grounder()
    found = [
        g.part(k, scenes[k].find(s), part_of[s.category]) for k in range(n) for s in plan[k] if s.category in part_of
    ]
    question = f"Which part would you {verb}{purpose}?"
    if found:
        answer = f"You would {verb} {the(found, 'or')}{purpose}."
    else:
        answer = f"None of the images shows a part you would {verb}{purpose}."
    return Draft(scenes, question, answer, g.segments, "functional-part")


def describe(rng: np.random.Generator, n: int, size: int) -> Draft:
    """Auxiliary (not in the test mix): name every object of one image, left to right. Each phrase is told by the
    pixels alone, so training on it teaches reading colours and categories from one named image."""
    k = int(rng.integers(n))
    plan: Plan = [[] for _ in range(n)]
    fill(rng, plan, low=1, high=MAX_OBJECTS)
    scenes = render(rng, plan, size)
    g = Grounder()
    objects = sorted(scenes[k].objects, key=centre_x)
    found = [g.obj(k, obj) for obj in objects]
    question = f"What objects are in image {k + 1}, from left to right?"
    return Draft(scenes, question, f"Image {k + 1} shows {the(found)}.", g.segments, "describe")


@dataclass(frozen=True)
class Family:
    make: Callable[[np.random.Generator, int, int], Draft]
    category: str  # the M4Seg category
    weight: float  # relative frequency
    min_images: int
    cross_image: bool  # answerable only by comparing images


FAMILIES: dict[str, Family] = {
    "common": Family(common, "open-ended", 1.0, 2, True),
    "attribute-matching": Family(attribute_matching, "open-ended", 1.0, 2, True),
    "odd-one-out": Family(odd_one_out, "open-ended", 1.0, 3, True),
    "odd-part": Family(odd_part, "open-ended", 1.0, 3, True),
    "correspondence": Family(correspondence, "open-ended", 1.0, 2, True),
    "difference": Family(difference, "open-ended", 1.0, 2, True),
    "existence": Family(existence, "open-ended", 0.8, 1, False),
    "parts": Family(parts, "open-ended", 1.2, 1, False),
    "most": Family(most, "numerical", 1.6, 2, True),
    "counting": Family(counting, "numerical", 1.4, 1, False),
    "spatial-compare": Family(spatial_compare, "spatial", 1.6, 2, True),
    "spatial": Family(spatial, "spatial", 1.4, 1, False),
    "functional": Family(functional, "functional", 1.2, 1, False),
    "functional-part": Family(functional_part, "functional", 2.0, 1, False),
}
CROSS_IMAGE_FAMILIES = tuple(name for name, f in FAMILIES.items() if f.cross_image)
# training-only families, never drawn unless asked for by name (`prima data synth --families describe`)
AUXILIARY_FAMILIES: dict[str, Family] = {
    "describe": Family(describe, "open-ended", 1.0, 1, False),
}
ALL_FAMILIES = {**FAMILIES, **AUXILIARY_FAMILIES}
RETRIES = 200


def make_draft(rng: np.random.Generator, n: int, size: int, families: Sequence[str] | None = None) -> Draft:
    """One sample over ``n`` images: a family drawn by weight among those that fit ``n`` (among ``families``, by
    name, when given; default: the test mix `FAMILIES`), then its scenes."""
    pool = FAMILIES if families is None else {name: ALL_FAMILIES[name] for name in families}
    names = [name for name, f in pool.items() if f.min_images <= n]
    if not names:
        raise PrimaError(f"none of the families {', '.join(pool)} takes {n} image(s)")
    weights = np.asarray([pool[name].weight for name in names])
    name = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    family = pool[name]
    for _ in range(RETRIES):
        try:
            draft = family.make(rng, n, size)
        except SceneRetry:
            continue
        draft.category = family.category
        return draft
    raise RuntimeError(f"family {name!r} failed {RETRIES} times at {size} px with {n} images")
