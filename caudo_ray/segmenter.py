"""The segmenter S: a 2D MONAI UNet, its augmentation, weighted training and feature-tapping inference.

S is trained in round 0 on strongly augmented views of the exemplar(s) and, from round 1 on, warm-started on a
mix of exemplar views and selected calibrated pseudo labels weighted by their reliability. At inference it gives
the softmax probabilities and a decoder feature map, tapped with a forward hook on :func:`feature_module`, so
the calibrator's guidance comes from the very network that made the pseudo label (no second copy of it).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.blocks import Warp
from monai.networks.layers import GaussianFilter
from monai.networks.nets import UNet
from torch import nn
from tqdm.auto import tqdm

from caudo_ray.config import SegmenterConfig
from caudo_ray.errors import DataError

__all__ = [
    "Prediction",
    "TrainResult",
    "augment_views",
    "build_segmenter",
    "feature_channels",
    "feature_module",
    "predict",
    "predict_tensor",
    "train_segmenter",
]


def build_segmenter(cfg: SegmenterConfig, num_classes: int, *, seed: int | None = None) -> UNet:
    """Build the 2D MONAI UNet.

    Args:
        cfg: channels, strides and residual units.
        num_classes: output channels, background included.
        seed: when given, the initial weights are drawn from this seed without touching the global torch RNG.

    Returns:
        An untrained ``monai.networks.nets.UNet`` (1 input channel, ``num_classes`` output logits).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")

    def make() -> UNet:
        return UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=num_classes,
            channels=tuple(cfg.channels),
            strides=tuple(cfg.strides),
            num_res_units=cfg.num_res_units,
        )

    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def feature_module(model: nn.Module) -> nn.Module:
    """The submodule whose output is the segmenter's feature map.

    MONAI's UNet is ``Sequential(down_0, SkipConnection(inner), up_0)`` where ``up_0`` is the final output
    convolution. We tap the top ``SkipConnection``: its output is the concatenation of the first encoder stage
    and the last decoder stage, at 1/``strides[0]`` of the input resolution, i.e. exactly the tensor the output
    layer turns into logits. It therefore carries both the decoder's semantic evidence and the encoder's
    edge-level detail, with ``feature_channels(cfg)`` channels, at a resolution that is cheap to store and
    downsample to the calibrator's latent grid.

    Args:
        model: a UNet from :func:`build_segmenter`, optionally wrapped (DDP's ``.module`` is unwrapped).
    """
    net = getattr(model, "module", model)
    if not isinstance(net, UNet):
        raise TypeError(f"expected a monai UNet from build_segmenter, got {type(net).__name__}")
    return net.model[1]


def feature_channels(cfg: SegmenterConfig) -> int:
    """Number of channels F of the feature map tapped by :func:`feature_module`."""
    # The inner block's up layer returns channels[0] when there are deeper levels; with only two levels the
    # bottom unit's channels[1] are concatenated directly.
    inner = cfg.channels[0] if len(cfg.channels) > 2 else cfg.channels[1]
    return cfg.channels[0] + inner


@dataclass
class Prediction:
    """Segmenter output for a set of images.

    Attributes:
        probs: (N, C, H, W) float32 softmax probabilities.
        features: (N, F, h, w) float32 feature map from :func:`feature_module`, or None when not requested.
    """

    probs: np.ndarray
    features: np.ndarray | None


def predict_tensor(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and feature map for a batch, in one forward pass.

    Runs without gradients and in eval mode (the previous mode is restored). The hook is removed before
    returning, also when the forward pass raises, so repeated calls never accumulate hooks.

    Args:
        model: a UNet from :func:`build_segmenter`.
        x: (B, 1, H, W) float tensor on the model's device.

    Returns:
        ``(probs (B, C, H, W), features (B, F, h, w))`` tensors on the model's device.
    """
    captured: list[torch.Tensor] = []
    handle = feature_module(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
        model.train(was_training)
    return torch.softmax(logits, dim=1), captured[0]


def predict(
    model: nn.Module,
    images: np.ndarray,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    return_features: bool = True,
) -> Prediction:
    """Predict probabilities (and features) for (N, H, W) float images in [0, 1].

    The model is moved to ``device``. Features are only copied back to host memory when asked for.
    """
    images = _check_images("images", images)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    model.to(device)
    probs, feats = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).unsqueeze(1).to(device)
        p, f = predict_tensor(model, x)
        probs.append(p.float().cpu().numpy())
        if return_features:
            feats.append(f.float().cpu().numpy())
    if not probs:
        raise DataError("images", "no images to predict")
    return Prediction(
        probs=np.concatenate(probs).astype(np.float32, copy=False),
        features=np.concatenate(feats).astype(np.float32, copy=False) if return_features else None,
    )


# ----------------------------------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class _AugmentProfile:
    """Ranges of one augmentation strength; every ``*_prob`` is a per-view probability."""

    rotate_deg: float
    zoom: tuple[float, float]  # apparent target size factor, drawn log-uniformly
    target_area: tuple[float, float] | None  # if set, zoom so the target covers this share of the frame instead
    translate: float  # max shift as a fraction of each side
    elastic_prob: float
    elastic_px: float  # std of the control-point displacement, as a fraction of the image side
    gamma: tuple[float, float]  # drawn log-uniformly
    intensity_prob: float  # gamma and intensity shift
    noise_std: float  # max noise std; each noisy view draws its std in [0, noise_std]
    smooth_prob: float
    bias_prob: float
    curve_prob: float  # a random monotone intensity curve


def _strong_profile(cfg: SegmenterConfig) -> _AugmentProfile:
    return _AugmentProfile(
        rotate_deg=30.0,
        zoom=(float(cfg.scale_range[0]), float(cfg.scale_range[1])),
        target_area=None if cfg.target_area_range is None else tuple(cfg.target_area_range),
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
def _pseudo_profile(cfg: SegmenterConfig) -> _AugmentProfile:
    return replace(_strong_profile(cfg), zoom=(0.7, 1.4), target_area=None, elastic_prob=0.3)


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


def _augment(
    images: np.ndarray, labels: np.ndarray, sources: np.ndarray, profile: _AugmentProfile, rng_seed: int
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
    function of the inputs and the seed.
    """
    p = profile
    rng = np.random.default_rng(int(rng_seed) % (2**64))
    n = len(sources)
    if n == 0:
        return images[:0].copy(), labels[:0].copy()
    h, w = images.shape[1:]
    img = torch.from_numpy(images[sources]).unsqueeze(1)
    lab = torch.from_numpy(labels[sources].astype(np.float32)).unsqueeze(1)

    # Affine: for output pixel x the source is c + M (x - c) - t; M = rotation / zoom, with a flip of columns.
    zoom_lo, zoom_hi = np.full(n, p.zoom[0]), np.full(n, p.zoom[1])
    if p.target_area is not None:
        area = (labels[sources] > 0).mean(axis=(1, 2))
        has = area > 0  # an empty label has no size to match; it keeps the plain zoom range
        zoom_lo[has] = np.sqrt(p.target_area[0] / area[has])
        zoom_hi[has] = np.sqrt(p.target_area[1] / area[has])
    zoom = np.exp(rng.uniform(np.log(zoom_lo), np.log(zoom_hi)))
    angle = np.deg2rad(rng.uniform(-p.rotate_deg, p.rotate_deg, n))
    shift = rng.uniform(-p.translate, p.translate, (n, 2)) * np.array([h, w])
    flip = np.where(rng.random(n) < 0.5, -1.0, 1.0)  # horizontal: ultrasound has no preferred left/right
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    m = np.stack([np.stack([cos, -sin * flip], 1), np.stack([sin, cos * flip], 1)], 1)  # (n, 2, 2)
    centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    rows, cols = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    rel = np.stack([rows, cols]) - centre[:, None, None]  # (2, h, w)
    source = np.einsum("nij,jhw->nihw", m, rel) + (centre - shift)[:, :, None, None]
    ddf = torch.from_numpy((source - (rel + centre[:, None, None])).astype(np.float32))

    elastic = rng.random(n) < p.elastic_prob
    control = rng.normal(0.0, p.elastic_px, (n, 2, _ELASTIC_CELLS, _ELASTIC_CELLS)) * np.array([h, w])[:, None, None]
    if elastic.any():
        smooth = F.interpolate(torch.from_numpy(control.astype(np.float32)), (h, w), mode="bicubic", align_corners=True)
        ddf = ddf + smooth * torch.from_numpy(elastic.astype(np.float32))[:, None, None, None]

    img = _WARP_IMAGE(img, ddf).clamp_min(0.0)  # bilinear never overshoots, but gamma needs x >= 0 exactly
    lab = _WARP_LABEL(lab, ddf)

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
    return out, np.rint(lab[:, 0].numpy()).astype(np.uint8)


def augment_views(
    images: np.ndarray, labels: np.ndarray, n: int, *, cfg: SegmenterConfig, rng_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Strongly augmented views of labelled images (the exemplars).

    Each view: rotation within ±30°, zoom drawn log-uniformly over ``cfg.scale_range`` (zoomed-out views show
    small targets; the HC18 head size varies ~3x), shift up to 20% of each side, horizontal flip (half the
    views), a smooth elastic deformation (half), then gamma, bias field, smoothing, intensity shift and noise,
    each on a random share of the views, and a per-image rescale to [0, 1]. Labels follow every spatial step
    with nearest interpolation, so they stay valid class indices. See :func:`_augment` for the mechanics.

    Args:
        images: (E, H, W) float32 images in [0, 1].
        labels: (E, H, W) uint8 label maps.
        n: number of views; the sources cycle through the E exemplars from a seeded offset.
        cfg: segmenter config (its ``scale_range``).
        rng_seed: the views are a pure function of the inputs and this seed.

    Returns:
        ``(images (n, H, W) float32, labels (n, H, W) uint8)``.
    """
    images, labels = _check_pair("exemplar", images, labels)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _augment(images, labels, _cycle(len(images), n, rng_seed), _strong_profile(cfg), rng_seed)


def _cycle(num_sources: int, n: int, seed: int) -> np.ndarray:
    """Indices of n views that use every source equally often, starting at a seeded offset."""
    offset = int(np.random.SeedSequence([int(seed) % (2**63), 1]).generate_state(1)[0]) % num_sources
    return (offset + np.arange(n)) % num_sources


# --------------------------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    """Outcome of :func:`train_segmenter`.

    Attributes:
        losses: weighted loss of each iteration run in this call.
        optimizer_state: Adam's state dict, to resume or continue.
        iterations: iterations done in total, counting ``start_iteration``.
    """

    losses: list[float] = field(default_factory=list)
    optimizer_state: dict[str, Any] = field(default_factory=dict)
    iterations: int = 0


_dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, reduction="none")


def _per_sample_dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """DiceCE per sample: foreground soft Dice (classes averaged) plus pixel-mean cross entropy, shape (B,)."""
    dice = _dice(logits, target[:, None]).flatten(1).mean(1)
    ce = F.cross_entropy(logits, target.long(), reduction="none").flatten(1).mean(1)
    return dice + ce


def _cosine_lr(base: float, iteration: int, total: int) -> float:
    # Decays to 5% rather than 0 so a warm-started round still moves in its last iterations.
    progress = iteration / max(total, 1)
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_segmenter(
    model: nn.Module,
    *,
    exemplar_images: np.ndarray,
    exemplar_labels: np.ndarray,
    pseudo_images: np.ndarray | None = None,
    pseudo_labels: np.ndarray | None = None,
    pseudo_weights: np.ndarray | None = None,
    iterations: int,
    cfg: SegmenterConfig,
    seed: int,
    device: str | torch.device = "cpu",
    progress: bool = False,
    checkpoint_fn: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
    checkpoint_every: int = 0,
    start_iteration: int = 0,
    optimizer_state: dict[str, Any] | None = None,
) -> TrainResult:
    """Train (or warm-start) the segmenter on exemplar views and weighted pseudo labels.

    Every batch holds ``cfg.batch_size`` samples. Without pseudo labels all are strongly augmented exemplar
    views; with them, ``max(1, round(batch_size * cfg.exemplar_fraction))`` are exemplar views and the rest are
    pseudo-labelled cases drawn uniformly and augmented almost as strongly (``_pseudo_profile``). The loss is
    DiceCE per sample times its weight (``cfg.exemplar_weight`` for exemplar views, the reliability for a pseudo
    label), averaged over the batch. Pseudo cases of weight 0 are dropped first, so they change nothing.

    Adam with a cosine learning rate over ``iterations``. All randomness of iteration ``i`` is derived from
    ``(seed, i)`` and nothing reads the global RNGs, so on CPU the same inputs and seed give the same weights, and
    a run resumed from a checkpoint at iteration ``k`` continues exactly as the uninterrupted run would.

    Args:
        model: a UNet from :func:`build_segmenter`; pass an already trained one to warm-start. Trained in place.
        exemplar_images: (E, H, W) float32 in [0, 1].
        exemplar_labels: (E, H, W) uint8.
        pseudo_images: (P, H, W) float32 in [0, 1], or None.
        pseudo_labels: (P, H, W) uint8, or None.
        pseudo_weights: (P,) non-negative weights (reliabilities); None means all 1.
        iterations: total iterations, counting from 0 (a resumed run passes the same total).
        cfg: segmenter config (batch size, learning rate, scale range, exemplar weight and fraction).
        seed: seed of all sampling and augmentation.
        device: torch device to train on.
        progress: show a tqdm bar.
        checkpoint_fn: called as ``checkpoint_fn(done, model, optimizer)`` after every ``checkpoint_every``
            iterations, ``done`` being the number of iterations completed (pass it back as ``start_iteration``).
            Both state dicts hold live tensors that training keeps updating: serialise or deep-copy them there.
        checkpoint_every: 0 disables checkpoints.
        start_iteration: first iteration to run, when resuming.
        optimizer_state: Adam state dict to resume from.

    Returns:
        A :class:`TrainResult`.

    Raises:
        DataError: on inconsistent shapes, label values outside the model's classes, or bad weights.
    """
    ex_img, ex_lab = _check_pair("exemplar", exemplar_images, exemplar_labels)
    num_classes = getattr(model, "module", model).out_channels
    _check_label_range("exemplar_labels", ex_lab, num_classes)
    ps_img, ps_lab, ps_w = _pseudo_set(pseudo_images, pseudo_labels, pseudo_weights, ex_img.shape[1:], num_classes)
    if not 0 <= start_iteration <= iterations:
        raise ValueError(f"start_iteration must be in [0, iterations={iterations}], got {start_iteration}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")

    n_pseudo = 0 if ps_img is None else cfg.batch_size - max(1, round(cfg.batch_size * cfg.exemplar_fraction))
    n_exemplar = cfg.batch_size - n_pseudo
    strong, pseudo_profile = _strong_profile(cfg), _pseudo_profile(cfg)

    model.to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    losses: list[float] = []
    bar = tqdm(range(start_iteration, iterations), desc="segmenter", disable=not progress, leave=False)
    for it in bar:
        aug_seed, pseudo_seed, sample_seed = np.random.SeedSequence([seed, it]).generate_state(3)
        imgs, labs = _augment(ex_img, ex_lab, _cycle(len(ex_img), n_exemplar, int(aug_seed)), strong, int(aug_seed))
        weights = np.full(n_exemplar, cfg.exemplar_weight, np.float32)
        if n_pseudo:
            gen = torch.Generator().manual_seed(int(sample_seed))
            idx = torch.randint(len(ps_img), (n_pseudo,), generator=gen).numpy()
            p_imgs, p_labs = _augment(ps_img, ps_lab, idx, pseudo_profile, int(pseudo_seed))
            imgs, labs = np.concatenate([imgs, p_imgs]), np.concatenate([labs, p_labs])
            weights = np.concatenate([weights, ps_w[idx]])

        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(cfg.learning_rate, it, iterations)
        x = torch.from_numpy(imgs).unsqueeze(1).to(device)
        y = torch.from_numpy(labs.astype(np.int64)).to(device)
        w = torch.from_numpy(weights).to(device)
        loss = (_per_sample_dice_ce(model(x), y) * w).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach().cpu()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        if checkpoint_fn is not None and checkpoint_every and (it + 1) % checkpoint_every == 0:
            checkpoint_fn(it + 1, model, optimizer)

    return TrainResult(losses=losses, optimizer_state=optimizer.state_dict(), iterations=iterations)


# ------------------------------------------------------------------------------------------------------ validation


def _check_images(name: str, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 3:
        raise DataError(name, f"expected (N, H, W) images, got shape {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise DataError(name, f"expected float images in [0, 1], got dtype {images.dtype}")
    return np.ascontiguousarray(images, dtype=np.float32)


def _check_pair(name: str, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    images = _check_images(f"{name}_images", images)
    labels = np.asarray(labels)
    if labels.shape != images.shape:
        raise DataError(f"{name}_labels", f"shape {labels.shape} does not match the images' {images.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{name}_labels", f"expected integer class indices, got dtype {labels.dtype}")
    if len(images) == 0:
        raise DataError(f"{name}_images", "no images given")
    return images, labels.astype(np.uint8)


def _check_label_range(name: str, labels: np.ndarray, num_classes: int) -> None:
    top = int(labels.max()) if labels.size else 0
    if top >= num_classes:
        raise DataError(name, f"holds class {top} but the model has {num_classes} classes")


def _pseudo_set(
    images: np.ndarray | None,
    labels: np.ndarray | None,
    weights: np.ndarray | None,
    shape: tuple[int, ...],
    num_classes: int,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    if images is None and labels is None:
        if weights is not None:
            raise DataError("pseudo_weights", "given without pseudo images and labels")
        return None, None, None
    if images is None or labels is None:
        raise DataError("pseudo_labels" if labels is None else "pseudo_images", "pseudo images and labels go together")
    images, labels = _check_pair("pseudo", images, labels)
    if images.shape[1:] != tuple(shape):
        raise DataError("pseudo_images", f"size {images.shape[1:]} differs from the exemplars' {tuple(shape)}")
    _check_label_range("pseudo_labels", labels, num_classes)
    w = np.ones(len(images), np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    if w.shape != (len(images),):
        raise DataError("pseudo_weights", f"expected shape ({len(images)},), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise DataError("pseudo_weights", "weights must be finite and >= 0")
    keep = w > 0
    if not keep.any():
        return None, None, None
    return images[keep], labels[keep], w[keep]
