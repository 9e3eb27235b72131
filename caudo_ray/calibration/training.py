"""Training the calibrator: the label autoencoder, then the conditional denoiser, on exemplar views.

Training pairs are built once from augmented exemplar views: the initial label of each pair is the segmenter's
real prediction on the view, given with probability 0.5 per sample and iteration an error like those seen on real
data (:mod:`caudo_ray.calibration.corruptions`), with features that agree with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from caudo_ray.arrays import IGNORE
from caudo_ray.calibration.corruptions import corrupt_labels, match_features, one_hot
from caudo_ray.calibration.schedule import CalibrationSchedule
from caudo_ray.config import CalibratorConfig, SegmenterConfig
from caudo_ray.errors import DataError
from caudo_ray.networks.autoencoder import LabelAutoencoder
from caudo_ray.networks.calibrator import Calibrator
from caudo_ray.training.hooks import NO_HOOKS, TrainingHooks
from caudo_ray.training.inputs import RoundInputs
from caudo_ray.transforms.augment import augment_views

SegmentFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _reconstruction_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits, target)
    pred = torch.softmax(logits, dim=1)
    inter = (pred * target).sum((2, 3))
    dice = (2 * inter + 1.0) / (pred.sum((2, 3)) + target.sum((2, 3)) + 1.0)
    return ce + (1.0 - dice.mean())


@dataclass
class _PairBank:
    """Training cases with the segmenter's outputs on them, all on the CPU."""

    images: torch.Tensor  # (N, 1, H, W)
    labels: torch.Tensor  # (N, H, W) long, the targets
    probs: torch.Tensor  # (N, C, H, W) the segmenter's predictions, the initial labels
    features: torch.Tensor  # (N, F, h, w) its features, already pooled to the latent size
    weights: torch.Tensor  # (N,) loss weights

    def __len__(self) -> int:
        return self.images.shape[0]

    def __add__(self, other: _PairBank) -> _PairBank:
        return _PairBank(*(torch.cat([getattr(self, f.name), getattr(other, f.name)]) for f in fields(self)))


def _predict_bank(
    segment: SegmentFn,
    images: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    latent_hw: tuple[int, int],
    batch_size: int,
    device: str | torch.device,
) -> _PairBank:
    probs, feats = [], []
    x_all = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    with torch.no_grad():
        for start in range(0, x_all.shape[0], batch_size):
            p, f = segment(x_all[start : start + batch_size].to(device))
            probs.append(p.float().cpu())
            # Only the latent-sized features are ever used, so pool now and keep the bank small.
            feats.append(F.adaptive_avg_pool2d(f.float(), latent_hw).cpu())
    probs_all = torch.cat(probs)
    targets = torch.from_numpy(np.ascontiguousarray(labels)).long()
    # A disputed pseudo-label pixel (IGNORE) teaches no correction: its target is the segmenter's own answer.
    targets = torch.where(targets == IGNORE, probs_all.argmax(1), targets)
    return _PairBank(
        x_all,
        targets,
        probs_all,
        torch.cat(feats),
        torch.from_numpy(np.asarray(weights, dtype=np.float32)),
    )


def train_calibrator(
    calibrator: Calibrator,
    segment: SegmentFn,
    inputs: RoundInputs,
    *,
    cfg: CalibratorConfig,
    seg_cfg: SegmenterConfig,
    seed: int,
    device: str | torch.device = "cpu",
    num_views: int = 256,
    hooks: TrainingHooks = NO_HOOKS,
    resume: dict[str, Any] | None = None,
    warm_start: bool = False,
) -> dict[str, Any]:
    """Train the label autoencoder, then the conditional denoiser, in place.

    Training pairs are built once: ``num_views`` augmented exemplar views
    (:func:`~caudo_ray.transforms.augment.augment_views`) plus the pseudo labels ``inputs`` holds, if any. For each, the initial label ``p`` is the
    segmenter's REAL prediction on the image, so the calibrator sees the segmenter's real errors. The segmenter
    was trained on the exemplar, so its predictions on exemplar views are often too good to teach corrections;
    hence each ``p`` is also, with probability 0.5 per sample and per iteration, given an error like those seen
    on real data (:func:`corrupt_labels`: leaks, bites, fragments, holes, erosion/dilation, rescaling, false
    blobs), and the features are changed to agree with it (:func:`match_features`), as real ones do.

    (a) The autoencoder learns to reconstruct one-hot labels and soft probability maps (both with and without
    corruption) under cross-entropy + Dice, so ``E(p)`` of a soft initial label is meaningful; then its latent
    scale is fixed to unit standard deviation over the one-hot training labels.
    (b) The denoiser learns v-prediction (MSE, uniform random t) of ``z_0 = E(onehot(y))`` under guidance
    ``g = [down(f), E(p), down(x)]``, with ``g`` zeroed with probability ``cfg.guidance_dropout``
    (classifier-free). Pseudo pairs weigh ``pseudo_weights``; exemplar views weigh ``seg_cfg.exemplar_weight``.

    Deterministic on CPU for a given ``seed`` (all randomness flows from it).

    Args:
        calibrator: model to train (modified in place).
        segment: ``segment(x (B,1,H,W) on device) -> (probs (B,C,H,W), features (B,F,h,w))``.
        inputs: the exemplars and, as further training pairs, any pseudo labels with their weights.
        cfg: calibrator configuration (iterations, batch size, learning rate, guidance dropout).
        seg_cfg: segmenter configuration, for the exemplar augmentation and the exemplar weight.
        seed: seed of every random choice.
        device: where to train.
        num_views: augmented exemplar views in the training bank.
        hooks: progress bars and checkpoints; a state holds the phase, iterations done, calibrator and
            optimizer state dicts and both RNG states.
        resume: such a state: training continues from it exactly as the uninterrupted run would.
        warm_start: the calibrator holds an earlier round's weights: its autoencoder is kept as it is (the label
            space does not change between rounds) and the denoiser is fine-tuned for
            ``cfg.denoiser_finetune_iterations`` instead of trained for ``cfg.denoiser_iterations``.

    Returns:
        ``{"autoencoder_loss": [...], "denoiser_loss": [...], "latent_scale": float}`` (losses of this call).
    """
    exemplar_images, exemplar_labels = inputs.exemplar_images, inputs.exemplar_labels
    pseudo_images, pseudo_labels, pseudo_weights = inputs.pseudo_images, inputs.pseudo_labels, inputs.pseudo_weights
    if exemplar_images.shape != exemplar_labels.shape or exemplar_images.ndim != 3:
        raise DataError("exemplar", f"images {exemplar_images.shape} and labels {exemplar_labels.shape} must both be (K, H, W)")
    if int(exemplar_labels.max()) >= calibrator.num_classes:
        raise DataError("exemplar", f"label {int(exemplar_labels.max())} >= num_classes {calibrator.num_classes}")
    if (pseudo_images is None) != (pseudo_labels is None):
        raise DataError("pseudo labels", "pseudo_images and pseudo_labels must be given together")
    calibrator.to(device)
    hw = calibrator.latent_hw(tuple(exemplar_images.shape[-2:]))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)

    view_imgs, view_labels = augment_views(
        exemplar_images, exemplar_labels, num_views, cfg=seg_cfg, rng_seed=int(rng.integers(2**31))
    )
    bank = _predict_bank(
        segment, view_imgs, view_labels, np.full(num_views, seg_cfg.exemplar_weight), hw, cfg.batch_size, device
    )
    if pseudo_images is not None and len(pseudo_images):
        if pseudo_images.shape != pseudo_labels.shape or pseudo_images.shape[-2:] != exemplar_images.shape[-2:]:
            raise DataError("pseudo labels", f"images {pseudo_images.shape} and labels {pseudo_labels.shape} must match the exemplar size")
        weights = np.ones(len(pseudo_images)) if pseudo_weights is None else np.asarray(pseudo_weights)
        if weights.shape != (len(pseudo_images),):
            raise DataError("pseudo labels", f"{weights.shape[0]} weights for {len(pseudo_images)} pseudo labels")
        bank = bank + _predict_bank(segment, pseudo_images, pseudo_labels, weights, hw, cfg.batch_size, device)
    if bank.probs.shape[1] != calibrator.num_classes or bank.features.shape[1] != calibrator.feature_channels:
        raise DataError(
            "segment",
            f"returned {bank.probs.shape[1]} classes and {bank.features.shape[1]} feature channels; the calibrator "
            f"expects {calibrator.num_classes} and {calibrator.feature_channels}",
        )
    ckpt = _Checkpointer(calibrator, rng, gen, hooks)
    ae_losses: list[float] = []
    if resume is not None:
        calibrator.load_state_dict(resume["calibrator"])
        rng.bit_generator.state = resume["numpy_rng"]
        gen.set_state(resume["torch_rng"])
    if not warm_start and (resume is None or resume["phase"] == "autoencoder"):
        ae_losses = _train_autoencoder(calibrator, bank, cfg, rng, gen, device, hooks.progress, ckpt, resume)
        resume = None
    iterations = cfg.denoiser_finetune_iterations if warm_start else cfg.denoiser_iterations
    den_losses = _train_denoiser(calibrator, CalibrationSchedule(cfg.train_timesteps, cfg.inference_steps), bank, cfg, iterations, rng, gen, device, hooks.progress, ckpt, resume)
    calibrator.eval()
    return {"autoencoder_loss": ae_losses, "denoiser_loss": den_losses, "latent_scale": float(calibrator.autoencoder.latent_scale)}


class _Checkpointer:
    """Hands the full training state of a phase to ``hooks`` after each of its iterations."""

    def __init__(self, calibrator, rng: np.random.Generator, gen: torch.Generator, hooks: TrainingHooks):
        self.calibrator, self.rng, self.gen, self.hooks = calibrator, rng, gen, hooks

    def after(self, phase: str, done: int, total: int, opt: torch.optim.Optimizer) -> None:
        self.hooks.after(done, lambda: {
            "phase": phase,
            "iteration": done,
            "calibrator": self.calibrator.state_dict(),
            "optimizer": opt.state_dict(),
            "numpy_rng": self.rng.bit_generator.state,
            "torch_rng": self.gen.get_state(),
        }, phase=phase, total=total)


def _start(opt: torch.optim.Optimizer, resume: dict[str, Any] | None) -> int:
    """The first iteration of a phase: 0, or where ``resume`` left it (its optimizer state restored)."""
    if resume is None:
        return 0
    opt.load_state_dict(resume["optimizer"])
    return int(resume["iteration"])


def _sample(bank: _PairBank, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, len(bank), (batch_size,), generator=gen)


def _train_autoencoder(calibrator, bank, cfg, rng, gen, device, progress, ckpt: _Checkpointer, resume) -> list[float]:
    ae = calibrator.autoencoder
    ae.train()
    ae.latent_scale.fill_(1.0)
    opt = torch.optim.Adam(ae.parameters(), lr=cfg.learning_rate)
    losses = []
    half = max(1, cfg.batch_size // 2)
    for it in tqdm(range(_start(opt, resume), cfg.autoencoder_iterations), desc="autoencoder", disable=not progress):
        onehot = one_hot(bank.labels[_sample(bank, half, gen)], calibrator.num_classes)
        soft = bank.probs[_sample(bank, half, gen)]
        target = corrupt_labels(torch.cat([onehot, soft]), rng).to(device)
        loss = _reconstruction_loss(ae.decode(ae.encode(target)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        ckpt.after("autoencoder", it + 1, cfg.autoencoder_iterations, opt)
    ae.eval()
    ae.latent_scale.fill_(1.0 / float(_target_latents(ae, bank, cfg.batch_size, device).std().clamp_min(1e-3)))
    return losses


def _target_latents(ae: LabelAutoencoder, bank: _PairBank, batch_size: int, device) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([
            ae.encode(one_hot(bank.labels[i : i + batch_size], ae.num_classes).to(device)).cpu()
            for i in range(0, len(bank), batch_size)
        ])


def _train_denoiser(calibrator, schedule: CalibrationSchedule, bank, cfg, iterations, rng, gen, device, progress, ckpt: _Checkpointer, resume) -> list[float]:
    ae = calibrator.autoencoder
    ae.requires_grad_(False)
    calibrator.denoiser.train()
    opt = torch.optim.AdamW(calibrator.denoiser.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    targets = _target_latents(ae, bank, cfg.batch_size, device)  # the autoencoder is frozen from here on
    losses = []
    for it in tqdm(range(_start(opt, resume), iterations), desc="denoiser", disable=not progress):
        idx = _sample(bank, cfg.batch_size, gen)
        p = corrupt_labels(bank.probs[idx], rng)
        feats = match_features(bank.features[idx], bank.probs[idx], p)
        x = bank.images[idx].to(device)
        with torch.no_grad():
            z0 = targets[idx].to(device)
            g = calibrator.guidance(x, ae.encode(p.to(device)), feats.to(device))
        keep = (torch.rand(len(idx), generator=gen) >= cfg.guidance_dropout).float().to(device)
        g = g * keep[:, None, None, None]
        t = torch.randint(0, schedule.num_train_timesteps, (len(idx),), generator=gen)
        noise = torch.randn(z0.shape, generator=gen).to(device)
        z_t, target = schedule.noisy(z0, noise, t.to(device))
        per_sample = ((calibrator.velocity(z_t, t.to(device), g) - target) ** 2).mean((1, 2, 3))
        weights = bank.weights[idx].to(device)
        loss = (per_sample * weights).sum() / weights.sum().clamp_min(1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        ckpt.after("denoiser", it + 1, iterations, opt)
    ae.requires_grad_(True)
    calibrator.eval()
    return losses
