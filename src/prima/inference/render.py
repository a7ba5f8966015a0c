"""Pictures and text of a Prediction: overlay PNGs per image, a console summary, and coloured answer HTML.

Segment ``i`` of a prediction gets colour ``prima.visualize.color_for(i)`` everywhere (overlay, CLI
listing, web answer), so a phrase and its mask always share a colour.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from prima.constants import GROUNDED_PHRASE_RE
from prima.data.schema import strip_markup
from prima.inference.images import LoadedImage
from prima.inference.predictor import Prediction
from prima.visualize import color_for, color_hex, overlay_masks


def render_overlays(images: Sequence[LoadedImage | Image.Image], prediction: Prediction) -> list[Image.Image]:
    """One RGB picture per input image, with that image's masks tinted and labelled with their phrase."""
    out = []
    for k, item in enumerate(images, start=1):
        image = item.image if isinstance(item, LoadedImage) else item
        mine = [(i, s) for i, s in enumerate(prediction.segments) if s.image == k]
        out.append(
            overlay_masks(
                image,
                [s.mask for _, s in mine],
                labels=[s.phrase for _, s in mine],
                colors=[color_for(i) for i, _ in mine],
            )
        )
    return out


def save_overlays(
    images: Sequence[LoadedImage], prediction: Prediction, out_dir: str | Path, prefix: str = ""
) -> list[Path]:
    """Write ``{prefix}image{k}_overlay.png`` for every image into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, picture in enumerate(render_overlays(images, prediction), start=1):
        path = out_dir / f"{prefix}image{k}_overlay.png"
        picture.save(path)
        paths.append(path)
    return paths


def format_summary(prediction: Prediction) -> str:
    """The plain answer, then one line per grounded segment: phrase, image, score, box (and support, when the model
    checks its phrases); then the model's first answer, if the read-out replaced it."""
    lines = [prediction.text or "(empty answer)"]
    for i, s in enumerate(prediction.segments, start=1):
        support = f", support {s.support:.2f}" if s.support is not None else ""
        lines.append(f"  [{i}] {s.phrase!r} in image {s.image}: score {s.score:.2f}{support}, bbox {s.bbox}")
    if prediction.first_answer is not None:
        lines.append(f"  (first answer, replaced by the read-out: {strip_markup(prediction.first_answer)!r})")
    return "\n".join(lines)


def answer_html(prediction: Prediction) -> str:
    """The answer as HTML: each grounded phrase on its mask's colour, tagged with its image number.

    A later mention of a phrase (no `[SEG]` of its own) takes the colour of the segment it repeats.
    """
    answer = prediction.answer
    parts: list[str] = []
    pos = 0
    seg_index = 0
    seen: dict[tuple[str, int | None], int] = {}
    for m in GROUNDED_PHRASE_RE.finditer(answer):
        parts.append(html.escape(answer[pos : m.start()]))
        phrase = m.group("phrase")
        image = int(m.group("image")) if m.group("image") else None
        color_index = None
        if m.group("seg") and seg_index < len(prediction.segments):
            color_index = seg_index
            seen[(phrase, prediction.segments[seg_index].image)] = seg_index
            image = prediction.segments[seg_index].image
            seg_index += 1
        elif (phrase, image) in seen:
            color_index = seen[(phrase, image)]
        parts.append(_phrase_span(phrase, image, color_index))
        pos = m.end()
    parts.append(html.escape(answer[pos:]))
    text = " ".join("".join(parts).split())
    return f'<div class="prima-answer">{text or "(empty answer)"}</div>'


def _phrase_span(phrase: str, image: int | None, color_index: int | None) -> str:
    where = f'<sub class="prima-image">image {image}</sub>' if image is not None else ""
    if color_index is None:
        return f'<span class="prima-phrase">{html.escape(phrase)}</span>{where}'
    r, g, b = color_for(color_index)
    text = "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"  # readable on light and dark colours
    return (
        f'<span class="prima-phrase" data-segment="{color_index + 1}" '
        f'style="background:{color_hex(color_index)};color:{text};padding:0 3px;border-radius:3px">'
        f"{html.escape(phrase)}</span>{where}"
    )
