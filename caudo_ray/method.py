"""One round of Caudo-Diff as pure steps: train the round's models, label a batch, score and select.

These functions hold all of the method that runs per round. The local loop and the Ray actors call the same
functions (``train_round_models`` in the trainer, ``LabelingEngine.label_batch`` in each calibration worker),
so distribution adds no method logic.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caudo_ray import calibrator as cal
from caudo_ray import segmenter as seg
from caudo_ray import selection
from caudo_ray.config import RunConfig
from caudo_ray.store import NO_TRUTH

log = logging.getLogger("caudo_ray")

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but torch sees no GPU")
    return torch.device(name)


@dataclass
class RoundModels:
    """Weights of one round's segmenter and calibrator; travels once per round through the object store."""

    round: int
    num_classes: int
    feature_channels: int
    segmenter: dict[str, torch.Tensor]
    calibrator: dict[str, torch.Tensor] | None
    val_metrics: dict[str, float] = field(default_factory=dict)
    train_s: float = 0.0

    @property
    def version(self) -> str:
        """Content hash of the weights: provenance for every label the round writes."""
        h = hashlib.sha256()
        for state in (self.segmenter, self.calibrator or {}):
            for key in sorted(state):
                h.update(key.encode())
                h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
        return f"r{self.round}-{h.hexdigest()[:12]}"

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save(self.__dict__, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundModels:
        # weights_only: a checkpoint is data, never code (a tampered file cannot run anything on load).
        return cls(**torch.load(io.BytesIO(data), weights_only=True, map_location="cpu"))

    def save(self, path) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(self.to_bytes())
        os.replace(tmp, path)  # atomic: a killed run never leaves a half-written model behind

    @classmethod
    def load(cls, path) -> RoundModels:
        with open(path, "rb") as fh:
            return cls.from_bytes(fh.read())


def training_checkpoint_path(cfg: RunConfig, r: int) -> Path:
    """Where round ``r``'s training checkpoint lives (the final segmenter's is round ``cfg.rounds``)."""
    return Path(cfg.work_dir) / "checkpoints" / f"train_{r}.pt"


class TrainingCheckpoint:
    """The latest training state of one round, written atomically, read with ``torch.load(weights_only=True)``.

    A state records its phase (``segmenter``, ``autoencoder`` or ``denoiser``), the iterations done in it, the
    state dicts of the networks and optimizer and, for the calibrator, its RNG states; the segmenter needs none,
    since its iteration ``i`` draws everything from ``(seed, i)``. ``key`` ties the file to the config, round and
    warm start it was written under, so a checkpoint of other training is ignored rather than resumed.
    """

    def __init__(self, path: Path, key: str):
        self.path = Path(path)
        self.key = key

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        state = torch.load(self.path, weights_only=True, map_location="cpu")
        if state.get("key") != self.key:
            log.warning("%s belongs to other training (%s); starting this round's training afresh", self.path, state.get("key"))
            return None
        log.info("resuming training from %s: %s iteration %d", self.path, state["phase"], state["iteration"])
        return state

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({**state, "key": self.key}, tmp)
        os.replace(tmp, self.path)  # atomic: a kill mid-write leaves the previous checkpoint intact

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


def build_models(cfg: RunConfig, models: RoundModels, device: torch.device) -> tuple[torch.nn.Module, cal.Calibrator | None]:
    """Instantiate the networks of ``models`` on ``device`` in eval mode."""
    net = seg.build_segmenter(cfg.segmenter, models.num_classes)
    net.load_state_dict(models.segmenter)
    net.to(device).eval()
    calib = None
    if models.calibrator is not None:
        calib = cal.Calibrator.from_config(cfg.calibrator, models.num_classes, models.feature_channels)
        calib.load_state_dict(models.calibrator)
        calib.to(device).eval()
    return net, calib


def feature_channels_of(net: torch.nn.Module, working_size: tuple[int, int], device: torch.device) -> int:
    with torch.no_grad():
        _, feats = seg.predict_tensor(net, torch.zeros(1, 1, *working_size, device=device))
    return int(feats.shape[1])


def train_round_models(
    cfg: RunConfig,
    r: int,
    *,
    num_classes: int,
    exemplar_images: np.ndarray,
    exemplar_labels: np.ndarray,
    pseudo_images: np.ndarray | None = None,
    pseudo_labels: np.ndarray | None = None,
    pseudo_weights: np.ndarray | None = None,
    previous: RoundModels | None = None,
    val_images: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    device: torch.device | None = None,
    progress: bool = False,
    checkpoint: TrainingCheckpoint | None = None,
    wrap_model=None,
    rank: int = 0,
) -> RoundModels | None:
    """Train the segmenter (warm-started from ``previous``) and, when enabled, the calibrator for round ``r``.

    Round 0 learns from the exemplar views alone; later rounds add the previous round's selected calibrated
    labels, each weighted by its reliability.

    Data-parallel training (Ray Train) passes ``wrap_model`` (e.g. ``ray.train.torch.prepare_model``) and this
    process's ``rank``: each rank draws its own batches and DDP averages the gradients, so the segmenter sees
    ``world_size`` times the batch per iteration. The calibrator then trains on rank 0 alone, which returns the
    models; other ranks return None.

    With a ``checkpoint``, the training state is saved every ``runtime.checkpoint_every`` iterations of each
    phase and training starts from the saved state when there is one; on CPU the result equals uninterrupted
    training. The caller deletes the checkpoint once the returned models are saved.
    """
    device = device or resolve_device(cfg.device)
    t0 = time.perf_counter()
    seed = cfg.seed * 1000 + r
    # Seeded initialisation: the same round gives the same weights in any process (local loop, trainer actor).
    net = seg.build_segmenter(cfg.segmenter, num_classes, seed=seed)
    if previous is not None:
        net.load_state_dict(previous.segmenter)
        iterations = cfg.segmenter.finetune_iterations
    else:
        iterations = cfg.segmenter.iterations
    net.to(device)
    every = cfg.runtime.checkpoint_every if checkpoint is not None else 0
    state = checkpoint.load() if every else None
    start = 0
    if state is not None:
        net.load_state_dict(state["segmenter"])
        start = state["iteration"] if state["phase"] == "segmenter" else iterations

    def save_segmenter(done: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        checkpoint.save({"phase": "segmenter", "iteration": done, "segmenter": model.state_dict(), "optimizer": optimizer.state_dict()})

    if start < iterations:
        seg.train_segmenter(
            wrap_model(net) if wrap_model is not None else net,
            exemplar_images=exemplar_images,
            exemplar_labels=exemplar_labels,
            pseudo_images=pseudo_images,
            pseudo_labels=pseudo_labels,
            pseudo_weights=pseudo_weights,
            iterations=iterations,
            cfg=cfg.segmenter,
            seed=seed + 7919 * rank,
            device=str(device),
            progress=progress,
            checkpoint_fn=save_segmenter if every else None,
            checkpoint_every=every,
            start_iteration=start,
            optimizer_state=state["optimizer"] if state is not None and state["phase"] == "segmenter" else None,
        )
    if rank != 0:
        return None
    net.eval()
    feature_channels = feature_channels_of(net, cfg.data.working_size, device)

    calibrator_state = None
    warm = previous is not None and previous.calibrator is not None
    c = cfg.calibrator
    if c.enabled and warm and c.denoiser_finetune_iterations == 0:
        # The round-0 calibrator serves every round: it keeps correcting the warm-started segmenters' labels
        # (HC18, round 1: +3.0 Dice points as it is, +2.3 fine-tuned on exemplar views, -3.0 fine-tuned with
        # the selected pseudo labels, whose own errors it then learns to reproduce).
        calibrator_state = previous.calibrator
    elif c.enabled:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            calib = cal.Calibrator.from_config(c, num_classes, feature_channels)
        if warm:
            calib.load_state_dict(previous.calibrator)
        calib.to(device)
        pseudo = c.pseudo_pairs and pseudo_images is not None
        cal.train_calibrator(
            calib,
            lambda x: seg.predict_tensor(net, x),
            exemplar_images=exemplar_images,
            exemplar_labels=exemplar_labels,
            pseudo_images=pseudo_images if pseudo else None,
            pseudo_labels=pseudo_labels if pseudo else None,
            pseudo_weights=pseudo_weights if pseudo else None,
            cfg=c,
            seg_cfg=cfg.segmenter,
            seed=seed,
            device=str(device),
            progress=progress,
            checkpoint_fn=(lambda s: checkpoint.save({**s, "segmenter": net.state_dict()})) if every else None,
            checkpoint_every=every,
            resume=state if state is not None and state["phase"] != "segmenter" else None,
            warm_start=warm,
        )
        calibrator_state = {k: v.detach().cpu() for k, v in calib.state_dict().items()}

    val_metrics: dict[str, float] = {}
    if val_images is not None and len(val_images):
        val_metrics = evaluate(net, val_images, val_labels, num_classes, device=device)
    return RoundModels(
        round=r,
        num_classes=num_classes,
        feature_channels=feature_channels,
        segmenter={k: v.detach().cpu() for k, v in net.state_dict().items()},
        calibrator=calibrator_state,
        val_metrics=val_metrics,
        train_s=time.perf_counter() - t0,
    )


@dataclass
class BatchResult:
    """Labels and per-case scores of one batch, plus where its time went."""

    initial: np.ndarray  # (B, H, W) u8
    calibrated: np.ndarray  # (B, H, W) u8
    scores: dict[str, np.ndarray]  # name -> (B,) f32
    timings: dict[str, float]


class LabelingEngine:
    """The round's segmenter and calibrator, built once per round, labelling batch after batch.

    Segmenter inference and calibration run in the same process, so feature maps never leave it.
    """

    def __init__(self, cfg: RunConfig, models: RoundModels, device: torch.device | None = None):
        self.cfg = cfg
        self.models = models
        self.device = device or resolve_device(cfg.device)
        self.net, self.calibrator = build_models(cfg, models, self.device)

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
        probs, feats = seg.predict_tensor(self.net, x)
        flipped, _ = seg.predict_tensor(self.net, x.flip(-1))
        t1 = time.perf_counter()
        if self.calibrator is not None:
            calibrated = cal.calibrate(
                self.calibrator, x, probs, feats, w=c.guidance_strength, s=c.calibration_strength, num_steps=c.inference_steps
            )
        else:
            calibrated = probs
        t2 = time.perf_counter()
        p0 = probs.float().cpu().numpy()
        pf = flipped.flip(-1).float().cpu().numpy()
        p1 = calibrated.float().cpu().numpy() if self.calibrator is not None else p0
        if self.calibrator is not None and c.accept_gate:
            p1, scores = selection.accept_calibration(p0, p1, pf)
        else:
            scores = selection.reliability_scores(p0, p1, pf)
            if self.calibrator is not None:
                scores["accepted"] = np.ones(len(p1), dtype=np.float32)
        initial = p0.argmax(1).astype(np.uint8)
        final = p1.argmax(1).astype(np.uint8)
        if truth is not None:
            scores["initial_dice"] = _dice_or_nan(initial, truth, self.models.num_classes)
            scores["calibrated_dice"] = _dice_or_nan(final, truth, self.models.num_classes)
        return BatchResult(initial, final, scores, {"infer_s": t1 - t0, "ddim_s": t2 - t1, "n": len(images)})


def _dice_or_nan(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    has = (truth != NO_TRUTH).any(axis=(1, 2))
    out = np.full(len(pred), np.nan, dtype=np.float32)
    if has.any():
        out[has] = selection.dice_per_case(pred[has], truth[has], num_classes)
    return out


def evaluate(
    net: torch.nn.Module, images: np.ndarray, labels: np.ndarray, num_classes: int, *, device: torch.device | None = None
) -> dict[str, Any]:
    """Dice and HD95 (MONAI metrics) of a segmenter on labelled cases: mean over foreground classes and per class."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    device = device or next(net.parameters()).device
    pred = seg.predict(net, images, device=str(device), return_features=False).probs.argmax(1)
    onehot = lambda a: torch.nn.functional.one_hot(torch.from_numpy(a.astype(np.int64)), num_classes).permute(0, 3, 1, 2).float()
    y_pred, y = onehot(pred), onehot(labels)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(y_pred, y)
    hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(y_pred, y)
    per_class_dice = torch.nanmean(dice, dim=0).numpy()
    # An empty prediction has no boundary: HD95 is undefined (inf/nan); report it over the defined cases.
    hd = hd95.numpy()
    hd[~np.isfinite(hd)] = np.nan
    per_class_hd = np.nanmean(hd, axis=0) if np.isfinite(hd).any() else np.full(num_classes - 1, np.nan)
    out: dict[str, Any] = {"dice": float(np.nanmean(per_class_dice)), "hd95": float(np.nanmean(per_class_hd))}
    for c in range(1, num_classes):
        out[f"dice_class{c}"] = float(per_class_dice[c - 1])
        out[f"hd95_class{c}"] = float(per_class_hd[c - 1])
    out["dice_per_case"] = np.nanmean(dice.numpy(), axis=1).tolist()
    return out
