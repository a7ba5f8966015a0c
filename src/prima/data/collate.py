"""Turn `Sample` objects (+ their images) into the batch dict that `PrimaModel.forward` takes.

Batch keys (B samples, N images in all, M `[SEG]` tokens in all, L tokens, m = mask side):

- ``input_ids``, ``attention_mask`` (B, L): prompt + answer + EOS, right-padded with the pad id;
- ``labels`` (B, L): the answer tokens and EOS; prompt and padding are -100;
- ``pixel_values`` (N, 3, S, S): every image of every sample, sample-major (omitted with ``include_pixels=False``,
  when the trainer supplies cached ``image_features`` instead);
- ``grounding_pixel_values`` (N, 3, G, G): only when grounding has its own encoder (SAM);
- ``image_sample_index`` (N,): the sample each image belongs to; ``num_images`` (B,);
- ``image_sizes`` (N, 2): each image's original (height, width);
- ``qformer_input_ids``, ``qformer_attention_mask`` (B, Lq): the question as the Q-Former reads it;
- ``masks`` (M, m, m) float 0/1: GT masks in `[SEG]` order, resized to the model's mask size;
- ``mask_image_index`` (M,): the image (index into ``pixel_values``) of each `[SEG]`;
- ``sample_ids``: list of B ids (not a tensor).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from prima.constants import SEG_TOKEN
from prima.data.masks import decode_rle, resize_mask
from prima.data.processor import PrimaProcessor, load_image
from prima.data.schema import Sample, image_size, resolve_image
from prima.errors import SampleError
from prima.model.config import ModelConfig, mask_size
from prima.model.losses import IGNORE_INDEX

Root = str | os.PathLike | None


def collate_samples(
    samples: Sequence[Sample],
    root: Root | Sequence[Root],
    processor: PrimaProcessor,
    cfg: ModelConfig,
    *,
    images: Sequence[Sequence[Any]] | None = None,
    include_pixels: bool = True,
) -> dict[str, Any]:
    """The model's batch for ``samples``; ``root`` is the folder image paths are relative to (one per sample
    allowed); ``images`` may hand in already loaded images (paths, PIL or arrays) per sample."""
    if not samples:
        raise SampleError("cannot collate an empty list of samples")
    roots = list(root) if isinstance(root, (list, tuple)) else [root] * len(samples)
    tok = processor.tokenizer
    seg_id = tok.convert_tokens_to_ids(SEG_TOKEN)
    side = mask_size(cfg)
    ids_rows, label_rows, qformer_rows = [], [], []
    pixel_list, grounding_list, sizes, sample_index, num_images = [], [], [], [], []
    masks, mask_image_index = [], []
    for b, sample in enumerate(samples):
        n = len(sample.images)
        where = {"sample_id": sample.id}
        pil = None
        if include_pixels or images is not None:
            src = images[b] if images is not None else [resolve_image(sample, i, roots[b]) for i in range(n)]
            if len(src) != n:
                raise SampleError(f"got {len(src)} loaded images for {n} image paths", field="images", **where)
            pil = [load_image(im) for im in src]
            image_sizes = [(im.height, im.width) for im in pil]
        else:
            image_sizes = [image_size(resolve_image(sample, i, roots[b]), where=where, index=i) for i in range(n)]
        prompt = processor.encode_prompt(sample.question, n)
        answer = processor.encode_answer(sample.answer)
        if answer.count(seg_id) != len(sample.segments):
            raise SampleError(
                f"the answer tokenizes to {answer.count(seg_id)} [SEG] token(s) but the sample has "
                f"{len(sample.segments)} segment(s)",
                field="segments",
                **where,
            )
        ids_rows.append(prompt + answer)
        label_rows.append([IGNORE_INDEX] * len(prompt) + answer)
        qformer_rows.append(processor.encode_qformer_text(sample.question))
        offset = len(sizes)
        for k, seg in enumerate(sample.segments):
            if not 1 <= seg.image <= n:
                raise SampleError(
                    f"image index {seg.image} is out of range 1..{n}", field=f"segments[{k}].image", **where
                )
            mask = decode_rle(seg.mask)
            if mask.shape != image_sizes[seg.image - 1]:
                raise SampleError(
                    f"mask size {list(mask.shape)} differs from image {seg.image}'s size "
                    f"{list(image_sizes[seg.image - 1])}",
                    field=f"segments[{k}].mask.size",
                    **where,
                )
            masks.append(resize_mask(mask, (side, side)))
            mask_image_index.append(offset + seg.image - 1)
        if pil is not None and include_pixels:
            pixel_list.append(processor.preprocess_images(pil))
            g = processor.preprocess_grounding_images(pil)
            if g is not None:
                grounding_list.append(g)
        sizes.extend(image_sizes)
        sample_index.extend([b] * n)
        num_images.append(n)

    batch: dict[str, Any] = {
        "sample_ids": [s.id for s in samples],
        "image_sample_index": torch.tensor(sample_index, dtype=torch.long),
        "num_images": torch.tensor(num_images, dtype=torch.long),
        "image_sizes": torch.tensor(sizes, dtype=torch.long),
        "masks": torch.from_numpy(np.stack(masks).astype(np.float32)) if masks else torch.zeros(0, side, side),
        "mask_image_index": torch.tensor(mask_image_index, dtype=torch.long),
    }
    batch["input_ids"], batch["attention_mask"] = _pad(ids_rows, tok.pad_token_id)
    batch["labels"], _ = _pad(label_rows, IGNORE_INDEX)
    qpad = (processor.qformer_tokenizer or tok).pad_token_id
    batch["qformer_input_ids"], batch["qformer_attention_mask"] = _pad(qformer_rows, qpad)
    if pixel_list:
        batch["pixel_values"] = torch.cat(pixel_list)
    if grounding_list:
        batch["grounding_pixel_values"] = torch.cat(grounding_list)
    return batch


def _pad(rows: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), value, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask
