"""The segmenter's training losses: labelled cases weighted by their reliability, pool cases masked by confidence."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from caudo_ray.arrays import IGNORE

_SMOOTH = 1e-5  # Dice smoothing, as MONAI's DiceLoss


def weighted_dice_ce(logits: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted cross entropy plus soft Dice over the whole batch, each sample counted by its weight.

    Pixels labelled :data:`~caudo_ray.arrays.IGNORE` teach nothing: they add no CE (each sample's CE stays a mean
    over all its pixels, so a sample's weight does not grow as its taught pixels shrink) and take no part in
    the Dice.

    The Dice of each foreground class is taken over the batch (weighted sums of intersections and volumes), then
    averaged over the classes. A Dice per sample instead punishes any pixel of a class on a sample that lacks it
    as hard as missing the class entirely; on ACDC, where the right ventricle is absent from many slices, that
    drove supervised training to never predict it (right-ventricle 3D Dice 0.02) and below one labelled patient.

    Args:
        logits: (B, C, H, W).
        target: (B, H, W) class indices.
        weights: (B,) non-negative sample weights (reliabilities of pseudo labels, the exemplar weight).

    Returns:
        A scalar: the weighted mean of the samples' pixel-mean cross entropy, plus the mean over foreground
        classes of ``1 - Dice``.
    """
    total = weights.sum().clamp_min(1e-8)
    target = target.long()
    taught = target != IGNORE
    target = torch.where(taught, target, torch.zeros_like(target))
    ce_pixels = F.cross_entropy(logits, target, reduction="none") * taught
    ce = (ce_pixels.flatten(1).mean(1) * weights).sum() / total
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].to(probs.dtype)
    w = weights[:, None, None, None] * taught[:, None].to(probs.dtype)
    inter = (w * probs * onehot).sum(dim=(0, 2, 3))
    volume = (w * (probs + onehot)).sum(dim=(0, 2, 3))
    dice = 1.0 - (2.0 * inter + _SMOOTH) / (volume + _SMOOTH)
    return ce + dice.mean()


def masked_dice_ce(
    logits: torch.Tensor, target: torch.Tensor, confident: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """CE and foreground soft Dice restricted to confident pixels (see the module doc for the reductions).

    Args:
        logits: (U, C, H, W).
        target: (U, H, W) int64 pseudo labels.
        confident: (U, H, W) bool, the pixels that teach.
        class_weights: optional (C,) weight of each class's pixels in the CE; None weights every pixel 1.

    Returns:
        A scalar: sum of the confident pixels' (weighted) CE over *all* pixels, plus the mean over foreground
        classes of the soft Dice loss over the batch's confident pixels.
    """
    keep = confident.to(logits.dtype)
    weight = None if class_weights is None else class_weights.to(logits.dtype)
    ce = (F.cross_entropy(logits, target, weight=weight, reduction="none") * keep).sum() / keep.numel()
    num_classes = logits.shape[1]
    probs = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target, num_classes).permute(0, 3, 1, 2)[:, 1:].to(logits.dtype)
    m = keep[:, None]
    inter = (probs * onehot * m).sum(dim=(0, 2, 3))
    denom = (probs * m).sum(dim=(0, 2, 3)) + (onehot * m).sum(dim=(0, 2, 3))
    dice = 1.0 - (2.0 * inter + _SMOOTH) / (denom + _SMOOTH)
    return ce + dice.mean()
