"""Special tokens, the grounded-answer markup and the image limits: the one place these facts live."""

from __future__ import annotations

import re

MAX_IMAGES = 5

SEG_TOKEN = "[SEG]"
PHRASE_START = "<p>"
PHRASE_END = "</p>"
IMAGE_START = "<im_start>"
IMAGE_END = "<im_end>"


def image_tag(k: int) -> str:
    """The single-token tag that binds a `[SEG]` (or an image block) to image ``k`` (1-based)."""
    if not 1 <= k <= MAX_IMAGES:
        raise ValueError(f"image index {k} is outside 1..{MAX_IMAGES}")
    return f"(IMAGE{k})"


IMAGE_TAGS = tuple(image_tag(k) for k in range(1, MAX_IMAGES + 1))

SPECIAL_TOKENS = (SEG_TOKEN, PHRASE_START, PHRASE_END, IMAGE_START, IMAGE_END, *IMAGE_TAGS)

# `<p> phrase </p>` optionally followed by `[SEG]` and then optionally by an image tag.
GROUNDED_PHRASE_RE = re.compile(r"<p>\s*(?P<phrase>.*?)\s*</p>(?P<seg>\s*\[SEG\])?(?:\s*\(IMAGE(?P<image>\d+)\))?")
# how a model writes a grounded phrase (model.answer_order; prima.data.processor.to_model_order)
ANSWER_ORDERS = ("written", "image_first", "image_first_reversed")
SEG_RE = re.compile(r"\[SEG\]")
IMAGE_TAG_RE = re.compile(r"\(IMAGE(\d+)\)")
