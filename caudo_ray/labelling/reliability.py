"""Reliability of pseudo labels without ground truth, and the per-case choice between calibrated and initial.

Pure numpy/scipy: computed by every calibration worker for the cases it labels.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from caudo_ray.errors import DataError
from caudo_ray.metrics import dice

BAND_RADIUS = 2  # pixels on each side of a predicted boundary that make up the uncertain band


def reliability_scores(
    initial_probs: np.ndarray, calibrated_probs: np.ndarray, flipped_probs: np.ndarray | None = None
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
    - ``compactness``: mean over foreground classes of the Dice between the class's pixels in ``b`` and the
      ellipse with the same centroid and second moments; 0 for a class missing from ``b``. Our targets (fetal
      head, phantom structures) are single convex, roughly elliptical objects present in every image, so
      fragments, stray blobs, holes, truncation by the frame and empty maps all lower it. It is a shape prior:
      on targets that are not convex blobs it would rank by shape, not by correctness.
    - ``reliability = (confidence * compactness * consistency) ** (1/3)``, in [0, 1]. The geometric mean needs
      every signal to be high: a blurry label, a misshapen one (a missed head whose label covers part of it) and
      one the segmenter does not repeat on the flipped image are all doubtful. On HC18 (round 0, 698 pool cases
      with hidden truth, one exemplar) its Spearman correlation with the calibrated labels' true Dice was 0.76,
      against 0.72 with agreement as a fourth factor and 0.60 for the initial map's mean entropy: once the
      calibrator repairs what it moves, a large move no longer marks a bad label.

    Args:
        initial_probs: (N, C, H, W) segmenter softmax.
        calibrated_probs: (N, C, H, W) calibrated probabilities.
        flipped_probs: (N, C, H, W) segmenter softmax of the horizontally flipped images, flipped back; None
            leaves consistency out (1 for every case).

    Returns:
        Dict of (N,) float32 arrays: agreement, consistency, confidence, entropy, area, compactness, reliability.
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

    out = {k: np.ones(n, np.float32) for k in ("agreement", "consistency", "confidence", "entropy", "area", "compactness")}
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
        out["compactness"][i] = np.mean([_ellipse_fit(b[i] == k) for k in range(1, c)])
    product = np.clip(out["confidence"], 0, 1) * np.clip(out["compactness"], 0, 1) * np.clip(out["consistency"], 0, 1)
    out["reliability"] = np.cbrt(product).astype(np.float32)
    return out


def accept_calibration(
    initial_probs: np.ndarray, calibrated_probs: np.ndarray, flipped_probs: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per case, keep the calibrated label only if it is at least as reliable as the initial one.

    Both labels are scored by :func:`reliability_scores` (the initial one as if the calibrator had left it
    alone); each case keeps the more reliable, the calibrated one on ties. A calibrator is trained on the views
    of one exemplar, and for some exemplars it moves many labels the wrong way: on HC18 with exemplar 070_HC
    (a small head) calibration took round 0's pseudo-label Dice from 0.721 to 0.639 (300 pool cases), this test
    kept 18% of the calibrated labels and gave 0.721; with 780_HC, where calibration helped (0.679 -> 0.710), it
    kept 58% and gave 0.697.

    Args:
        initial_probs: (N, C, H, W) segmenter softmax.
        calibrated_probs: (N, C, H, W) calibrated probabilities.
        flipped_probs: (N, C, H, W) segmenter softmax of the flipped images, flipped back, or None.

    Returns:
        ``(probs, scores)``: (N, C, H, W) the accepted probabilities, and the :func:`reliability_scores` of the
        accepted labels plus ``accepted`` (1.0 where the calibrated label was kept, else 0.0).
    """
    calibrated = reliability_scores(initial_probs, calibrated_probs, flipped_probs)
    initial = reliability_scores(initial_probs, initial_probs, flipped_probs)
    accepted = calibrated["reliability"] >= initial["reliability"]
    scores = {k: np.where(accepted, calibrated[k], initial[k]).astype(np.float32) for k in calibrated}
    scores["accepted"] = accepted.astype(np.float32)
    probs = np.where(accepted[:, None, None, None], calibrated_probs, initial_probs)
    return probs, scores


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
