"""How good are a checkpoint's masks when its answer is right? Teacher-forced mask IoU on validation samples.

Feeds each sample's ground-truth answer (so every `[SEG]` names the right object on the right image), thresholds
the mask logits at 0 and reports the mean IoU with the GT masks at the model's mask size. With ``--png`` it writes
one row per mask (GT | prediction) of the first batch: the quickest way to see whether the decoder segments the
wrong object or a poor outline of the right one. With ``grounding.word_readout`` it also reports how often the word
reader names each phrase's first word from the pixels under the GT mask and under the predicted one.

    .venv/bin/python benchmarks/teacher_forced_masks.py runs/tiny/final --samples 48 \
        --feature-cache .cache/features --png runs/eval/teacher_forced.png
"""

from __future__ import annotations

import numpy as np
import teacher_forced
import torch
from PIL import Image


def main() -> None:
    parser = teacher_forced.options(__doc__, samples=48)
    parser.add_argument("--png", default=None, help="write GT | prediction of the first batch's masks here")
    args = teacher_forced.parse(parser)
    model, collate = teacher_forced.load(args.checkpoint, args.feature_cache)
    samples = teacher_forced.samples(args)
    ious: list[float] = []
    reads = {"GT": [], "predicted": []}  # word reader right or wrong, per mask
    rows: list[np.ndarray] = []
    with torch.no_grad():
        for _, batch in teacher_forced.batches(samples, args.batch, collate, with_masks=True):
            out = model(batch)
            pred = torch.cat(out.mask_logits) > 0
            gt = batch["masks"] > 0.5
            inter = (pred & gt).flatten(1).sum(1).float()
            union = (pred | gt).flatten(1).sum(1).float().clamp(min=1)
            ious += (inter / union).tolist()
            if model.config.grounding.word_readout:
                x = model._inputs(batch)  # the batch's tensors and image features, as forward reads them
                positions, images = model.seg_targets(x.input_ids, x.image_offsets, x.num_images, x.labels)
                first = model.phrase_words(x.input_ids, positions)[:, 0]
                probs = torch.sigmoid(torch.cat(out.mask_logits))
                features = x.features
                for name, masks in (("GT", batch["masks"].float()), ("predicted", probs)):
                    words = model.read_first_words(masks, images, features).argmax(-1)
                    reads[name] += (words == first)[first >= 0].tolist()
            if args.png and not rows:
                rows = [np.concatenate([g.numpy(), p.numpy()], 1) for g, p in zip(gt, pred)]
    print(f"{args.checkpoint}: {len(samples)} samples of {args.data}, {len(ious)} masks")
    print(
        f"teacher-forced mask IoU: mean {np.mean(ious):.3f}, median {np.median(ious):.3f}, "
        f"share >= 0.5: {np.mean(np.array(ious) >= 0.5):.3f}"
    )
    for name, hits in reads.items():
        if hits:
            print(f"word reader, first phrase word under the {name} mask: accuracy {np.mean(hits):.3f}")
    if args.png and rows:
        Image.fromarray((np.concatenate(rows, 0) * 255).astype(np.uint8)).save(args.png)
        print(f"wrote {args.png} (left: GT, right: prediction; one row per [SEG])")


if __name__ == "__main__":
    main()
