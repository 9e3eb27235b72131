"""Batched augmentation of labelled images: one dense displacement field and intensity changes per view.

Exemplar views are augmented strongly (:func:`exemplar_profile`); pseudo-labelled cases almost as strongly
(:func:`pseudo_profile`). All random draws come from one seeded generator, so views are a pure function of the
inputs and the seed. Consistency training uses the two halves of :func:`augment` on their own: geometry only for
its weak views (:func:`spatial_views`), intensity only for its strong views (:func:`intensity_views`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp
from monai.networks.layers import GaussianFilter

from caudo_ray.arrays import check_pair
from caudo_ray.config import SegmenterConfig


@dataclass(frozen=True)
class AugmentProfile:
    """Ranges of one augmentation strength; every ``*_prob`` is a per-view probability."""

    rotate_deg: float
    zoom: tuple[float, float]  # apparent target size factor, drawn log-uniformly
    area_limits: tuple[float, float] | None  # if set, zoom no further than keeps the target's share of the frame in it
    translate: float  # max shift as a fraction of each side
    elastic_prob: float
    elastic_px: float  # std of the control-point displacement, as a fraction of the image side
    gamma: tuple[float, float]  # drawn log-uniformly
    intensity_prob: float  # gamma and intensity shift
    noise_std: float  # max noise std; each noisy view draws its std in [0, noise_std]
    smooth_prob: float
    bias_prob: float
    curve_prob: float  # a random monotone intensity curve


def exemplar_profile(cfg: SegmenterConfig) -> AugmentProfile:
    return AugmentProfile(
        rotate_deg=30.0,
        zoom=(float(cfg.scale_range[0]), float(cfg.scale_range[1])),
        area_limits=None if cfg.target_area_limits is None else tuple(cfg.target_area_limits),
        translate=0.2,
        elastic_prob=0.5,
        elastic_px=0.025,
        gamma=(0.5, 2.0),
        intensity_prob=0.5,
        noise_std=0.08,
        smooth_prob=0.3,
        bias_prob=0.3,
        curve_prob=0.5,
    )


# Pseudo-labelled cases are augmented almost as strongly as the exemplar (a narrower zoom, since they already show
# the pool's real sizes, and fewer elastic fields): a student that sees its teacher's labels on harder views than
# the teacher did learns more than their confirmation (HC18, one exemplar, 3 rounds of plain self-training: test
# Dice 0.753 -> 0.752 with light augmentation, -> 0.782 with this).
def pseudo_profile(cfg: SegmenterConfig) -> AugmentProfile:
    return replace(exemplar_profile(cfg), zoom=(0.7, 1.4), area_limits=None, elastic_prob=0.3)


_CURVE_POINTS = 6  # control points of a random intensity curve

_ELASTIC_CELLS = 5  # control points per side of the random displacement field
_BIAS_COEFF = 0.3  # max |coefficient| of the degree-2 log bias field

with warnings.catch_warnings():
    # Warp announces that it falls back to torch's grid_sample when MONAI's C++ extension is absent; that
    # fallback is exactly what we want, on CPU and GPU.
    warnings.simplefilter("ignore", UserWarning)
    _WARP_IMAGE = Warp(mode="bilinear", padding_mode="zeros")
    _WARP_LABEL = Warp(mode="nearest", padding_mode="zeros")
_BLUR = GaussianFilter(spatial_dims=2, sigma=1.0)


def augment(
    images: np.ndarray, labels: np.ndarray, sources: np.ndarray, profile: AugmentProfile, rng_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Augment ``images[sources]`` with their labels, all views in one batch.

    Spatially, each view gets one dense displacement field composed of a random affine (rotation, log-uniform
    zoom, shift, horizontal flip) and an optional smooth elastic field, applied with MONAI's ``Warp`` in a single
    resampling: bilinear for the image, nearest for the label, zero (background) outside. We build the field
    ourselves rather than chaining per-sample ``monai.transforms`` (RandAffine, Rand2DElastic, ...) because
    those cost ~30 ms per view on a 2-core machine, more than a whole training step, and because RandAffine
    draws its scale uniformly in MONAI's sampling factor 1/zoom: over a zoom range of (0.5, 1.6) its median view
    would be shrunk to 0.76x, whereas a log-uniform zoom spends equal effort on every octave of target size.

    Intensity, per view with its own probability: gamma, a smooth multiplicative bias field, Gaussian
    smoothing (MONAI ``GaussianFilter``), an intensity shift and Gaussian noise; finally each image is
    min-max rescaled to [0, 1], the normalisation the rest of the pipeline assumes.

    All random draws come from one ``numpy`` generator seeded with ``rng_seed``, so the views are a pure
    function of the inputs and the seed. The spatial draws all come before the intensity draws, which is what
    lets :func:`spatial_views` and :func:`intensity_views` run either half on its own.
    """
    rng = np.random.default_rng(int(rng_seed) % (2**64))
    if len(sources) == 0:
        return images[:0].copy(), labels[:0].copy()
    img, lab = _warp(images, labels, np.asarray(sources), profile, rng)
    return _intensity(img, profile, rng), np.rint(lab[:, 0].numpy()).astype(np.uint8)


def spatial_views(
    images: np.ndarray,
    sources: np.ndarray,
    profile: AugmentProfile,
    rng_seed: int,
    labels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The geometric half of :func:`augment` alone: warped ``images[sources]`` (and labels), intensities untouched.

    Consistency training's weak views: the teacher labels the image as the geometry left it, and the strong
    views (:func:`intensity_views` of the same warped image) stay pixel-aligned with that label.

    Args:
        images: (N, H, W) float32 images in [0, 1].
        sources: indices into ``images`` of the views to make.
        profile: its spatial ranges are used (``rotate_deg``, ``zoom``, ``translate``, ``elastic_*``); a
            ``area_limits`` needs ``labels``.
        rng_seed: the views are a pure function of the inputs and this seed.
        labels: (N, H, W) label maps warped alongside (nearest), or None for images only.

    Returns:
        ``(images (n, H, W) float32, labels (n, H, W) uint8 or None)``.
    """
    if labels is None and profile.area_limits is not None:
        raise ValueError("a profile with area_limits zooms by the label's area: pass labels, or a profile without it")
    rng = np.random.default_rng(int(rng_seed) % (2**64))
    sources = np.asarray(sources)
    if len(sources) == 0:
        return images[:0].copy(), None if labels is None else labels[:0].copy()
    img, lab = _warp(images, labels, sources, profile, rng)
    out_lab = None if lab is None else np.rint(lab[:, 0].numpy()).astype(np.uint8)
    return img[:, 0].numpy(), out_lab


def intensity_views(images: np.ndarray, profile: AugmentProfile, rng_seed: int) -> np.ndarray:
    """The intensity half of :func:`augment` alone: one perturbed, [0, 1]-rescaled view per image, same geometry.

    Gamma, bias field, smoothing, shift, noise and a random monotone curve, each with the profile's per-view
    probability. No pixel moves, so a label of ``images`` is a label of the result (the strong views of
    consistency training).

    Args:
        images: (n, H, W) float32 images in [0, 1].
        profile: its intensity ranges and probabilities are used.
        rng_seed: the views are a pure function of the inputs and this seed.

    Returns:
        (n, H, W) float32 images in [0, 1].
    """
    rng = np.random.default_rng(int(rng_seed) % (2**64))
    if len(images) == 0:
        return np.asarray(images, np.float32)[:0].copy()
    # Gamma needs x >= 0 exactly, as after the warp in augment.
    img = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1).clamp_min(0.0)
    return _intensity(img, profile, rng)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column coordinates of every pixel (float64) and the image centre."""
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    return rows, cols, centre


def _warp(
    images: np.ndarray, labels: np.ndarray | None, sources: np.ndarray, p: AugmentProfile, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One displacement field per view (affine, then optional elastic); returns (n, 1, H, W) image and label."""
    n = len(sources)
    h, w = images.shape[1:]
    img = torch.from_numpy(images[sources]).unsqueeze(1)

    # Affine: for output pixel x the source is c + M (x - c) - t; M = rotation / zoom, with a flip of columns.
    zoom_lo, zoom_hi = np.full(n, p.zoom[0]), np.full(n, p.zoom[1])
    if p.area_limits is not None:
        area = (labels[sources] > 0).mean(axis=(1, 2))
        has = area > 0  # an empty label has no size to keep in bounds; it keeps the plain zoom range
        zoom_lo[has] = np.maximum(zoom_lo[has], np.sqrt(p.area_limits[0] / area[has]))
        zoom_hi[has] = np.minimum(zoom_hi[has], np.sqrt(p.area_limits[1] / area[has]))
        zoom_lo = np.minimum(zoom_lo, zoom_hi)  # a target already past a limit is kept at the nearest zoom
    zoom = np.exp(rng.uniform(np.log(zoom_lo), np.log(zoom_hi)))
    angle = np.deg2rad(rng.uniform(-p.rotate_deg, p.rotate_deg, n))
    shift = rng.uniform(-p.translate, p.translate, (n, 2)) * np.array([h, w])
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0)  # horizontal: ultrasound has no preferred left/right
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    m = np.stack([np.stack([cos, -sin * flip], 1), np.stack([sin, cos * flip], 1)], 1)  # (n, 2, 2)
    rows, cols, centre = _grid(h, w)
    rel = np.stack([rows, cols]) - centre[:, None, None]  # (2, h, w)
    source = np.einsum("nij,jhw->nihw", m, rel) + (centre - shift)[:, :, None, None]
    ddf = torch.from_numpy((source - (rel + centre[:, None, None])).astype(np.float32))

    elastic = rng.random(n) < p.elastic_prob
    control = rng.normal(0.0, p.elastic_px, (n, 2, _ELASTIC_CELLS, _ELASTIC_CELLS)) * np.array([h, w])[:, None, None]
    if elastic.any():
        smooth = F.interpolate(torch.from_numpy(control.astype(np.float32)), (h, w), mode="bicubic", align_corners=True)
        ddf = ddf + smooth * torch.from_numpy(elastic.astype(np.float32))[:, None, None, None]

    img = _WARP_IMAGE(img, ddf).clamp_min(0.0)  # bilinear never overshoots, but gamma needs x >= 0 exactly
    if labels is None:
        return img, None
    lab = torch.from_numpy(labels[sources].astype(np.float32)).unsqueeze(1)
    return img, _WARP_LABEL(lab, ddf)


def _intensity(img: torch.Tensor, p: AugmentProfile, rng: np.random.Generator) -> np.ndarray:
    """Intensity changes of (n, 1, H, W) images >= 0, each view rescaled to [0, 1]; returns (n, H, W) float32."""
    n, h, w = img.shape[0], img.shape[2], img.shape[3]
    rows, cols, centre = _grid(h, w)

    def per_view(prob: float) -> torch.Tensor:
        return torch.from_numpy((rng.random(n) < prob).astype(np.float32))[:, None, None, None]

    gamma = np.exp(rng.uniform(np.log(p.gamma[0]), np.log(p.gamma[1]), n))
    use = per_view(p.intensity_prob)
    img = use * img.pow(torch.from_numpy(gamma.astype(np.float32))[:, None, None, None]) + (1 - use) * img

    coeff = rng.uniform(-_BIAS_COEFF, _BIAS_COEFF, (n, 6))
    use = per_view(p.bias_prob)
    yy, xx = (rows - centre[0]) / max(centre[0], 1.0), (cols - centre[1]) / max(centre[1], 1.0)
    basis = np.stack([np.ones_like(yy), yy, xx, yy * yy, xx * xx, yy * xx])  # smooth, degree 2
    bias = torch.from_numpy(np.exp(np.einsum("nk,khw->nhw", coeff, basis)).astype(np.float32))[:, None]
    img = use * img * bias + (1 - use) * img

    strength = torch.from_numpy(rng.uniform(0.3, 1.0, n).astype(np.float32))[:, None, None, None]
    use = per_view(p.smooth_prob) * strength
    img = use * _BLUR(img) + (1 - use) * img

    offsets = torch.from_numpy(rng.uniform(-0.1, 0.1, n).astype(np.float32))[:, None, None, None]
    img = img + per_view(p.intensity_prob) * offsets

    noise_std = rng.uniform(0.0, p.noise_std, n) * (rng.random(n) < p.intensity_prob)
    noise = rng.standard_normal((n, 1, h, w)) * noise_std[:, None, None, None]
    img = img + torch.from_numpy(noise.astype(np.float32))

    out = img[:, 0].numpy()
    lo = out.min(axis=(1, 2), keepdims=True)
    span = out.max(axis=(1, 2), keepdims=True) - lo
    out = np.where(span > 0, (out - lo) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)

    # A random monotone intensity curve (ends near 0 and 1, so the range stays [0, 1]) remaps grey levels while
    # keeping their order: the segmenter must rely on edges and shape more than on the exemplar's exact
    # brightness of tissue and target (HC18, 3 exemplars: exemplar-only test Dice 0.735 -> 0.748).
    levels = np.sort(rng.uniform(0.0, 1.0, (n, _CURVE_POINTS)), axis=1)
    levels[:, 0], levels[:, -1] = rng.uniform(0.0, 0.2, n), rng.uniform(0.8, 1.0, n)
    levels = np.sort(levels, axis=1)
    knots = np.linspace(0.0, 1.0, _CURVE_POINTS)
    for i in np.flatnonzero(rng.random(n) < p.curve_prob):
        out[i] = np.interp(out[i], knots, levels[i])
    return out


def augment_views(
    images: np.ndarray, labels: np.ndarray, n: int, *, cfg: SegmenterConfig, rng_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Strongly augmented views of labelled images (the exemplars).

    Each view: rotation within ±30°, zoom drawn log-uniformly over ``cfg.scale_range`` (zoomed-out views show
    small targets; the HC18 head size varies ~3x), shift up to 20% of each side, horizontal flip (half the
    views), a smooth elastic deformation (half), then gamma, bias field, smoothing, intensity shift and noise,
    each on a random share of the views, and a per-image rescale to [0, 1]. Labels follow every spatial step
    with nearest interpolation, so they stay valid class indices. See :func:`augment` for the mechanics.

    Args:
        images: (E, H, W) float32 images in [0, 1].
        labels: (E, H, W) uint8 label maps.
        n: number of views; the sources cycle through the E exemplars from a seeded offset.
        cfg: segmenter config (its ``scale_range``).
        rng_seed: the views are a pure function of the inputs and this seed.

    Returns:
        ``(images (n, H, W) float32, labels (n, H, W) uint8)``.
    """
    images, labels = check_pair("exemplar", images, labels)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return augment(images, labels, cycle(len(images), n, rng_seed), exemplar_profile(cfg), rng_seed)


def cycle(num_sources: int, n: int, seed: int) -> np.ndarray:
    """Indices of n views that use every source equally often, starting at a seeded offset."""
    offset = int(np.random.SeedSequence([int(seed) % (2**63), 1]).generate_state(1)[0]) % num_sources
    return (offset + np.arange(n)) % num_sources


