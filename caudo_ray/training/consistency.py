"""Online weak-to-strong consistency on the unlabelled pool, UniMatch's recipe (Yang et al., CVPR 2023).

:func:`~caudo_ray.training.segmenter.train_segmenter` adds it to its labelled batches when given a
``ConsistencyConfig``: that is the ``consistency`` method (the semi-supervised peer caudo-ray's rounds must beat,
with the same segmenter, labelled set, working size and iterations as the other methods, trained with
``ConsistencyConfig.peer()``), and caudo-ray's rounds from round 1 train with it, guarded (below), by default.
Each iteration

1. draws the labelled batch as training without the pool does (exemplar views, and pseudo labels when a round
   has them);
2. draws ``cfg.unlabelled_batch_size`` pool images and as many more to CutMix from, each given a *weak* view
   (geometry only: flip, small rotation, zoom and shift). The model itself, without gradients and in eval mode,
   labels the weak views: pseudo label = argmax, confidence = max softmax; pixels under ``cfg.threshold`` (or,
   with ``cfg.class_thresholds``, under their class's threshold, :func:`class_thresholds`) teach nothing;
3. makes two *strong* views of every weak view by intensity changes only (gamma, bias field, blur, shift, noise,
   a random intensity curve), so the weak view's pseudo label stays pixel-aligned with them, and pastes into
   each, with probability ``cfg.cutmix_prob``, a random box of the second batch's strong view; inside the box
   the target is the second image's pseudo label and confidence;
4. runs the weak views once more with ``Dropout2d(cfg.feature_dropout)`` on the encoder features (every skip
   connection and the bottleneck), supervised by their own pseudo labels;
5. minimises ``(L_x + r * (strong_weight * (L_s1 + L_s2) / 2 + feature_weight * L_fp)) / 2``: with the defaults
   (0.5, 0.5) these are UniMatch's medical weights 0.25, 0.25 and 0.5; ``r`` is 1 unless ``cfg.rampup`` > 0
   (:func:`rampup_weight`).

Loss and mask choices, and where we depart from UniMatch (and why):

* ``L_x`` is the project's :func:`~caudo_ray.training.losses.weighted_dice_ce` (pixel-mean CE plus foreground
  soft Dice over the batch), the very loss exemplar-only training minimises, so the two methods differ only by the
  unlabelled terms. UniMatch uses ``(CE + Dice) / 2`` with background in the Dice.
* The unlabelled terms are masked CE + masked soft Dice; UniMatch's medical script uses masked Dice alone (its
  natural-image script masked CE alone). CE gives every confident pixel a gradient of its own, Dice keeps small
  targets from being swamped by confident background; together they mirror ``L_x``.
* Masked CE is summed over the confident pixels and divided by *all* pixels, as UniMatch's CE does: the term's
  weight then follows the share of confident pixels, so while the teacher is unsure a handful of confident pixels
  does not get the full weight (nor a division by almost nothing).
* Masked Dice is soft Dice over the foreground classes (as the project's DiceLoss: linear denominator, smoothing
  1e-5) computed over the confident pixels of the whole unlabelled batch, like UniMatch's ignore-masked Dice
  (which sums over the batch too, so an image with no confident foreground gives no degenerate per-image Dice).
* The teacher labels the weak views in eval mode in a separate no-grad pass; UniMatch takes the main batch's
  labels from its training forward pass. MONAI's UNet here has no dropout and instance norm without running
  statistics, so both give the same numbers; the separate pass just needs no graph.
* Weak views keep the pool's ultrasound geometry (no 90-degree rotations or vertical flips: the fan has a top),
  so UniMatch's random rot90/flip or +-20 degree rotation becomes a flip, +-``cfg.weak_rotate_deg``, a zoom over
  ``cfg.weak_zoom`` and a shift of up to 10% of each side, drawn as for the exemplar views
  (:func:`~caudo_ray.transforms.augment.spatial_views`).
* Strong views use the exemplar views' intensity ranges (:func:`~caudo_ray.transforms.augment.intensity_views`)
  with UniMatch's probabilities (colour jitter 0.8 -> gamma / shift / noise 0.8, blur 0.5), not ColorJitter:
  the images are grey levels, and this is the perturbation the project's segmenter already knows.
* CutMix boxes cover 2-40% of the frame as UniMatch's; their aspect ratio is drawn log-uniformly in
  [0.3, 1/0.3] (UniMatch: uniformly, which favours tall boxes) and their corner uniformly among the positions
  where the box fits (UniMatch redraws until one fits).
* Pool images are drawn at random with replacement across iterations (UniMatch walks epochs), and the
  optimiser is Adam with the project's cosine learning rate (UniMatch: SGD with poly decay), so every method
  of the project trains with the same optimiser over the same number of iterations.
* Feature dropout masks are drawn from a seeded generator rather than ``nn.Dropout2d``'s global RNG, so runs
  are reproducible and resumable.
* An optional ramp-up of the pool terms (``cfg.rampup``, off by default as in UniMatch), because at the
  project's short budgets an untrained teacher can lock the network into predicting background on the pool.
* Three guards, on in caudo's rounds and off in the peer (docs/method.md measures them): per-class thresholds
  (``cfg.class_thresholds``, :func:`class_thresholds`); in caudo's rounds, anchoring (``cfg.anchored``): a
  pixel teaches only where the teacher agrees with the previous round's calibrated label of the image; and
  class balance (``cfg.class_balance``, :func:`class_balance_weights`): the CE's weight is shared among classes
  as the anchor labels share the pixels, so the confident background cannot outvote a thin class.

Measured on phantoms (48x48, network channels 8-64, four labelled frames, 40 pool frames, 500 iterations, test Dice
on 24 frames against exemplar-only training from the same start; tests/training/test_consistency.py), six seeds:
+0.03, +0.01, +0.05, +0.01, -0.04, -0.14. Under the project's earlier per-sample exemplar loss it was no
different: one labelled frame gave a coin toss (800 iterations: +0.10, -0.21, +0.09, +0.03), four labelled frames at
800 iterations +0.09, +0.12, -0.01, -0.03. At these budgets it is a peer that sometimes wins by a few points and
sometimes loses, not a sure win; the teacher's early confident errors, reinforced, are what it loses to.

Per iteration this costs about four times an exemplar-only step (the labelled batch, two strong views and the
perturbed weak view with gradients, two weak batches without).

All randomness of iteration ``i`` comes from ``np.random.SeedSequence([seed, i, 1])`` (the labelled batch keeps
``[seed, i]``) and nothing reads the global RNGs, so on CPU the same inputs and seed give the same weights, and a
run resumed from a checkpoint continues exactly as the uninterrupted run would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from monai.networks.layers import SkipConnection
from torch import nn

from caudo_ray.arrays import check_images, check_label_range
from caudo_ray.config import ConsistencyConfig, SegmenterConfig
from caudo_ray.errors import DataError
from caudo_ray.networks.segmenter import predict_tensor
from caudo_ray.training.losses import masked_dice_ce
from caudo_ray.transforms.augment import (
    AugmentProfile,
    exemplar_profile,
    intensity_views,
    spatial_views,
)

_WEAK_TRANSLATE = 0.1  # weak views shift by up to this fraction of each side
_CUTMIX_AREA = (0.02, 0.4)  # box area as a fraction of the frame, UniMatch's range
_CUTMIX_RATIO = (0.3, 1 / 0.3)  # box height / width
# A class with a handful of teaching pixels would otherwise have their CE multiplied by hundreds: one noisy
# batch would then steer the whole step.
_MAX_CLASS_WEIGHT = 10.0


def weak_profile(cfg: ConsistencyConfig) -> AugmentProfile:
    """Weak views: flip, small rotation, zoom and shift; no elastic field and no intensity change."""
    return AugmentProfile(
        rotate_deg=float(cfg.weak_rotate_deg),
        zoom=(float(cfg.weak_zoom[0]), float(cfg.weak_zoom[1])),
        area_limits=None,
        translate=_WEAK_TRANSLATE,
        elastic_prob=0.0,
        elastic_px=0.0,
        gamma=(1.0, 1.0),
        intensity_prob=0.0,
        noise_std=0.0,
        smooth_prob=0.0,
        bias_prob=0.0,
        curve_prob=0.0,
    )


def strong_profile(seg_cfg: SegmenterConfig) -> AugmentProfile:
    """Strong views: the exemplar views' intensity ranges, as often as UniMatch jitters (0.8) and blurs (0.5)."""
    return replace(exemplar_profile(seg_cfg), intensity_prob=0.8, smooth_prob=0.5)


@dataclass
class UnlabelledViews:
    """One iteration's unlabelled batch: weak views, their pseudo labels, and the two CutMixed strong views.

    Attributes:
        weak: (U, H, W) float32 weak views of the batch.
        weak_target: (U, H, W) int64 tensor, the teacher's argmax on ``weak``.
        weak_confidence: (U, H, W) float32 tensor, its max softmax.
        mix_weak: (U, H, W) float32 weak views of the second batch, the CutMix sources.
        mix_target, mix_confidence: the teacher's labels of ``mix_weak``.
        strong: the two strong views after CutMix, each (U, H, W) float32.
        strong_unmixed: the two strong views of ``weak`` before CutMix.
        mix_strong: the two strong views of ``mix_weak`` pasted from.
        targets, confidences: the pseudo labels and confidences of ``strong`` (CutMixed like the images).
        boxes: the two (U, H, W) bool CutMix boxes (all False where a view is not mixed).
        thresholds: (C,) float32 tensor, the confidence each class's pseudo labels need to teach
            (:func:`class_thresholds`).
        class_weights: (C,) float32 weights of each class's pixels in the pool CE (:func:`class_balance_weights`),
            or None without ``cfg.class_balance``.
    """

    weak: np.ndarray
    weak_target: torch.Tensor
    weak_confidence: torch.Tensor
    mix_weak: np.ndarray
    mix_target: torch.Tensor
    mix_confidence: torch.Tensor
    strong: tuple[np.ndarray, np.ndarray]
    strong_unmixed: tuple[np.ndarray, np.ndarray]
    mix_strong: tuple[np.ndarray, np.ndarray]
    targets: tuple[torch.Tensor, torch.Tensor]
    confidences: tuple[torch.Tensor, torch.Tensor]
    boxes: tuple[np.ndarray, np.ndarray]
    thresholds: torch.Tensor
    class_weights: torch.Tensor | None = None


def cutmix_boxes(n: int, shape: tuple[int, int], prob: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` boolean (H, W) boxes: with probability ``prob`` a rectangle over 2-40% of the frame, else empty."""
    h, w = int(shape[0]), int(shape[1])
    use = rng.random(n) < prob
    area = rng.uniform(*_CUTMIX_AREA, n) * h * w
    ratio = np.exp(rng.uniform(np.log(_CUTMIX_RATIO[0]), np.log(_CUTMIX_RATIO[1]), n))
    bh = np.clip(np.rint(np.sqrt(area * ratio)), 1, h).astype(np.int64)
    bw = np.clip(np.rint(np.sqrt(area / ratio)), 1, w).astype(np.int64)
    y0 = rng.integers(0, h - bh + 1)
    x0 = rng.integers(0, w - bw + 1)
    rows, cols = np.arange(h), np.arange(w)
    inside_r = (rows[None] >= y0[:, None]) & (rows[None] < (y0 + bh)[:, None])  # (n, h)
    inside_c = (cols[None] >= x0[:, None]) & (cols[None] < (x0 + bw)[:, None])  # (n, w)
    return inside_r[:, :, None] & inside_c[:, None, :] & use[:, None, None]


def cutmix(box: np.ndarray, *pairs: tuple[Any, Any]) -> list[Any]:
    """Paste the box region of each pair's second array into its first: ``where(box, mixed_in, base)``.

    The same box serves the image and its targets, so the pasted pixels and their labels come from the same
    source image. Arrays are numpy or torch (a torch pair gets the box on its device).

    Args:
        box: (U, H, W) bool.
        pairs: ``(base, mixed_in)`` arrays of shape (U, H, W) each.
    """
    out = []
    for base, mixed_in in pairs:
        if isinstance(base, torch.Tensor):
            out.append(torch.where(torch.from_numpy(box).to(base.device), mixed_in, base))
        else:
            out.append(np.where(box, mixed_in, base))
    return out


def class_thresholds(target: torch.Tensor, confidence: torch.Tensor, cfg: ConsistencyConfig, num_classes: int) -> torch.Tensor:
    """The confidence a pixel labelled with each class needs to teach: ``cfg.threshold``, or scaled per class.

    With ``cfg.class_thresholds`` the threshold of class ``c`` is ``threshold * m_c / max_k m_k``, where ``m_c``
    is the mean confidence of the pixels the teacher labels ``c`` (FreeMatch's self-adaptive local thresholds,
    Wang et al., ICLR 2023, measured per class on the iteration's weak views instead of as a running average over
    whole-image class probabilities: in segmentation the class shares are the anatomy's, not the teacher's
    bias). A class no pixel is labelled with keeps ``threshold``.

    Args:
        target: the teacher's argmax labels, any shape.
        confidence: its max softmax, same shape.
        cfg: ``threshold`` and ``class_thresholds``.
        num_classes: C, background included.

    Returns:
        (C,) float32 tensor on ``confidence``'s device.
    """
    tau = torch.full((num_classes,), float(cfg.threshold), dtype=torch.float32, device=confidence.device)
    if not cfg.class_thresholds:
        return tau
    flat = target.flatten()
    counts = torch.bincount(flat, minlength=num_classes)
    sums = torch.bincount(flat, weights=confidence.flatten().to(torch.float32), minlength=num_classes)
    present = counts > 0
    mean = sums[present] / counts[present]
    tau[present] = float(cfg.threshold) * (mean / mean.max()).to(torch.float32)
    return tau


def class_balance_weights(kept_target: torch.Tensor, reference: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-class CE weights that give each class the share of the teaching weight it has in ``reference``.

    ``w_c = (r_c / R) / (k_c / K)``, capped at ``_MAX_CLASS_WEIGHT``: ``r_c`` counts the reference labels' pixels of
    class ``c`` and ``k_c`` the teaching pixels labelled ``c``; ``R`` and ``K`` sum them over the classes that
    have a teaching pixel, so the weights only redistribute the CE among those classes (with no cap hit, the
    weighted teaching pixels add up to their unweighted count). Balancing the loss by a reference class
    distribution is the idea of distribution alignment in semi-supervised learning (Berthelot et al.,
    ReMixMatch, ICLR 2020), applied here to the pixels the confidence mask lets through. A class with no
    teaching pixel keeps weight 1 (it weighs nothing).

    Args:
        kept_target: the labels of the teaching pixels, any shape (flattened).
        reference: the labels whose class shares the CE should follow, any shape.
        num_classes: C, background included.

    Returns:
        (C,) float32 tensor on ``kept_target``'s device.
    """
    kept = torch.bincount(kept_target.flatten(), minlength=num_classes).to(torch.float32)
    reference = reference.flatten().to(kept_target.device).long()
    ref = torch.bincount(reference[reference < num_classes], minlength=num_classes).to(torch.float32)  # IGNORE left out
    weights = torch.ones(num_classes, dtype=torch.float32, device=kept.device)
    taught = kept > 0
    if ref[taught].sum() > 0:
        share = ref[taught] / ref[taught].sum()
        weights[taught] = (share / (kept[taught] / kept[taught].sum())).clamp(max=_MAX_CLASS_WEIGHT)
    return weights


def consistency_views(
    model: nn.Module,
    pool_images: np.ndarray,
    *,
    cfg: ConsistencyConfig,
    seg_cfg: SegmenterConfig,
    seeds: tuple[int, int, int, int, int],
    device: str | torch.device = "cpu",
    anchor_labels: np.ndarray | None = None,
) -> UnlabelledViews:
    """Draw one iteration's unlabelled batch and label it with ``model`` (steps 2 and 3 of the module doc).

    Args:
        model: the segmenter being trained; it labels the weak views without gradients, in eval mode (its mode
            is restored).
        pool_images: (N, H, W) float32 unlabelled images in [0, 1], already checked.
        cfg: batch size, CutMix probability and weak-view ranges.
        seg_cfg: the strong views' intensity ranges (``exemplar_profile``).
        seeds: seeds of the pool draw, the weak views, the two strong views and the CutMix boxes.
        device: where the teacher runs and its labels live.
        anchor_labels: (N, H, W) uint8 labels of ``pool_images`` (anchored consistency): warped with the weak
            views, and a pixel where the teacher's label differs, or the anchor is ``IGNORE``, gets confidence 0, so
            it teaches nothing. With ``cfg.class_balance`` they are also the reference class shares (else the
            teacher's argmax is).
    """
    sample_seed, weak_seed, strong1_seed, strong2_seed, box_seed = (int(s) for s in seeds)
    u, n = cfg.unlabelled_batch_size, len(pool_images)
    rng = np.random.default_rng(sample_seed)
    idx = rng.choice(n, u, replace=n < u)
    mix_idx = rng.choice(n, u, replace=n < u)  # a second, independent batch to paste from

    both, anchor = spatial_views(pool_images, np.concatenate([idx, mix_idx]), weak_profile(cfg), weak_seed, anchor_labels)
    probs, _ = predict_tensor(model, torch.from_numpy(both).unsqueeze(1).to(device))
    confidence, target = probs.max(dim=1)
    thresholds = class_thresholds(target, confidence, cfg, probs.shape[1])
    reference = target
    if anchor is not None:
        reference = torch.from_numpy(anchor).to(target.device).long()
        confidence = torch.where(target == reference, confidence, torch.zeros_like(confidence))
    class_weights = None
    if cfg.class_balance:
        class_weights = class_balance_weights(target[confidence >= thresholds[target]], reference, probs.shape[1])

    # One intensity draw per image and per strong view; the second batch's strong views are what gets pasted,
    # as UniMatch pastes img_u_s1_mix into img_u_s1.
    profile = strong_profile(seg_cfg)
    s1, s2 = intensity_views(both, profile, strong1_seed), intensity_views(both, profile, strong2_seed)
    box_rng = np.random.default_rng(box_seed)
    boxes = cutmix_boxes(u, both.shape[1:], cfg.cutmix_prob, box_rng), cutmix_boxes(u, both.shape[1:], cfg.cutmix_prob, box_rng)

    strong, targets, confidences = [], [], []
    for s, box in zip((s1, s2), boxes):
        img, tgt, conf = cutmix(box, (s[:u], s[u:]), (target[:u], target[u:]), (confidence[:u], confidence[u:]))
        strong.append(img)
        targets.append(tgt)
        confidences.append(conf)
    return UnlabelledViews(
        weak=both[:u],
        weak_target=target[:u],
        weak_confidence=confidence[:u],
        mix_weak=both[u:],
        mix_target=target[u:],
        mix_confidence=confidence[u:],
        strong=(strong[0], strong[1]),
        strong_unmixed=(s1[:u], s2[:u]),
        mix_strong=(s1[u:], s2[u:]),
        targets=(targets[0], targets[1]),
        confidences=(confidences[0], confidences[1]),
        boxes=boxes,
        thresholds=thresholds,
        class_weights=class_weights,
    )


def rampup_weight(iteration: int, iterations: int, rampup: float) -> float:
    """Weight of the pool terms at ``iteration``: ``exp(-5 (1 - t)^2)`` over the first ``rampup`` of training, then 1.

    The sigmoid-shaped ramp-up of Laine & Aila and of the SSL4MIS code UniMatch's medical script builds on;
    ``rampup`` 0 (the default, as UniMatch) weights the pool terms fully from the first iteration.
    """
    span = rampup * iterations
    if span <= 0 or iteration >= span:
        return 1.0
    return math.exp(-5.0 * (1.0 - iteration / span) ** 2)


def encoder_taps(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """The MONAI UNet's skip connections (outer to inner) and its bottom block: where the encoder's features leave.

    ``UNet.model`` is ``Sequential(down_0, SkipConnection(inner), up_0)`` and each inner level repeats that shape
    down to the bottom block. A ``SkipConnection`` returns ``cat(x, inner(x))``: its first ``x.shape[1]``
    channels are the encoder feature that skips to the decoder.
    """
    net = getattr(model, "module", model)
    skips: list[nn.Module] = []
    node = net.model[1]
    while True:
        if not isinstance(node, SkipConnection):
            raise TypeError(f"expected a MONAI UNet from build_segmenter, found {type(node).__name__} where a SkipConnection goes")
        skips.append(node)
        sub = node.submodule
        if isinstance(sub, nn.Sequential) and len(sub) == 3 and isinstance(sub[1], SkipConnection):
            node = sub[1]
        else:
            return skips, sub


@contextmanager
def feature_perturbation(model: nn.Module, p: float, tail: int, generator: torch.Generator) -> Iterator[None]:
    """While active, ``Dropout2d(p)`` acts on the encoder features of the last ``tail`` samples of every batch.

    The features are every skip connection's encoder half and the bottleneck, as UniMatch drops all of its
    encoder's outputs; the encoder itself still computes from clean features, only what reaches the decoder is
    perturbed. Masks come from ``generator`` (drawn on the CPU, in forward order), not the global RNG. The other
    samples of the batch pass untouched, so one forward pass serves the clean and the perturbed branches.
    """

    def masks(out: torch.Tensor, channels: int) -> torch.Tensor:
        keep = (torch.rand((tail, channels, 1, 1), generator=generator) >= p).to(out.dtype) / (1.0 - p)
        mask = torch.ones((out.shape[0], out.shape[1], 1, 1), dtype=out.dtype)
        mask[out.shape[0] - tail :, :channels] = keep
        return mask.to(out.device)

    def on_skip(_module, inputs, out):
        return out * masks(out, inputs[0].shape[1])

    def on_bottom(_module, _inputs, out):
        return out * masks(out, out.shape[1])

    skips, bottom = encoder_taps(model)
    handles = [m.register_forward_hook(on_skip) for m in skips] + [bottom.register_forward_hook(on_bottom)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def check_pool(pool_images: np.ndarray | None, size: tuple[int, ...]) -> np.ndarray:
    """The pool images consistency training learns from, checked: (N, H, W) float at ``size``, N > 0, finite."""
    if pool_images is None:
        raise DataError("pool_images", "consistency training needs the pool's images (RoundInputs.pool_images)")
    pool = check_images("pool_images", pool_images)
    if len(pool) == 0:
        raise DataError("pool_images", "no unlabelled images")
    if pool.shape[1:] != tuple(size):
        raise DataError("pool_images", f"size {pool.shape[1:]} differs from the exemplars' {tuple(size)}")
    if not np.all(np.isfinite(pool)):
        raise DataError("pool_images", "holds NaN or infinite values")
    return pool


def check_anchor(pool_labels: np.ndarray | None, pool_shape: tuple[int, ...], num_classes: int) -> np.ndarray:
    """The labels anchored consistency teaches within, checked: one (H, W) label per pool image, values < C or
    ``IGNORE`` (a pixel that teaches nothing)."""
    if pool_labels is None:
        raise DataError(
            "pool_labels", "anchored consistency needs the previous round's calibrated label of every pool image (caudo's rounds from round 1)"
        )
    labels = np.asarray(pool_labels)
    if labels.shape != tuple(pool_shape):
        raise DataError("pool_labels", f"shape {labels.shape} differs from the pool images' {tuple(pool_shape)}")
    check_label_range("pool_labels", labels, num_classes, allow_ignore=True)
    return labels.astype(np.uint8, copy=False)


def unlabelled_loss(
    pred_s1: torch.Tensor, pred_s2: torch.Tensor, pred_fp: torch.Tensor, views: UnlabelledViews, cfg: ConsistencyConfig
) -> torch.Tensor:
    """``strong_weight * mean(L_s1, L_s2) + feature_weight * L_fp``: the pool's share of an iteration's loss.

    Args:
        pred_s1, pred_s2: logits of the two CutMixed strong views.
        pred_fp: logits of the weak views through the perturbed encoder features.
        views: the iteration's unlabelled batch with the teacher's labels and confidences.
        cfg: the weights.
    """
    tau = views.thresholds
    w = views.class_weights
    loss_s = sum(
        masked_dice_ce(pred, target, confidence >= tau[target], w)
        for pred, target, confidence in zip((pred_s1, pred_s2), views.targets, views.confidences)
    ) / 2.0
    loss_fp = masked_dice_ce(pred_fp, views.weak_target, views.weak_confidence >= tau[views.weak_target], w)
    return cfg.strong_weight * loss_s + cfg.feature_weight * loss_fp
