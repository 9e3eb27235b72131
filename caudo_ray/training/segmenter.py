"""Training the segmenter on exemplar views and reliability-weighted pseudo labels.

S is trained in round 0 on strongly augmented views of the exemplar(s) and, from round 1 on, warm-started on a
mix of exemplar views and selected calibrated pseudo labels weighted by their reliability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from caudo_ray.arrays import check_label_range, check_pair
from caudo_ray.config import ConsistencyConfig, SegmenterConfig
from caudo_ray.errors import DataError
from caudo_ray.training.consistency import (
    check_anchor,
    check_pool,
    consistency_views,
    feature_perturbation,
    rampup_weight,
    unlabelled_loss,
)
from caudo_ray.training.hooks import NO_HOOKS, TrainingHooks
from caudo_ray.training.inputs import RoundInputs
from caudo_ray.training.losses import weighted_dice_ce
from caudo_ray.transforms.augment import augment, cycle, exemplar_profile, pseudo_profile


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


def _cosine_lr(base: float, iteration: int, total: int) -> float:
    # Decays to 5% rather than 0 so a warm-started round still moves in its last iterations.
    progress = iteration / max(total, 1)
    return base * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_segmenter(
    model: nn.Module,
    inputs: RoundInputs,
    *,
    iterations: int,
    cfg: SegmenterConfig,
    seed: int,
    device: str | torch.device = "cpu",
    hooks: TrainingHooks = NO_HOOKS,
    resume: dict[str, Any] | None = None,
    consistency: ConsistencyConfig | None = None,
) -> TrainResult:
    """Train (or warm-start) the segmenter on exemplar views, weighted pseudo labels and, optionally, the pool.

    Every batch holds ``cfg.batch_size`` samples. Without pseudo labels all are strongly augmented exemplar
    views; with them, ``max(1, round(batch_size * cfg.exemplar_fraction))`` are exemplar views and the rest are
    pseudo-labelled cases drawn uniformly and augmented almost as strongly (``pseudo_profile``). The loss is
    DiceCE per sample times its weight (``cfg.exemplar_weight`` for exemplar views, the reliability for a pseudo
    label) in :func:`weighted_dice_ce`. Pseudo cases of weight 0 are dropped first, so they change nothing.

    With ``consistency``, every iteration also draws ``consistency.unlabelled_batch_size`` pool images and learns
    from them by weak-to-strong consistency (:mod:`caudo_ray.training.consistency`, UniMatch's recipe): the loss is
    then ``(L_labelled + strong_weight * L_strong + feature_weight * L_feature) / 2``.

    Adam with a cosine learning rate over ``iterations``. All randomness of iteration ``i`` is derived from
    ``(seed, i)`` and nothing reads the global RNGs, so on CPU the same inputs and seed give the same weights, and
    a run resumed from a checkpoint at iteration ``k`` continues exactly as the uninterrupted run would.

    Args:
        model: a UNet from :func:`~caudo_ray.networks.segmenter.build_segmenter` (optionally wrapped for DDP);
            pass an already trained one to warm-start. Trained in place.
        inputs: exemplars and, optionally, pseudo labels with their weights.
        iterations: total iterations, counting from 0 (a resumed run passes the same total).
        cfg: segmenter config (batch size, learning rate, scale range, exemplar weight and fraction).
        seed: seed of all sampling and augmentation.
        device: torch device to train on.
        hooks: progress bar and checkpoints; a checkpoint state is ``{"phase": "segmenter", "iteration": done,
            "segmenter": ..., "optimizer": ...}`` (live tensors: serialise them in ``hooks.save``).
        resume: such a state; training continues from its iteration and optimizer state.
        consistency: online consistency on ``inputs.pool_images``; None trains on the labelled cases alone.

    Returns:
        A :class:`TrainResult`.

    Raises:
        DataError: on inconsistent shapes, label values outside the model's classes, or bad weights.
    """
    ex_img, ex_lab = check_pair("exemplar", inputs.exemplar_images, inputs.exemplar_labels)
    num_classes = getattr(model, "module", model).out_channels
    check_label_range("exemplar_labels", ex_lab, num_classes)
    ps_img, ps_lab, ps_w = _pseudo_set(inputs.pseudo_images, inputs.pseudo_labels, inputs.pseudo_weights, ex_img.shape[1:], num_classes)
    pool = anchor = None
    if consistency is not None:
        pool = check_pool(inputs.pool_images, ex_img.shape[1:])
        if consistency.anchored:
            anchor = check_anchor(inputs.pool_labels, pool.shape, num_classes)
    start_iteration = int(resume["iteration"]) if resume is not None else 0
    if not 0 <= start_iteration <= iterations:
        raise ValueError(f"resume iteration must be in [0, iterations={iterations}], got {start_iteration}")

    n_pseudo = 0 if ps_img is None else cfg.batch_size - max(1, round(cfg.batch_size * cfg.exemplar_fraction))
    n_exemplar = cfg.batch_size - n_pseudo
    strong, pseudo = exemplar_profile(cfg), pseudo_profile(cfg)

    model.to(device)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])

    losses: list[float] = []
    bar = tqdm(range(start_iteration, iterations), desc="segmenter", disable=not hooks.progress, leave=False)
    for it in bar:
        aug_seed, pseudo_seed, sample_seed = np.random.SeedSequence([seed, it]).generate_state(3)
        imgs, labs = augment(ex_img, ex_lab, cycle(len(ex_img), n_exemplar, int(aug_seed)), strong, int(aug_seed))
        weights = np.full(n_exemplar, cfg.exemplar_weight, np.float32)
        if n_pseudo:
            gen = torch.Generator().manual_seed(int(sample_seed))
            idx = torch.randint(len(ps_img), (n_pseudo,), generator=gen).numpy()
            p_imgs, p_labs = augment(ps_img, ps_lab, idx, pseudo, int(pseudo_seed))
            imgs, labs = np.concatenate([imgs, p_imgs]), np.concatenate([labs, p_labs])
            weights = np.concatenate([weights, ps_w[idx]])

        for group in optimizer.param_groups:
            group["lr"] = _cosine_lr(cfg.learning_rate, it, iterations)
        y = torch.from_numpy(labs.astype(np.int64)).to(device)
        w = torch.from_numpy(weights).to(device)
        if pool is None:
            loss = weighted_dice_ce(model(torch.from_numpy(imgs).unsqueeze(1).to(device)), y, w)
        else:
            # A seed stream of its own, so the labelled draws stay those of training without the pool.
            *view_seeds, dropout_seed = (int(v) for v in np.random.SeedSequence([seed, it, 1]).generate_state(6))
            views = consistency_views(
                model, pool, cfg=consistency, seg_cfg=cfg, seeds=tuple(view_seeds), device=device, anchor_labels=anchor
            )
            u = consistency.unlabelled_batch_size
            # One forward pass for every branch: instance norm makes each sample's output independent of the rest
            # of the batch, and the feature dropout touches only the last u samples (the weak views).
            x = torch.from_numpy(np.concatenate([imgs, *views.strong, views.weak])).unsqueeze(1).to(device)
            with feature_perturbation(model, consistency.feature_dropout, u, torch.Generator().manual_seed(dropout_seed)):
                logits = model(x)
            pred_x, pred_s1, pred_s2, pred_fp = logits.split([len(imgs), u, u, u])
            ramp = rampup_weight(it, iterations, consistency.rampup)
            loss = (weighted_dice_ce(pred_x, y, w) + ramp * unlabelled_loss(pred_s1, pred_s2, pred_fp, views, consistency)) / 2.0

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach().cpu()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        hooks.after(it + 1, lambda: {"phase": "segmenter", "iteration": it + 1, "segmenter": model.state_dict(), "optimizer": optimizer.state_dict()}, phase="segmenter", total=iterations)  # noqa: B023 (after() calls it at once)

    return TrainResult(losses=losses, optimizer_state=optimizer.state_dict(), iterations=iterations)


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
    images, labels = check_pair("pseudo", images, labels)
    if images.shape[1:] != tuple(shape):
        raise DataError("pseudo_images", f"size {images.shape[1:]} differs from the exemplars' {tuple(shape)}")
    check_label_range("pseudo_labels", labels, num_classes, allow_ignore=True)
    w = np.ones(len(images), np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
    if w.shape != (len(images),):
        raise DataError("pseudo_weights", f"expected shape ({len(images)},), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise DataError("pseudo_weights", "weights must be finite and >= 0")
    keep = w > 0
    if not keep.any():
        return None, None, None
    return images[keep], labels[keep], w[keep]
