"""Reliability of pseudo labels without ground truth, and the shape prior it learns from the exemplars.

Pure numpy/scipy: computed by every calibration worker for the cases it labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from caudo_ray.errors import DataError
from caudo_ray.metrics import dice

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
            feats = np.array([_shape_features(lab == c) for lab in labels if (lab == c).any()])
            presence[c - 1] = len(feats) / len(labels)
            if len(feats):
                q25, q50, q75 = np.percentile(feats, [25, 50, 75], axis=0)
                median[c - 1] = q50
                scale[c - 1] = np.maximum((q75 - q25) / 1.35, _SHAPE_FLOOR)
        return cls(presence, median, scale)

    def score(self, label: np.ndarray) -> float:
        """How typical a (H, W) label map is of the exemplars, in [0, 1]: the mean over classes of the
        likelihood of the class's presence (relative to the likelier state) times, when present, the
        plausibility of its features, ``exp(-mean z^2 / 2)`` with ``z`` in spreads, capped."""
        scores = []
        for c, present in enumerate(self.presence, start=1):
            p = float(np.clip(present, *_PRESENCE_CLIP))
            mask = label == c
            if not mask.any():
                scores.append((1.0 - p) / max(p, 1.0 - p))
                continue
            z = np.minimum(np.abs(_shape_features(mask) - self.median[c - 1]) / self.scale[c - 1], _SHAPE_Z_CAP)
            scores.append(p / max(p, 1.0 - p) * float(np.exp(-0.5 * np.mean(z**2))))
        return float(np.mean(scores))

    def to_dict(self) -> dict[str, list]:
        return {"presence": self.presence.tolist(), "median": self.median.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, list]) -> ShapePrior:
        return cls(np.asarray(d["presence"], float), np.asarray(d["median"], float), np.asarray(d["scale"], float))


def _shape_features(mask: np.ndarray) -> np.ndarray:
    """The :data:`SHAPE_FEATURES` of one class's (non-empty) pixels."""
    components, count = ndimage.label(mask)
    largest = np.bincount(components.ravel())[1:].max() if count else 0
    area = int(mask.sum())
    filled = int(ndimage.binary_fill_holes(mask).sum())
    return np.array([
        _ellipse_fit(mask),
        largest / area,
        (filled - area) / filled,
        math.log(area / mask.size),
    ])


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
    initial_probs = _check_probs("initial_probs", initial_probs)
    calibrated_probs = _check_probs("calibrated_probs", calibrated_probs)
    if initial_probs.shape != calibrated_probs.shape:
        raise DataError(
            "calibrated_probs", f"shape {calibrated_probs.shape} differs from initial_probs' {initial_probs.shape}"
        )
    n, c = initial_probs.shape[:2]
    a = initial_probs.argmax(1)
    b = calibrated_probs.argmax(1)
    if flipped_probs is not None:
        flipped_probs = _check_probs("flipped_probs", flipped_probs)
        if flipped_probs.shape != initial_probs.shape:
            raise DataError("flipped_probs", f"shape {flipped_probs.shape} differs from initial_probs' {initial_probs.shape}")
        f = flipped_probs.argmax(1)
    h_init = _normalised_entropy(initial_probs)
    h_max = np.maximum(h_init, _normalised_entropy(calibrated_probs))

    out = {k: np.ones(n, np.float32) for k in ("agreement", "consistency", "confidence", "entropy", "area", "shape")}
    band_struct = ndimage.generate_binary_structure(2, 2)
    for i in range(n):
        out["agreement"][i] = np.mean([dice(a[i] == k, b[i] == k) for k in range(1, c)])
        if flipped_probs is not None:
            out["consistency"][i] = np.mean([dice(f[i] == k, b[i] == k) for k in range(1, c)])
        band = _boundary(a[i]) | _boundary(b[i])
        if band.any():
            band = ndimage.binary_dilation(band, band_struct, iterations=BAND_RADIUS)
            out["confidence"][i] = 1.0 - h_max[i][band].mean()
        else:
            out["confidence"][i] = 1.0 - h_max[i].mean()
        out["entropy"][i] = h_init[i].mean()
        out["area"][i] = np.mean(b[i] > 0)
        if prior is not None:
            out["shape"][i] = prior.score(b[i])
    product = np.clip(out["confidence"], 0, 1) * np.clip(out["shape"], 0, 1) * np.clip(out["consistency"], 0, 1)
    out["reliability"] = np.cbrt(product).astype(np.float32)
    return out


def _normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """(N, H, W) entropy divided by log(C), so 0 is certain and 1 uniform."""
    p = np.clip(probs, 1e-8, 1.0)
    return (-(p * np.log(p)).sum(1) / math.log(probs.shape[1])).astype(np.float32)


def _boundary(label: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds more than one class."""
    return ndimage.grey_dilation(label, size=3) != ndimage.grey_erosion(label, size=3)


def _ellipse_fit(mask: np.ndarray) -> float:
    """Dice between a mask and the solid ellipse of its centroid and second moments; 0 for an empty mask.

    A uniform solid ellipse has covariance ``diag(a^2, b^2) / 4`` in its axes, so it is the set of points at
    squared Mahalanobis distance <= 4. Each pixel adds the variance 1/12 of a unit square, which keeps the
    covariance invertible for one-pixel-thin masks.
    """
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return 0.0
    cy, cx = ys.mean(), xs.mean()
    cov = np.cov(np.stack([ys - cy, xs - cx]), bias=True) + np.eye(2) / 12.0
    inv = np.linalg.inv(cov)
    gy, gx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    dy, dx = gy - cy, gx - cx
    ellipse = inv[0, 0] * dy * dy + 2.0 * inv[0, 1] * dy * dx + inv[1, 1] * dx * dx <= 4.0
    return float(2.0 * np.logical_and(ellipse, mask).sum() / (ellipse.sum() + len(ys)))


def _check_probs(name: str, probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 4 or probs.shape[1] < 2:
        raise DataError(name, f"expected (N, C >= 2, H, W) probabilities, got shape {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise DataError(name, "holds NaN or infinite values")
    return probs
