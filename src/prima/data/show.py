"""`prima data show`: one sample as a picture: its images side by side, masks labelled, Q and A below."""

from __future__ import annotations

import itertools
import os
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from prima.data.masks import decode_rle
from prima.data.schema import iter_samples, resolve_image
from prima.data.stats import samples_path
from prima.errors import PrimaError
from prima.visualize import color_for, overlay_masks

TILE = 256  # smaller images are enlarged by a whole factor towards this width, to stay legible
MARGIN = 10


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_sample(path: str | os.PathLike, *, index: int = 0, out: str | os.PathLike | None = None) -> Image.Image:
    """Draw sample ``index`` of a dataset folder or JSONL; saved to ``out`` when given."""
    jsonl = samples_path(path)
    if index < 0:
        raise PrimaError(f"--index must be 0 or more, got {index}")
    sample = next(itertools.islice(iter_samples(jsonl), index, None), None)
    if sample is None:
        raise PrimaError(f"{jsonl} has fewer than {index + 1} samples")

    tiles = []
    for k in range(1, len(sample.images) + 1):
        image = Image.open(resolve_image(sample, k - 1, jsonl.parent)).convert("RGB")
        on_image = [(i, s) for i, s in enumerate(sample.segments) if s.image == k]
        masks = [decode_rle(s.mask) for _, s in on_image]
        colours = [color_for(i) for i, _ in on_image]
        scale = max(1, TILE // max(image.size))
        if scale > 1:  # enlarge image and masks alike so labels do not cover small samples
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
            masks = [m.repeat(scale, axis=0).repeat(scale, axis=1) for m in masks]
        labels = [str(i + 1) for i, _ in on_image]  # a number covers little of a small part; the legend names it
        tiles.append(overlay_masks(image, masks, labels, colours))

    font, small = _font(16), _font(14)
    width = sum(t.width for t in tiles) + MARGIN * (len(tiles) + 1)
    chars = max(40, int(width / 8))
    black, grey = (0, 0, 0), (90, 90, 90)
    # (text, font, colour, swatch colour or None) per line
    title = f"{sample.id}  ·  {sample.category}" + (f" / {sample.family}" if sample.family else "")
    text = [(title, small, grey, None)]
    text += [(line, font, black, None) for line in textwrap.wrap("Q: " + sample.question, chars)]
    text += [(line, font, black, None) for line in textwrap.wrap("A: " + sample.answer, chars)]
    for i, s in enumerate(sample.segments):
        text.append((f"[SEG] {i + 1}: {s.phrase}  (image {s.image}, {s.kind})", small, black, color_for(i)))
    line_h = 22
    title_h = 22
    height = title_h + max(t.height for t in tiles) + MARGIN * 2 + line_h * len(text) + MARGIN
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = MARGIN
    for k, tile in enumerate(tiles, start=1):
        draw.text((x, 3), f"image {k}", fill=(0, 0, 0), font=small)
        canvas.paste(tile, (x, title_h))
        x += tile.width + MARGIN
    y = title_h + max(t.height for t in tiles) + MARGIN
    for line, f, colour, swatch in text:
        indent = 0
        if swatch is not None:
            draw.rectangle((MARGIN, y + 3, MARGIN + 12, y + 15), fill=tuple(swatch))
            indent = 18
        draw.text((MARGIN + indent, y), line, fill=colour, font=f)
        y += line_h
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        canvas.save(out)
    return canvas
