"""Synthetic label errors like those a one-shot segmenter makes on real data, and features that agree with them.

The calibrator learns to correct labels from pairs whose initial label carries such an error; see
:func:`corrupt_labels` and :func:`match_features`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

CORRUPTION_PROBABILITY = 0.5
AFFINE_SCALE_RANGE = (0.6, 1.6)  # whole-object rescaling of corrupt_labels, drawn log-uniformly

# Relative frequency of each corruption kind. Shape errors dominate: on HC18 a one-shot segmenter's typical
# wrong label is the head plus irregular tissue attached to it, or the head with a bite out of it.
CORRUPTION_KINDS = {"leak": 3, "bite": 2, "fragments": 1, "holes": 1, "morph": 1, "affine": 1, "blob": 1}


def corrupt_labels(probs: torch.Tensor, rng: np.random.Generator, probability: float = CORRUPTION_PROBABILITY) -> torch.Tensor:
    """Inject the errors a one-shot segmenter makes on real data.

    Each map is, with ``probability``, given one of (weights in ``CORRUPTION_KINDS``):

    - ``leak``: irregular regions of the band around a class's object join it (tissue attached to the target);
    - ``bite``: irregular regions along the inside of its boundary leave it (part of the target missed);
    - ``fragments``: a few small false blobs of the class scattered over the frame;
    - ``holes``: small holes inside the object;
    - ``morph``: erosion or dilation by 3-8% of the side;
    - ``affine``: rescaling about the centroid by a factor drawn log-uniformly from ``AFFINE_SCALE_RANGE`` and a
      shift of up to 20% of the frame;
    - ``blob``: one false elliptical blob of a random foreground class.

    Irregular regions are thresholded smooth random fields, so they have the ragged outlines of real errors.
    Pixels a corruption changes become one-hot; the others keep their (possibly soft) probabilities.

    Args:
        probs: (B, C, H, W) probabilities (one-hot or soft), background in channel 0.
        rng: source of every random choice, so corruption is reproducible.
        probability: chance that a map is corrupted.

    Returns:
        (B, C, H, W) probabilities, channels still summing to 1.
    """
    kinds = list(CORRUPTION_KINDS)
    weights = np.array([CORRUPTION_KINDS[k] for k in kinds], dtype=np.float64)
    out = probs.clone()
    for i in range(probs.shape[0]):
        if rng.random() >= probability:
            continue
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        out[i] = _CORRUPTIONS[kind](probs[i], rng)
    return out


def match_features(features: torch.Tensor, probs: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
    """Make features tell the same story as corrupted labels.

    Where a corruption changed a pixel's class, the features there become the image's mean feature of the new
    class (the segmenter's mean feature of that class in the uncorrupted map). A real wrong label comes with
    features that agree with it, since both come from the same network; with the original features a denoiser
    would learn to read the answer off them and, at calibration time, where they are wrong too, copy them.
    Matched features leave it the label's shape, the image and the prior learned from the targets.

    Args:
        features: (B, F, h, w) segmenter features at the latent size.
        probs: (B, C, H, W) the uncorrupted probabilities the features came with.
        corrupted: (B, C, H, W) their corrupted version.

    Returns:
        (B, F, h, w) features.
    """
    hw = tuple(features.shape[-2:])
    c = probs.shape[1]
    before, after = _class_map(probs), _class_map(corrupted)
    changed = F.adaptive_avg_pool2d((before != after).float()[:, None], hw)
    if not bool(changed.any()):
        return features
    share = F.adaptive_avg_pool2d(one_hot(before, c), hw)  # (B, C, h, w): how much of each cell is class c
    mass = share.sum((2, 3))  # (B, C)
    means = torch.einsum("bchw,bfhw->bcf", share, features) / mass.clamp_min(1e-6)[..., None]
    overall = features.mean((2, 3))[:, None]  # a class absent before the corruption takes the image's mean
    means = torch.where(mass[..., None] > 0, means, overall)
    replacement = torch.einsum("bchw,bcf->bfhw", F.adaptive_avg_pool2d(one_hot(after, c), hw), means)
    return features * (1.0 - changed) + replacement * changed


def _smooth_field(h: int, w: int, rng: np.random.Generator) -> torch.Tensor:
    cells = int(rng.integers(3, 9))
    coarse = torch.from_numpy(rng.standard_normal((1, 1, cells, cells)).astype(np.float32))
    return F.interpolate(coarse, (h, w), mode="bicubic", align_corners=True)[0, 0]


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    k = 2 * radius + 1  # a square is separable: two 1D passes cost 2k per pixel instead of k * k
    rows = F.max_pool2d(mask[None, None].float(), (k, 1), stride=1, padding=(radius, 0))
    return F.max_pool2d(rows, (1, k), stride=1, padding=(0, radius))[0, 0] > 0


def _class_map(probs: torch.Tensor) -> torch.Tensor:
    """Argmax over the class axis (-3), first class on ties; torch's CPU argmax over it is ~50x slower."""
    best = probs.select(-3, 0)
    labels = torch.zeros(best.shape, dtype=torch.long, device=probs.device)
    for k in range(1, probs.shape[-3]):
        take = probs.select(-3, k) > best
        best = torch.where(take, probs.select(-3, k), best)
        labels = torch.where(take, k, labels)
    return labels


def _present_class(labels: torch.Tensor, c: int, rng: np.random.Generator) -> int | None:
    present = [k for k in range(1, c) if bool((labels == k).any())]
    return int(rng.choice(present)) if present else None


def _surrounding_class(labels: torch.Tensor, obj: torch.Tensor) -> int:
    """The most common class just outside ``obj``: what a bite or hole in it should become."""
    ring = labels[_dilate(obj, 2) & ~obj]
    return int(torch.mode(ring).values) if ring.numel() else 0


def _set_class(p: torch.Tensor, where: torch.Tensor, k: int) -> torch.Tensor:
    out = p.clone()
    out[:, where] = 0.0
    out[k, where] = 1.0
    return out


def _irregular(region: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A ragged part (20-60%) of ``region``: a thresholded smooth random field inside it."""
    if not bool(region.any()):
        return region
    field = _smooth_field(*region.shape, rng)
    threshold = torch.quantile(field[region], float(rng.uniform(0.4, 0.8)))
    return region & (field > threshold)


def _leak(p: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    labels = _class_map(p)
    k = _present_class(labels, p.shape[0], rng)
    if k is None:
        return _add_blob(p, rng)
    obj = labels == k
    band = _dilate(obj, max(1, round(rng.uniform(0.05, 0.2) * max(labels.shape)))) & ~obj
    return _set_class(p, _irregular(band, rng), k)


def _cut_from_object(p: torch.Tensor, rng: np.random.Generator, part: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Give ``part(obj)`` of a present class's object to the class around it (unchanged if no class is present)."""
    labels = _class_map(p)
    k = _present_class(labels, p.shape[0], rng)
    if k is None:
        return p.clone()
    obj = labels == k
    return _set_class(p, part(obj), _surrounding_class(labels, obj))


def _bite(p: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    def inner_band(obj: torch.Tensor) -> torch.Tensor:
        inner = obj & _dilate(~obj, max(1, round(rng.uniform(0.05, 0.2) * max(obj.shape))))
        return _irregular(inner, rng)

    return _cut_from_object(p, rng, inner_band)


def _ellipses(h: int, w: int, n: int, radius: tuple[float, float], rng: np.random.Generator) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    mask = torch.zeros(h, w, dtype=torch.bool)
    for _ in range(n):
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        ry, rx = rng.uniform(*radius) * h, rng.uniform(*radius) * w
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return mask


def _fragments(p: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    labels = _class_map(p)
    k = _present_class(labels, p.shape[0], rng) or int(rng.integers(1, p.shape[0]))
    return _set_class(p, _ellipses(*labels.shape, int(rng.integers(2, 7)), (0.02, 0.06), rng) & (labels == 0), k)


def _holes(p: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    return _cut_from_object(p, rng, lambda obj: _ellipses(*obj.shape, int(rng.integers(1, 5)), (0.02, 0.06), rng) & obj)


def _affine(p: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    fg = 1.0 - p[0]
    h, w = fg.shape
    ys = torch.linspace(-1.0, 1.0, h, dtype=p.dtype, device=p.device)
    xs = torch.linspace(-1.0, 1.0, w, dtype=p.dtype, device=p.device)
    mass = fg.sum().clamp_min(1e-6)
    cy = float((fg.sum(1) * ys).sum() / mass)
    cx = float((fg.sum(0) * xs).sum() / mass)
    lo, hi = AFFINE_SCALE_RANGE
    scale = float(np.exp(rng.uniform(math.log(lo), math.log(hi))))
    dx, dy = (float(v) for v in rng.uniform(-0.4, 0.4, size=2))  # normalised coords span 2: +-20% of the frame
    # affine_grid maps output coords to input coords: in = c + (out - c - d) / scale
    theta = torch.tensor(
        [[1 / scale, 0.0, cx - (cx + dx) / scale], [0.0, 1 / scale, cy - (cy + dy) / scale]], dtype=p.dtype, device=p.device
    )
    grid = F.affine_grid(theta[None], [1, *p.shape], align_corners=True)
    return F.grid_sample(p[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


def _add_blob(p: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    c, h, w = p.shape
    return _set_class(p, _ellipses(h, w, 1, (0.08, 0.25), rng), int(rng.integers(1, c)))


def _morph(p: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    radius = max(1, round(rng.uniform(0.03, 0.08) * p.shape[-1]))
    k = 2 * radius + 1
    sign = 1.0 if rng.random() < 0.5 else -1.0  # dilate, or erode as the dilation of the negative
    fg = sign * p[None, 1:]
    fg = F.max_pool2d(F.max_pool2d(fg, (k, 1), stride=1, padding=(radius, 0)), (1, k), stride=1, padding=(0, radius))
    fg = sign * fg[0]
    total = fg.sum(0, keepdim=True)
    fg = fg / total.clamp_min(1.0)  # dilated classes may overlap where they meet; keep the sum <= 1
    return torch.cat([1.0 - fg.sum(0, keepdim=True), fg], dim=0)


_CORRUPTIONS = {
    "leak": _leak,
    "bite": _bite,
    "fragments": _fragments,
    "holes": _holes,
    "morph": _morph,
    "affine": _affine,
    "blob": _add_blob,
}


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, H, W) class indices -> (B, C, H, W) float one-hot maps."""
    return F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()
