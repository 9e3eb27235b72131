"""Segmentation metrics: per-case Dice of label maps, MONAI's Dice and HD95, rank correlation of scores.

HD95 is in millimetres where the caller gives the cases' spacing and in pixels (voxels) otherwise, and its keys
say which: ``hd95_mm`` or ``hd95_px``, never a bare ``hd95``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from scipy import stats

from caudo_ray.errors import DataError


def dice_per_case(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """(N,) float32 mean foreground Dice per case; a class empty in both maps counts 1."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise DataError("pred", f"shape {pred.shape} must be (N, H, W) and match truth's {truth.shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    per_class = []
    for k in range(1, num_classes):
        pk, tk = pred == k, truth == k
        total = pk.sum(axis=(1, 2)) + tk.sum(axis=(1, 2))
        per_class.append(np.where(total == 0, 1.0, 2.0 * (pk & tk).sum(axis=(1, 2)) / np.maximum(total, 1)))
    return np.mean(per_class, axis=0).astype(np.float32)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two (N,) arrays; NaN when either is constant."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape:
        raise DataError("spearman", f"lengths differ: {a.size} and {b.size}")
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def dice(x: np.ndarray, y: np.ndarray) -> float:
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * np.logical_and(x, y).sum() / total




def hd95_unit(spacing: object | None) -> str:
    """``"mm"`` where a spacing is given, else ``"px"``: HD95 keys carry it (``hd95_mm``, ``hd95_px_class1``)."""
    return "px" if spacing is None else "mm"


def hd95_of(metrics: Mapping[str, Any]) -> tuple[float, str]:
    """The mean HD95 of a metrics dict and its unit (``"mm"`` or ``"px"``)."""
    for unit in ("mm", "px"):
        if f"hd95_{unit}" in metrics:
            return float(metrics[f"hd95_{unit}"]), unit
    raise KeyError("hd95_mm or hd95_px")


def segmentation_metrics(
    pred: np.ndarray, truth: np.ndarray, num_classes: int, spacing: np.ndarray | None = None
) -> dict[str, Any]:
    """Dice and HD95 (MONAI metrics) of (N, H, W) label maps: mean over foreground classes and per class.

    HD95 of a case whose prediction or truth of a class is empty is undefined; it is left out of that class's
    mean (NaN when no case has it).

    Args:
        pred: (N, H, W) class indices.
        truth: (N, H, W) class indices.
        num_classes: classes including background.
        spacing: (N, 2) millimetres per pixel (rows, cols) of each case at the size of these arrays; None
            measures HD95 in pixels.

    Returns:
        ``dice``, ``dice_class<c>``, ``dice_per_case`` and the HD95 in the unit it was measured in:
        ``hd95_mm`` and ``hd95_mm_class<c>`` with a spacing, ``hd95_px`` and ``hd95_px_class<c>`` without.
    """
    onehot = lambda a: torch.nn.functional.one_hot(torch.from_numpy(a.astype(np.int64)), num_classes).permute(0, 3, 1, 2).float()
    y_pred, y = onehot(pred), onehot(truth)
    if spacing is not None:
        spacing = np.asarray(spacing, dtype=np.float64)
        if spacing.shape != (len(pred), 2) or not (np.isfinite(spacing).all() and (spacing > 0).all()):
            raise DataError("spacing", f"must be ({len(pred)}, 2) positive millimetres per pixel, got {spacing.shape}")
    dice_cases = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(y_pred, y)
    hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
        y_pred, y, spacing=None if spacing is None else spacing.tolist()
    )
    per_class_dice = torch.nanmean(dice_cases, dim=0).numpy()
    hd = hd95.numpy()
    hd[~np.isfinite(hd)] = np.nan
    per_class_hd = np.nanmean(hd, axis=0) if np.isfinite(hd).any() else np.full(num_classes - 1, np.nan)
    key = f"hd95_{hd95_unit(spacing)}"
    out: dict[str, Any] = {"dice": float(np.nanmean(per_class_dice)), key: float(np.nanmean(per_class_hd))}
    for c in range(1, num_classes):
        out[f"dice_class{c}"] = float(per_class_dice[c - 1])
        out[f"{key}_class{c}"] = float(per_class_hd[c - 1])
    out["dice_per_case"] = np.nanmean(dice_cases.numpy(), axis=1).tolist()
    return out


def volume_metrics(
    pred: Mapping[str, np.ndarray],
    truth: Mapping[str, np.ndarray],
    num_classes: int,
    spacing: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, Any]:
    """3D Dice and HD95 per class and volume (MONAI metrics), averaged over classes and volumes.

    This is how ACDC results are published: each volume's slices are stacked in order and scored as one 3D label
    map per structure. Where a class is missing from the prediction or the truth of a volume (but not from
    both), its HD95 is the volume's diagonal, the largest distance there is, rather than undefined: leaving such
    cases out would reward a method for missing a structure entirely. Where a class is missing from both, the
    volume does not count for that class.

    Args:
        pred: volume id -> (D, H, W) integer label map (slices in order).
        truth: volume id -> (D, H, W) label map of the same shape; same volume ids.
        num_classes: classes including background.
        spacing: volume id -> millimetres per voxel along (D, H, W), for every volume; None measures HD95 in
            voxels.

    Returns:
        ``dice``, ``dice_class<c>``, ``dice_per_volume`` (volume id -> mean over classes), ``volumes`` and the HD95
        (mean over foreground classes of the mean over volumes) as ``hd95_mm`` / ``hd95_mm_class<c>`` with a
        spacing, ``hd95_px`` / ``hd95_px_class<c>`` without.
    """
    if set(pred) != set(truth):
        raise DataError("volumes", f"predictions and truth name different volumes: {sorted(set(pred) ^ set(truth))[:5]}")
    if not pred:
        raise DataError("volumes", "no volumes to score")
    if spacing is not None and set(spacing) != set(pred):
        raise DataError("spacing", f"needs every volume's spacing; missing {sorted(set(pred) - set(spacing))[:5]}")
    dice_metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    hd_metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
    per_volume_dice: dict[str, np.ndarray] = {}
    per_volume_hd: dict[str, np.ndarray] = {}
    for vol in sorted(pred):
        p, t = np.asarray(pred[vol]), np.asarray(truth[vol])
        if p.shape != t.shape or p.ndim != 3:
            raise DataError(vol, f"prediction {p.shape} and truth {t.shape} must be the same (D, H, W) volume")
        voxel = np.ones(3) if spacing is None else np.asarray(spacing[vol], dtype=np.float64)
        if voxel.shape != (3,) or not (np.isfinite(voxel).all() and (voxel > 0).all()):
            raise DataError(vol, f"spacing must be 3 positive millimetres per voxel (D, H, W), got {spacing[vol]!r}")
        y_pred = _one_hot_volume(p, num_classes)
        y = _one_hot_volume(t, num_classes)
        dice_v = dice_metric(y_pred, y).numpy()[0]  # NaN where the truth of a class is empty
        present_p = y_pred[0, 1:].flatten(1).any(1).numpy()
        present_t = y[0, 1:].flatten(1).any(1).numpy()
        hd_v = np.full(num_classes - 1, np.nan)
        both = present_p & present_t
        if both.any():
            hd_v[both] = hd_metric(y_pred, y, spacing=voxel.tolist()).numpy()[0][both]
        hd_v[present_p ^ present_t] = float(np.sqrt(np.sum(np.square(np.array(p.shape) * voxel))))
        # A class predicted where the truth has none scores Dice 0, not "empty" (MONAI's ignore_empty skips it).
        dice_v[~present_t & present_p] = 0.0
        per_volume_dice[vol], per_volume_hd[vol] = dice_v, hd_v
    dice_table = np.stack(list(per_volume_dice.values()))
    hd_table = np.stack(list(per_volume_hd.values()))
    per_class_dice = _nanmean_columns(dice_table)
    per_class_hd = _nanmean_columns(hd_table)
    key = f"hd95_{hd95_unit(spacing)}"
    out: dict[str, Any] = {"dice": float(np.nanmean(per_class_dice)), key: float(np.nanmean(per_class_hd)), "volumes": len(pred)}
    for c in range(1, num_classes):
        out[f"dice_class{c}"] = float(per_class_dice[c - 1])
        out[f"{key}_class{c}"] = float(per_class_hd[c - 1])
    out["dice_per_volume"] = {vol: float(np.nanmean(d)) if np.isfinite(d).any() else math.nan for vol, d in per_volume_dice.items()}
    return out


def _one_hot_volume(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """(D, H, W) class indices -> (1, C, D, H, W) float one-hot, the layout MONAI's 3D metrics take."""
    return torch.nn.functional.one_hot(torch.from_numpy(labels.astype(np.int64)), num_classes).permute(3, 0, 1, 2)[None].float()


def _nanmean_columns(table: np.ndarray) -> np.ndarray:
    counts = np.isfinite(table).sum(0)
    sums = np.where(np.isfinite(table), table, 0.0).sum(0)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
