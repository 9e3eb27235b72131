"""Pictures a run logs: label outlines over images, and per-round metric curves (matplotlib's object API)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import ndimage

from caudo_ray.tracking import names
from caudo_ray.tracking.tracker import Tracker

# One colour per foreground class, cycling; chosen to stay visible on grayscale ultrasound.
_CLASS_COLOURS = np.array([[255, 64, 64], [64, 255, 64], [64, 160, 255], [255, 220, 0]], dtype=np.uint8)


def overlay(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(H, W) image in [0, 1] with each foreground class's outline drawn on it, as (H, W, 3) uint8."""
    gray = (np.clip(image.astype(np.float32), 0, 1) * 255).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    for c in np.unique(labels):
        if c == 0:
            continue
        region = labels == c
        outline = region & ~ndimage.binary_erosion(region)
        rgb[outline] = _CLASS_COLOURS[(int(c) - 1) % len(_CLASS_COLOURS)]
    return rgb


def overlay_panel(image: np.ndarray, initial: np.ndarray, calibrated: np.ndarray) -> np.ndarray:
    """Side by side: image, initial pseudo label, calibrated label (outlines), as one RGB uint8 array."""
    gap = np.full((image.shape[0], 2, 3), 255, dtype=np.uint8)
    plain = overlay(image, np.zeros_like(initial))
    return np.concatenate([plain, gap, overlay(image, initial), gap, overlay(image, calibrated)], axis=1)


def round_curves_png(tracker: Tracker, path: str | Path) -> Path:
    """Plot the per-round label-quality and selection metrics of a run into one PNG."""
    panels = [
        ("pseudo-label Dice", [names.PSEUDO_DICE_INITIAL, names.PSEUDO_DICE_CALIBRATED, names.VAL_DICE]),
        ("reliability", [names.RELIABILITY_MEAN, names.RELIABILITY_P10, names.RELIABILITY_P50, names.AGREEMENT_MEAN]),
        ("selection", [names.SELECTED_FRACTION, names.ACCEPTED_FRACTION]),
    ]
    fig = Figure(figsize=(4 * len(panels), 3.2))
    axes = fig.subplots(1, len(panels))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = tracker.metric_history(key)
            if points:
                steps, values = zip(*sorted(points))
                ax.plot(steps, values, marker="o", label=key.split("/", 1)[1])
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path
