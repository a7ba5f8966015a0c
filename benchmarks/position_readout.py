"""How well the visual-position head (``loss.visual_position``) reads where each grounded phrase is from V_i.

Teacher-forced on validation samples, as the training loss sees them: the mean L1 distance of the head's centre
(x, y in [0, 1]) from each GT mask's centre, beside the L1 of always answering the median centre (what a head that
reads nothing learns), the spread of the head's answers against the centres', and their correlation per axis.

    .venv/bin/python benchmarks/position_readout.py runs/grid/final --feature-cache .cache/features
"""

from __future__ import annotations

import teacher_forced
import torch

from prima.model.losses import mask_centres


def main() -> None:
    parser = teacher_forced.options(__doc__, samples=200)
    args = teacher_forced.parse(parser)
    model, collate = teacher_forced.load(args.checkpoint, args.feature_cache)
    if model.visual_position is None:
        raise SystemExit(f"position_readout: {args.checkpoint} has no visual-position head (loss.visual_position 0)")
    read: list[torch.Tensor] = []
    model.visual_position.register_forward_hook(lambda m, i, out: read.append(torch.sigmoid(out.float())))
    centres = []
    with torch.no_grad():
        for _, batch in teacher_forced.batches(teacher_forced.samples(args), args.batch, collate, with_masks=True):
            model(batch)
            masks = batch["masks"]
            centres.append(mask_centres(masks[masks.flatten(1).sum(1) > 0]))
    head, truth = torch.cat(read), torch.cat(centres)
    if head.shape != truth.shape:  # a phrase without words has a mask but no read-out
        raise SystemExit(f"position_readout: {len(head)} read-outs for {len(truth)} non-empty masks")
    median = (truth - truth.median(0).values).abs().mean()
    corr = [float(torch.corrcoef(torch.stack([head[:, j], truth[:, j]]))[0, 1]) for j in range(2)]
    print(
        f"{len(truth)} phrases: L1 {(head - truth).abs().mean():.3f} (the median centre: {median:.3f}); "
        f"std of the read-out x {head[:, 0].std():.3f} y {head[:, 1].std():.3f}, of the centres "
        f"x {truth[:, 0].std():.3f} y {truth[:, 1].std():.3f}; correlation x {corr[0]:.2f} y {corr[1]:.2f}"
    )


if __name__ == "__main__":
    main()
