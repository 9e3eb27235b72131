"""Labelling a batch: segmenter inference, calibration and reliability scores, in one process.

:class:`LabelingEngine` holds a round's networks, built once per round, so each calibration worker (or the local
loop) labels batch after batch with them; feature maps never leave the process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from caudo_ray.arrays import class_map
from caudo_ray.calibration.sampling import arbitrate, calibrate, case_weight, gate_calibration, keep_class_presence
from caudo_ray.calibration.schedule import CalibrationSchedule
from caudo_ray.config import RunConfig
from caudo_ray.labelling.reliability import ShapePrior, reliability_scores
from caudo_ray.metrics import dice_per_case
from caudo_ray.networks.bundle import RoundModels, build_models
from caudo_ray.networks.device import resolve_device
from caudo_ray.networks.segmenter import predict_tensor
from caudo_ray.store import NO_TRUTH


@dataclass
class BatchResult:
    """Labels and per-case scores of one batch, plus where its time went."""

    initial: np.ndarray  # (B, H, W) u8
    calibrated: np.ndarray  # (B, H, W) u8, what the round keeps
    scores: dict[str, np.ndarray]  # name -> (B,) f32
    timings: dict[str, float]
    proposed: np.ndarray | None = None  # (B, H, W) u8, the calibrator's label before the rules; None: calibrated


class LabelingEngine:
    """The round's segmenter and calibrator, built once per round, labelling batch after batch.

    Segmenter inference and calibration run in the same process, so feature maps never leave it.
    """

    def __init__(self, cfg: RunConfig, models: RoundModels, device: torch.device | None = None):
        self.cfg = cfg
        self.models = models
        self.device = device or resolve_device(cfg.device)
        self.net, self.calibrator = build_models(cfg, models, self.device)
        self.schedule = CalibrationSchedule(cfg.calibrator.train_timesteps, cfg.calibrator.inference_steps)
        self.prior = ShapePrior.from_dict(models.shape_prior) if models.shape_prior is not None else None

    @torch.no_grad()
    def label_batch(self, images: np.ndarray, truth: np.ndarray | None = None) -> BatchResult:
        """Pseudo-label, calibrate and score a batch of preprocessed images.

        Args:
            images: (B, H, W) float32 in [0, 1].
            truth: optional (B, H, W) uint8 hidden labels, used only to report pseudo-label Dice (NaN where a
                case has none, marked by 255); never seen by the method.
        """
        c = self.cfg.calibrator
        x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1).to(self.device)
        t0 = time.perf_counter()
        probs, feats = predict_tensor(self.net, x)
        flipped, _ = predict_tensor(self.net, x.flip(-1))
        p0 = probs.float().cpu().numpy()  # on a GPU, waits for the segmenter
        pf = flipped.flip(-1).float().cpu().numpy()
        t1 = time.perf_counter()
        score_s = 0.0
        if self.calibrator is not None:
            calibrated = calibrate(
                self.calibrator, self.schedule, x, probs, feats, w=c.guidance_strength, s=c.calibration_strength
            )
            proposed = class_map(calibrated.float().cpu().numpy())
            kept = torch.ones(len(x))
            ts = time.perf_counter()
            before = reliability_scores(p0, p0, pf, self.prior) if c.gate is not None or c.revert_if_less_reliable else None
            score_s = time.perf_counter() - ts
            if c.gate is not None:
                rel_before = torch.from_numpy(before["reliability"])
                calibrated = gate_calibration(probs, calibrated, rel_before, c.gate)
                kept = case_weight(rel_before, c.gate)
            if c.arbitrate:
                calibrated = arbitrate(probs, calibrated, flipped.flip(-1))
            if c.keep_class_presence:
                calibrated = keep_class_presence(probs, calibrated)
            p1 = calibrated.float().cpu().numpy()
        else:
            p1, proposed = p0, None
        t2 = time.perf_counter()
        scores = reliability_scores(p0, p1, pf, self.prior)
        if self.calibrator is not None:
            if c.revert_if_less_reliable:
                p1, scores, reverted = revert_less_reliable(p0, p1, before, scores)
                kept = torch.where(torch.from_numpy(reverted), 0.0, kept)
            scores["accepted"] = kept.numpy().astype(np.float32)
        initial = class_map(p0)
        final = class_map(p1)
        if truth is not None:
            scores["initial_dice"] = _dice_or_nan(initial, truth, self.models.num_classes)
            scores["calibrated_dice"] = _dice_or_nan(final, truth, self.models.num_classes)
        t3 = time.perf_counter()
        timings = {"infer_s": t1 - t0, "ddim_s": t2 - t1 - score_s, "score_s": t3 - t2 + score_s, "n": len(images)}
        return BatchResult(initial, final, scores, timings, proposed)


def revert_less_reliable(
    initial: np.ndarray, calibrated: np.ndarray, initial_scores: dict[str, np.ndarray], calibrated_scores: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """Keep each case's initial label, and its scores, where calibration lowered its reliability.

    Reliability is the judge that ranks and selects the labels, from the segmenter's maps alone; a calibrated
    label it scores lower than the initial one is more likely worse than better (ACDC, where the one-exemplar
    calibrator's prior is often wrong), and one it scores at least as high is kept (HC18, where calibration raises
    the score of almost every case).

    Args:
        initial: (B, C, H, W) the segmenter's probabilities.
        calibrated: (B, C, H, W) the calibrated (gated, arbitrated) probabilities.
        initial_scores: :func:`reliability_scores` of the initial labels as if uncalibrated.
        calibrated_scores: :func:`reliability_scores` of the calibrated labels.

    Returns:
        ``(probabilities, scores, reverted)``: the kept maps, their scores, and the (B,) bool cases reverted.
    """
    reverted = calibrated_scores["reliability"] < initial_scores["reliability"]
    maps = np.where(reverted[:, None, None, None], initial, calibrated)
    scores = {k: np.where(reverted, initial_scores[k], v).astype(np.float32) for k, v in calibrated_scores.items()}
    return maps, scores, reverted


def _dice_or_nan(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    has = (truth != NO_TRUTH).any(axis=(1, 2))
    out = np.full(len(pred), np.nan, dtype=np.float32)
    if has.any():
        out[has] = dice_per_case(pred[has], truth[has], num_classes)
    return out
