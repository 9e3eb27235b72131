"""The pixel steps between an image as read and the segmenter: intensity normalisation and resizing.

Training, labelling, ``caudo-ray predict`` and the exported models (:mod:`caudo_ray.deploy`) all go through
these functions, so a model gives the same masks wherever it runs. The module needs only numpy and PIL: an
exported MLflow model imports it without the rest of caudo-ray's dependencies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image


def normalize_intensity(image: np.ndarray) -> np.ndarray:
    """Clip to the 1st-99th percentile and scale to [0, 1]; a constant image gives zeros."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(image, [1.0, 99.0])
    if hi <= lo:
        # A mostly-constant image (tiny bright target) would be erased by the percentiles; use the full range.
        lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return ((np.clip(image, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Antialiased bilinear resize of a float image to (H, W)."""
    h, w = int(size[0]), int(size[1])
    if image.shape == (h, w):
        return image.astype(np.float32, copy=False)
    # PIL's bilinear widens its kernel when shrinking (area-like, no aliasing) and never overshoots the input range.
    out = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F").resize((w, h), Image.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def resize_mask(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a class map to (H, W)."""
    h, w = int(size[0]), int(size[1])
    if mask.shape == (h, w):
        return mask.astype(np.uint8, copy=False)
    out = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").resize((w, h), Image.NEAREST)
    return np.asarray(out, dtype=np.uint8)
