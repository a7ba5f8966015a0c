"""Mask overlays: one palette and one drawing routine for `prima data show`, `prima predict` and the web demo."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, colour-blind-friendly-ish colours (Okabe-Ito first, then Tableau); segment i gets PALETTE[i % len].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (148, 103, 189),
    (140, 86, 75),
    (23, 190, 207),
)


def color_for(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def color_hex(i: int) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color_for(i))


def overlay_masks(
    image: Image.Image,
    masks: Sequence[np.ndarray],
    labels: Sequence[str] = (),
    colors: Sequence[tuple[int, int, int]] | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """The image with each bool mask tinted in its colour, outlined, and labelled at its top-left (moved left or up
    as far as the label needs to fit in the image)."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    colors = list(colors) if colors is not None else [color_for(i) for i in range(len(masks))]
    for mask, color in zip(masks, colors):
        m = mask.astype(bool)
        if m.shape != base.shape[:2]:
            raise ValueError(f"mask shape {m.shape} differs from image size {base.shape[:2]}")
        base[m] = (1 - alpha) * base[m] + alpha * np.asarray(color, dtype=np.float32)
        edge = m & ~_erode(m)
        base[edge] = color
    out = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    if labels:
        draw = ImageDraw.Draw(out)
        font = ImageFont.load_default()
        for mask, label, color in zip(masks, labels, colors):
            ys, xs = np.nonzero(mask)
            if not len(xs) or not label:
                continue
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
            # the label and its 1-pixel margin, moved left or up from the mask's top-left as far as they need to fit
            x = max(0, min(int(xs.min()), out.width - 2 - right))
            y = max(0, min(int(ys.min()), out.height - 2 - bottom))
            draw.rectangle((x + left - 1, y + top - 1, x + right + 1, y + bottom + 1), fill=tuple(color))
            draw.text((x, y), label, fill=(0, 0, 0), font=font)
    return out


def _erode(m: np.ndarray) -> np.ndarray:
    e = m.copy()
    e[1:, :] &= m[:-1, :]
    e[:-1, :] &= m[1:, :]
    e[:, 1:] &= m[:, :-1]
    e[:, :-1] &= m[:, 1:]
    return e
