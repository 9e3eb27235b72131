"""Training one round's models: the segmenter (warm-started) and, when enabled, the calibrator."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import torch

from caudo_ray.calibration.training import train_calibrator
from caudo_ray.config import RunConfig
from caudo_ray.data import LabelledCases
from caudo_ray.labelling.reliability import ShapePrior
from caudo_ray.metrics import dice_per_case, segmentation_metrics
from caudo_ray.networks.bundle import RoundModels, feature_channels_of
from caudo_ray.networks.calibrator import Calibrator
from caudo_ray.networks.device import resolve_device
from caudo_ray.networks.segmenter import build_segmenter, predict, predict_tensor
from caudo_ray.training.hooks import NO_HOOKS, TrainingHooks
from caudo_ray.training.inputs import RoundInputs
from caudo_ray.training.segmenter import train_segmenter
from caudo_ray.transforms.augment import augment_views

PRIOR_VIEWS = 64  # augmented exemplar views the shape prior is learnt from
# Augmented exemplar views every round's segmenter is scored on, drawn with one seed for all rounds (a round's
# training views come from its own seed): how well a round still segments the only labelled images it has.
EXEMPLAR_CHECK_VIEWS = 64
EXEMPLAR_CHECK_SEED = 104729


def train_round_models(
    cfg: RunConfig,
    r: int,
    inputs: RoundInputs,
    *,
    num_classes: int,
    previous: RoundModels | None = None,
    val: LabelledCases | None = None,
    device: torch.device | None = None,
    hooks: TrainingHooks = NO_HOOKS,
) -> RoundModels | None:
    """Train the segmenter (warm-started from ``previous``) and, when enabled, the calibrator for round ``r``.

    Round 0 learns from the exemplar views; later rounds add the previous round's selected calibrated labels, each
    weighted by its reliability; with ``consistency.enabled`` every round (from round 1 when
    ``consistency.anchored``) also learns from the whole pool (``inputs.pool_images``) by online weak-to-strong
    consistency.

    Data-parallel training (Ray Train) passes ``hooks.wrap_model`` (e.g. ``ray.train.torch.prepare_model``) and
    this process's ``hooks.rank``: each rank draws its own batches and DDP averages the gradients, so the segmenter
    sees ``world_size`` times the batch per iteration. The calibrator then trains on rank 0 alone, which returns
    the models; other ranks return None.

    With ``hooks.checkpoint``, the training state is saved every ``hooks.every`` iterations of each phase and
    training starts from the saved state when there is one; on CPU the result equals uninterrupted training. The
    caller deletes the checkpoint once the returned models are saved.

    Args:
        cfg: the run config.
        r: the round (its seed is derived from ``cfg.seed`` and ``r``).
        inputs: what the round trains on.
        num_classes: classes, background included.
        previous: the previous round's models, to warm-start from.
        val: validation cases, scored into ``RoundModels.val_metrics`` (:func:`evaluate`).
        device: where to train; default from ``cfg.device``.
        hooks: checkpoints, progress, data-parallel wrapping.
    """
    device = device or resolve_device(cfg.device)
    t0 = time.perf_counter()
    seed = cfg.seed * 1000 + r
    # Seeded initialisation: the same round gives the same weights in any process (local loop, trainer actor).
    net = build_segmenter(cfg.segmenter, num_classes, seed=seed)
    if previous is not None:
        net.load_state_dict(previous.segmenter)
        iterations = cfg.segmenter.finetune_iterations
    else:
        iterations = cfg.segmenter.iterations
    net.to(device)
    state = hooks.resume()
    if state is not None:
        net.load_state_dict(state["segmenter"])
    done = state is not None and state["phase"] != "segmenter"
    if not done and (state is None or state["iteration"] < iterations):
        train_segmenter(
            hooks.wrap_model(net) if hooks.wrap_model is not None else net,
            inputs,
            iterations=iterations,
            cfg=cfg.segmenter,
            seed=seed + 7919 * hooks.rank,
            device=device,
            hooks=hooks,
            resume=state,
            consistency=cfg.consistency.in_round(r) if cfg.consistency.online_in_round(r) else None,
        )
    if hooks.rank != 0:
        return None
    net.eval()
    feature_channels = feature_channels_of(net, cfg.data.working_size, device)

    calibrator_state = None
    calibrator_s = 0.0
    warm = previous is not None and previous.calibrator is not None
    c = cfg.calibrator
    if c.enabled and warm and c.denoiser_finetune_iterations == 0:
        # The round-0 calibrator serves every round: it keeps correcting the warm-started segmenters' labels
        # (HC18, round 1: +3.0 Dice points as it is, +2.3 fine-tuned on exemplar views, -3.0 fine-tuned with
        # the selected pseudo labels, whose own errors it then learns to reproduce).
        calibrator_state = previous.calibrator
    elif c.enabled:
        tc = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            calib = Calibrator.from_config(c, num_classes, feature_channels)
        if warm:
            calib.load_state_dict(previous.calibrator)
        calib.to(device)
        train_calibrator(
            calib,
            lambda x: predict_tensor(net, x),
            inputs if c.pseudo_pairs else inputs.exemplars_only(),
            cfg=c,
            seg_cfg=cfg.segmenter,
            seed=seed,
            device=device,
            hooks=dataclasses.replace(hooks, carry={"segmenter": net.state_dict()}),
            resume=state if done else None,
            warm_start=warm,
        )
        calibrator_state = {k: v.detach().cpu() for k, v in calib.state_dict().items()}
        calibrator_s = time.perf_counter() - tc

    val_metrics: dict[str, Any] = {}
    if val is not None and len(val):
        val_metrics = evaluate(net, val, num_classes, device=device)
    check_images, check_labels = exemplar_check_views(cfg, *inputs.first_exemplars())
    # The shape prior of the reliability score: the exemplars' labels over the views the segmenter trained on.
    _, views = augment_views(inputs.exemplar_images, inputs.exemplar_labels, PRIOR_VIEWS, cfg=cfg.segmenter, rng_seed=seed)
    return RoundModels(
        round=r,
        num_classes=num_classes,
        feature_channels=feature_channels,
        segmenter={k: v.detach().cpu() for k, v in net.state_dict().items()},
        calibrator=calibrator_state,
        val_metrics=val_metrics,
        exemplar_metrics=exemplar_view_dice(net, check_images, check_labels, num_classes, device=device),
        train_s=time.perf_counter() - t0,
        calibrator_train_s=calibrator_s,
        shape_prior=ShapePrior.from_labels(views, num_classes).to_dict(),
    )


def exemplar_view_dice(
    net: torch.nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int, *, device: torch.device | None = None
) -> dict[str, float]:
    """Mean Dice of a segmenter over augmented exemplar views, overall (``dice``) and per foreground class
    (``dice_class<c>``; a class absent from a view and its prediction counts 1, so a view without it neither
    helps nor hurts)."""
    return {k: float(v.mean()) for k, v in exemplar_view_scores(net, images, labels, num_classes, device=device).items()}


def exemplar_view_scores(
    net: torch.nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int, *, device: torch.device | None = None
) -> dict[str, np.ndarray]:
    """:func:`exemplar_view_dice` view by view: one Dice per view under each key, for paired comparisons."""
    device = device or next(net.parameters()).device
    pred = predict(net, images, device=str(device), return_features=False).probs.argmax(1).astype(np.uint8)
    out = {"dice": dice_per_case(pred, labels, num_classes)}
    for c in range(1, num_classes):
        out[f"dice_class{c}"] = dice_per_case((pred == c).astype(np.uint8), (labels == c).astype(np.uint8), 2)
    return out


def exemplar_check_views(cfg: RunConfig, images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The augmented views of the run's first exemplars that every segmenter of the run is read on (the guard's)."""
    return augment_views(images, labels, EXEMPLAR_CHECK_VIEWS, cfg=cfg.segmenter, rng_seed=cfg.seed * 1000 + EXEMPLAR_CHECK_SEED)


def evaluate(net: torch.nn.Module, cases: LabelledCases, num_classes: int, *, device: torch.device | None = None) -> dict[str, Any]:
    """Dice and HD95 of a segmenter on labelled cases (:func:`caudo_ray.metrics.segmentation_metrics`).

    Scored at the working size; HD95 is in millimetres (``hd95_mm``) where every case has a spacing, measured
    with the working-size spacing (:class:`~caudo_ray.data.LabelledCases`), else in working-size pixels
    (``hd95_px``).
    """
    device = device or next(net.parameters()).device
    pred = predict(net, cases.images, device=str(device), return_features=False).probs.argmax(1)
    return segmentation_metrics(pred, cases.labels, num_classes, spacing=cases.spacing)
