"""Which connected region of a mask is the object? Teacher-forced mask IoU of each way to keep one region.

Feeds each sample's ground-truth answer (every `[SEG]` has its right phrase, words and image), cuts each mask at
the checkpoint's ``grounding.mask_threshold`` at the model's mask size and scores, against the GT mask: all its
pixels; its region of the largest probability mass (``mask_regions: largest``); the region `PrimaModel` keeps with
``mask_regions: supported`` (mass x the phrase check's support), given the phrase's true words and given them
without the first word (the colour, which at generation comes from the LLM or the word reader and may be wrong);
and the best region (an oracle: how much any choice of one region could give).

    .venv/bin/python benchmarks/mask_regions.py checkpoints/prima-tiny-synth --data data/synth/val3/samples.jsonl \
        --samples 200 --feature-cache .cache/features
"""

from __future__ import annotations

import numpy as np
import teacher_forced
import torch

from prima.data.masks import binarize, connected_regions


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def main() -> None:
    args = teacher_forced.parse(teacher_forced.options(__doc__, data="data/synth/val3/samples.jsonl"))
    model, collate = teacher_forced.load(args.checkpoint, args.feature_cache)
    if not model.config.grounding.phrase_check:
        raise SystemExit(f"mask_regions: {args.checkpoint} has no phrase check (model.grounding.phrase_check)")
    threshold = model.config.grounding.mask_threshold
    samples = teacher_forced.samples(args)
    rules = ("all", "largest", "supported, true words", "supported, without the first word", "best region")
    scores: dict[str, list[float]] = {rule: [] for rule in rules}
    several = []
    with torch.no_grad():
        for _, batch in teacher_forced.batches(samples, args.batch, collate, with_masks=True):
            out = model(batch)
            x = model._inputs(batch)
            positions, images = model.seg_targets(x.input_ids, x.image_offsets, x.num_images, x.labels)
            words = model.phrase_words(x.input_ids, positions)
            logits = torch.cat(out.mask_logits).float()
            rest = words.clone()
            rest[:, 0] = -1
            kept = {
                "supported, true words": model._supported_regions(logits, images, x.features, words),
                "supported, without the first word": model._supported_regions(logits, images, x.features, rest),
            }
            probs = torch.sigmoid(logits).numpy()
            gt = (batch["masks"] > 0.5).numpy()
            for q in range(len(probs)):
                above = probs[q] >= threshold
                labels, n = connected_regions(above)
                several.append(n > 1)
                scores["all"].append(iou(above, gt[q]))
                scores["largest"].append(iou(binarize(probs[q], threshold, "largest"), gt[q]))
                for rule, cut in kept.items():
                    scores[rule].append(iou(torch.sigmoid(cut[q]).numpy() >= threshold, gt[q]))
                regions = [labels == j for j in range(1, n + 1)] or [above]
                scores["best region"].append(max(iou(r, gt[q]) for r in regions))
    print(f"{args.checkpoint}: {len(samples)} samples of {args.data}, {len(several)} masks at threshold {threshold}")
    print(f"masks of several regions: {np.mean(several):.3f}")
    for rule, values in scores.items():
        v = np.array(values)
        print(f"{rule}: mean IoU {v.mean():.3f}, share >= 0.5: {(v >= 0.5).mean():.3f}")


if __name__ == "__main__":
    main()
