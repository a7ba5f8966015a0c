"""Loss terms: text cross-entropy, mask BCE and DICE (each mask's terms averaged per image, then over images),
and the score head's regression onto the mask's actual IoU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def text_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled (answer) tokens; logits (B, L, V), labels (B, L)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    if (shift_labels != IGNORE_INDEX).sum() == 0:
        return shift_logits.sum() * 0.0
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX)


def text_loss_at(logits: torch.Tensor, targets: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """`text_loss` from the logits (K, V) of the labelled positions alone and their next tokens (K,); with none,
    a zero that keeps ``anchor`` (the hidden states) in the graph."""
    if targets.numel() == 0:
        return anchor.sum() * 0.0
    return F.cross_entropy(logits.float(), targets)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-mask soft DICE loss (M,), smoothed by ``eps`` so empty masks stay finite."""
    probs = torch.sigmoid(logits).flatten(1)
    targets = targets.flatten(1)
    inter = (probs * targets).sum(1)
    return 1.0 - (2.0 * inter + eps) / (probs.sum(1) + targets.sum(1) + eps)


def mask_losses(
    logits: torch.Tensor, targets: torch.Tensor, image_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, DICE) for masks (M, H, W) against 0/1 targets: per-mask terms averaged per image, then over images."""
    logits = logits.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)
    dice = dice_loss(logits, targets)
    images, inverse = torch.unique(image_index, return_inverse=True)
    per_image_count = torch.zeros(len(images), device=logits.device).index_add_(0, inverse, torch.ones_like(bce))

    def average(per_mask: torch.Tensor) -> torch.Tensor:
        per_image = torch.zeros(len(images), device=logits.device).index_add_(0, inverse, per_mask)
        return (per_image / per_image_count).mean()

    return average(bce), average(dice)


def score_loss(scores: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MSE between predicted scores (M,) and the IoU of the thresholded masks with their targets (no gradient)."""
    with torch.no_grad():
        pred = logits > 0
        gt = targets > 0.5
        inter = (pred & gt).flatten(1).sum(1).float()
        union = (pred | gt).flatten(1).sum(1).float().clamp(min=1.0)
        iou = inter / union
    return F.mse_loss(scores.float(), iou)


def mask_centres(masks: torch.Tensor) -> torch.Tensor:
    """(M, 2) the centre of mass (x, y) of each non-empty mask (M, h, w), in [0, 1] of its width and height."""
    h, w = masks.shape[-2:]
    masks = masks.float()
    xs = (torch.arange(w, device=masks.device) + 0.5) / w
    ys = (torch.arange(h, device=masks.device) + 0.5) / h
    centres = torch.stack([(masks * xs).sum((1, 2)), (masks * ys[:, None]).sum((1, 2))], -1)
    return centres / masks.flatten(1).sum(1, keepdim=True)
