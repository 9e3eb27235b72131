"""Reliability of pseudo labels without ground truth, and the shape prior it learns from the exemplars.

Pure numpy/scipy: computed by every calibration worker for the cases it labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from caudo_ray.arrays import class_map
from caudo_ray.errors import DataError
from caudo_ray.metrics import dice_per_case

BAND_RADIUS = 2  # pixels on each side of a predicted boundary that make up the uncertain band
SHAPE_FEATURES = ("ellipse_fit", "largest_component", "hole_fraction", "log_area")
# Smallest spread of each feature: one exemplar's views can agree exactly (a single component in every view), and
# a pool label must not be called implausible for a difference no real label set would notice.
_SHAPE_FLOOR = np.array([0.1, 0.1, 0.1, 0.25])
_SHAPE_Z_CAP = 3.0  # a feature this many spreads off counts as far off as any further
_PRESENCE_CLIP = (0.02, 0.98)


@dataclass(frozen=True)
class ShapePrior:
    """What the exemplars' labels look like, class by class, over the views the segmenter trains on.

    Per foreground class: how often it is present, and the median and spread of four features of its pixels:
    the Dice with their moment ellipse (1 for an ellipse, low for a ring or a crescent), the share in the largest
    connected component (fragments lower it), the share of its filled outline that is hole (a ring has one), and
    the log of its area as a fraction of the frame. Learnt from augmented exemplar views, so the zoom and shape
    changes the segmenter trains with count as typical; no target shape is assumed.

    Attributes:
        presence: (K,) share of views holding each foreground class.
        median: (K, F) median feature per class over the views that hold it.
        scale: (K, F) its spread (IQR / 1.35, at least a floor per feature).
    """

    presence: np.ndarray
    median: np.ndarray
    scale: np.ndarray

    @classmethod
    def from_labels(cls, labels: np.ndarray, num_classes: int) -> ShapePrior:
        """Learn the prior from (V, H, W) label maps (augmented exemplar views)."""
        labels = np.asarray(labels)
        if labels.ndim != 3 or not len(labels):
            raise DataError("labels", f"expected (V, H, W) label maps, got shape {labels.shape}")
        k = num_classes - 1
        presence = np.zeros(k)
        median = np.zeros((k, len(SHAPE_FEATURES)))
        scale = np.tile(_SHAPE_FLOOR, (k, 1))
        for c in range(1, num_classes):
            masks = labels == c
            masks = masks[masks.any(axis=(1, 2))]
            presence[c - 1] = len(masks) / len(labels)
            if len(masks):
                q25, q50, q75 = np.percentile(_shape_features(masks), [25, 50, 75], axis=0)
                median[c - 1] = q50
                scale[c - 1] = np.maximum((q75 - q25) / 1.35, _SHAPE_FLOOR)
        return cls(presence, median, scale)

    def score(self, labels: np.ndarray) -> np.ndarray:
        """How typical each (N, H, W) label map is of the exemplars, in [0, 1]: the mean over classes of the
        likelihood of the class's presence (relative to the likelier state) times, when present, the
        plausibility of its features, ``exp(-mean z^2 / 2)`` with ``z`` in spreads, capped. Returns (N,)."""
        scores = np.empty((len(self.presence), len(labels)))
        for c, present in enumerate(self.presence, start=1):
            p = float(np.clip(present, *_PRESENCE_CLIP))
            masks = labels == c
            holds = masks.any(axis=(1, 2))
            scores[c - 1] = (1.0 - p) / max(p, 1.0 - p)
            if holds.any():
                z = np.minimum(np.abs(_shape_features(masks[holds]) - self.median[c - 1]) / self.scale[c - 1], _SHAPE_Z_CAP)
                scores[c - 1, holds] = p / max(p, 1.0 - p) * np.exp(-0.5 * np.mean(z**2, axis=1))
        return scores.mean(axis=0)

    def to_dict(self) -> dict[str, list]:
        return {"presence": self.presence.tolist(), "median": self.median.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, list]) -> ShapePrior:
        return cls(np.asarray(d["presence"], float), np.asarray(d["median"], float), np.asarray(d["scale"], float))


def _in_plane(structure: np.ndarray) -> np.ndarray:
    """A 2D structuring element as a 3D one that connects pixels of the same map only: one scipy call then
    handles a whole (N, H, W) batch as N separate images."""
    out = np.zeros((3, 3, 3), bool)
    out[1] = structure
    return out


_EDGE = _in_plane(ndimage.generate_binary_structure(2, 1))  # 4-connectivity: components and holes, as scipy's 2D default


def _shape_features(masks: np.ndarray) -> np.ndarray:
    """(N, F) :data:`SHAPE_FEATURES` of (N, H, W) non-empty boolean masks."""
    area = masks.sum(axis=(1, 2))
    components, count = ndimage.label(masks, structure=_EDGE)
    sizes = np.bincount(components.ravel(), minlength=count + 1)
    # Components are numbered across the batch; each belongs to one map (no connectivity between maps).
    owner = np.zeros(count + 1, np.intp)
    owner[components] = np.arange(len(masks))[:, None, None]
    largest = np.zeros(len(masks), np.int64)
    np.maximum.at(largest, owner[1:], sizes[1:])
    return np.stack(
        [_ellipse_fit(masks), largest / area, 1.0 - area / _filled_area(masks), np.log(area / masks[0].size)], axis=1
    )


def _filled_area(masks: np.ndarray) -> np.ndarray:
    """(N,) pixels of each (N, H, W) mask with its holes filled (``ndimage.binary_fill_holes`` per map): a hole
    is a 4-connected piece of background that does not touch its map's border."""
    background, _ = ndimage.label(~masks, structure=_EDGE)
    outside = np.zeros(background.max() + 1, bool)
    for edge in (background[:, [0, -1], :], background[:, :, [0, -1]]):
        outside[edge] = True
    outside[0] = False  # label 0 is the mask itself
    return masks[0].size - outside[background].sum(axis=(1, 2))


def reliability_scores(
    initial_probs: np.ndarray,
    calibrated_probs: np.ndarray,
    flipped_probs: np.ndarray | None = None,
    prior: ShapePrior | None = None,
) -> dict[str, np.ndarray]:
    """Per-case reliability of the calibrated labels, from the segmenter's probability maps alone.

    With ``a = argmax(initial)``, ``b = argmax(calibrated)`` and ``f = argmax(flipped)``:

    - ``agreement``: mean over foreground classes of Dice(a == c, b == c), a class empty in both counting 1:
      how far the calibrator moved the label (reported; not part of the reliability, see below).
    - ``consistency``: the same Dice between ``b`` and ``f``, the segmenter's label of the horizontally flipped
      image (flipped back). A segmenter that has learnt the target gives the same answer on both; one that
      matches texture it saw in the exemplar often does not. 1 when ``flipped_probs`` is not given.
    - ``confidence``: 1 - mean over the *uncertain band* of the larger of the two maps' normalised entropies,
      the band being the pixels within ``BAND_RADIUS`` of a class boundary of ``a`` or ``b``. Whole-image
      entropy would be dominated by the easy background far from any object; the band is where a label is right
      or wrong. The larger entropy counts because a label is sure only where the segmenter that made it and the
      calibrated map both are: on HC18 a poorly trained calibrator's map alone ranked true Dice at Spearman 0.19,
      the segmenter's 0.60. Cases where both maps are empty use the whole image.
    - ``entropy``: mean normalised entropy of the initial probabilities over the whole image (diagnostic).
    - ``area``: foreground fraction of ``b`` (for size strata).
    - ``shape``: how typical ``b`` is of the exemplars' labels (:meth:`ShapePrior.score`): fragments, stray
      blobs, a missing structure, a ring filled in or a head cut in half all lower it, by the exemplars' own
      measure rather than an assumed shape. 1 when no ``prior`` is given.
    - ``reliability = (confidence * shape * consistency) ** (1/3)``, in [0, 1]. The geometric mean needs every
      signal to be high: a blurry label, a misshapen one (a missed head whose label covers part of it) and one
      the segmenter does not repeat on the flipped image are all doubtful. Agreement is left out: once the
      calibrator repairs what it moves, a large move no longer marks a bad label.

    Args:
        initial_probs: (N, C, H, W) segmenter softmax.
        calibrated_probs: (N, C, H, W) calibrated probabilities.
        flipped_probs: (N, C, H, W) segmenter softmax of the horizontally flipped images, flipped back; None
            leaves consistency out (1 for every case).
        prior: the exemplars' shape prior; None leaves shape out (1 for every case).

    Returns:
        Dict of (N,) float32 arrays: agreement, consistency, confidence, entropy, area, shape, reliability.
    """
    unmoved = calibrated_probs is initial_probs  # scoring the initial labels as if uncalibrated: half the work
    initial_probs = _check_probs("initial_probs", initial_probs)
    calibrated_probs = initial_probs if unmoved else _check_probs("calibrated_probs", calibrated_probs)
    if initial_probs.shape != calibrated_probs.shape:
        raise DataError(
            "calibrated_probs", f"shape {calibrated_probs.shape} differs from initial_probs' {initial_probs.shape}"
        )
    n, c = initial_probs.shape[:2]
    a = class_map(initial_probs)
    b = a if unmoved else class_map(calibrated_probs)
    if flipped_probs is not None:
        flipped_probs = _check_probs("flipped_probs", flipped_probs)
        if flipped_probs.shape != initial_probs.shape:
            raise DataError("flipped_probs", f"shape {flipped_probs.shape} differs from initial_probs' {initial_probs.shape}")
        f = class_map(flipped_probs)
    h_init = _normalised_entropy(initial_probs)
    h_max = h_init if unmoved else np.maximum(h_init, _normalised_entropy(calibrated_probs))

    band = _boundary(a) if unmoved else _boundary(a) | _boundary(b)
    band = _dilate_square(band, BAND_RADIUS)
    band_size = band.sum(axis=(1, 2))
    band_mean = (h_max * band).sum(axis=(1, 2)) / np.maximum(band_size, 1)
    out = {
        "agreement": dice_per_case(a, b, c),
        "consistency": dice_per_case(f, b, c) if flipped_probs is not None else np.ones(n),
        "confidence": 1.0 - np.where(band_size > 0, band_mean, h_max.mean(axis=(1, 2))),
        "entropy": h_init.mean(axis=(1, 2)),
        "area": (b > 0).mean(axis=(1, 2)),
        "shape": prior.score(b) if prior is not None else np.ones(n),
    }
    out = {k: v.astype(np.float32) for k, v in out.items()}
    product = np.clip(out["confidence"], 0, 1) * np.clip(out["shape"], 0, 1) * np.clip(out["consistency"], 0, 1)
    out["reliability"] = np.cbrt(product).astype(np.float32)
    return out


def _normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """(N, H, W) entropy divided by log(C), so 0 is certain and 1 uniform."""
    p = np.clip(probs, 1e-8, 1.0)
    return (-(p * np.log(p)).sum(1) / math.log(probs.shape[1])).astype(np.float32)


def _boundary(labels: np.ndarray) -> np.ndarray:
    """Pixels of (N, H, W) label maps whose 3x3 neighbourhood holds more than one class.

    That is a pixel with a neighbour of another class; each differing pair of neighbours is found once, along one
    of four directions, and marks both its pixels (a third of the time scipy's grey dilation and erosion take).
    """
    out = np.zeros(labels.shape, bool)
    h, w = labels.shape[1:]
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        x0, x1 = max(-dx, 0), w - max(dx, 0)
        here, there = (slice(None), slice(0, h - dy), slice(x0, x1)), (slice(None), slice(dy, h), slice(x0 + dx, x1 + dx))
        differs = labels[here] != labels[there]
        out[here] |= differs
        out[there] |= differs
    return out


def _dilate_square(masks: np.ndarray, radius: int) -> np.ndarray:
    """(N, H, W) masks grown to every pixel within a (2 r + 1)-pixel square of a set pixel: ``radius`` steps of
    8-connected dilation, by shifted ORs along each axis in turn."""
    out = masks.copy()
    for axis in (1, 2):
        src = out.copy()
        for step in range(1, radius + 1):
            head = [slice(None)] * 3
            tail = [slice(None)] * 3
            head[axis], tail[axis] = slice(step, None), slice(None, -step)
            out[tuple(head)] |= src[tuple(tail)]
            out[tuple(tail)] |= src[tuple(head)]
    return out


def _ellipse_fit(masks: np.ndarray) -> np.ndarray:
    """(N,) Dice between each (N, H, W) mask and the solid ellipse of its centroid and second moments; 0 if empty.

    A uniform solid ellipse has covariance ``diag(a^2, b^2) / 4`` in its axes, so it is the set of points at
    squared Mahalanobis distance <= 4. Each pixel adds the variance 1/12 of a unit square, which keeps the
    covariance invertible for one-pixel-thin masks.
    """
    m = masks.astype(np.float64)
    area = m.sum(axis=(1, 2))
    norm = np.maximum(area, 1.0)
    # Moments from the row and column profiles; dy (N, H, 1) and dx (N, 1, W) broadcast, so the only full-size
    # arrays are the distance map and the ellipse.
    y, x = np.arange(masks.shape[1], dtype=np.float64), np.arange(masks.shape[2], dtype=np.float64)
    rows, cols = m.sum(axis=2), m.sum(axis=1)
    cy, cx = rows @ y / norm, cols @ x / norm
    syy = rows @ (y * y) / norm - cy * cy + 1.0 / 12.0
    sxx = cols @ (x * x) / norm - cx * cx + 1.0 / 12.0
    sxy = np.einsum("nhw,h,w->n", m, y, x) / norm - cy * cx
    det = syy * sxx - sxy * sxy
    dy = (y[None, :] - cy[:, None])[:, :, None]
    dx = (x[None, :] - cx[:, None])[:, None, :]
    a, b, c = (v[:, None, None] for v in (sxx / det, -2.0 * sxy / det, syy / det))
    ellipse = a * dy * dy + b * dy * dx + c * dx * dx <= 4.0
    overlap = (ellipse & masks).sum(axis=(1, 2))
    return np.where(area > 0, 2.0 * overlap / (ellipse.sum(axis=(1, 2)) + area), 0.0)


def _check_probs(name: str, probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 4 or probs.shape[1] < 2:
        raise DataError(name, f"expected (N, C >= 2, H, W) probabilities, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise DataError(name, "holds NaN or infinite values")
    return probs
