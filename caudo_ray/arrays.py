"""Checks of the arrays the method's functions take: (N, H, W) float images in [0, 1] and their label maps."""

from __future__ import annotations

import numpy as np

from caudo_ray.errors import DataError


def check_images(name: str, images: np.ndarray) -> np.ndarray:
    """(N, H, W) float images as contiguous float32; the error names ``name``."""
    images = np.asarray(images)
    if images.ndim != 3:
        raise DataError(name, f"expected (N, H, W) images, got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise DataError(name, f"expected float images in [0, 1], got dtype {images.dtype}")
    return np.ascontiguousarray(images, dtype=np.float32)


def check_pair(name: str, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-empty images with integer label maps of the same shape (as uint8)."""
    images = check_images(f"{name}_images", images)
    labels = np.asarray(labels)
    if labels.shape != images.shape:
        raise DataError(f"{name}_labels", f"shape {labels.shape} does not match the images' {images.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{name}_labels", f"expected integer class indices, got dtype {labels.dtype}")
    if len(images) == 0:
        raise DataError(f"{name}_images", "no images given")
    return images, labels.astype(np.uint8)


# A training label's pixel that teaches nothing (a pseudo label's pixel its calibration disputes).
IGNORE = 255


def check_label_range(name: str, labels: np.ndarray, num_classes: int, *, allow_ignore: bool = False) -> None:
    """Refuse class indices the model does not have; with ``allow_ignore``, :data:`IGNORE` pixels are allowed."""
    values = labels[labels != IGNORE] if allow_ignore else labels
    top = int(values.max()) if values.size else 0
    if top >= num_classes:
        raise DataError(name, f"holds class {top} but the model has {num_classes} classes")


def class_map(probs: np.ndarray) -> np.ndarray:
    """(N, H, W) uint8 argmax over the class axis of (N, C, H, W) maps, the first class winning ties.

    ``probs.argmax(1)`` reduces along a strided axis; these C - 1 elementwise passes take half its time for two
    classes at the sizes labelling uses (64 maps of 128x128) and about as long for four.
    """
    labels = np.zeros((probs.shape[0],) + probs.shape[2:], np.uint8)
    best = probs[:, 0].copy()
    for k in range(1, probs.shape[1]):
        np.copyto(labels, k, where=probs[:, k] > best)
        np.maximum(best, probs[:, k], out=best)
    return labels


def finite_mean(a: np.ndarray) -> float:
    """Mean of the finite entries (scores are NaN where a case has no value); NaN when there are none."""
    a = np.asarray(a)
    a = a[np.isfinite(a)]
    return float(a.mean()) if len(a) else float("nan")
