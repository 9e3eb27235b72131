"""Deterministic DDIM calibration of pseudo labels: invert the label latent along the prior, denoise it guided.

Every step is deterministic, so the same inputs give bit-identical outputs on CPU.
"""

from __future__ import annotations

import torch

from caudo_ray.calibration.schedule import CalibrationSchedule
from caudo_ray.errors import DataError
from caudo_ray.networks.calibrator import Calibrator


def calibrate(
    calibrator: Calibrator,
    schedule: CalibrationSchedule,
    image: torch.Tensor,
    probs: torch.Tensor,
    features: torch.Tensor,
    *,
    w: float,
    s: float,
    num_steps: int,
) -> torch.Tensor:
    """Calibrate initial label probabilities by deterministic DDIM inversion and guided DDIM denoising.

    ``z = E(probs)`` is inverted (eta 0) from t = 0 to ``t* = round(s T)`` over ``ceil(s num_steps)`` steps
    with the UNCONDITIONAL eps (guidance zeroed), then denoised back to 0 with eps = eps_u + w (eps_c - eps_u);
    the conditional and unconditional passes share one forward call. No randomness: same inputs, same output.

    Why the inversion is unconditional: DDIM inversion followed by DDIM denoising with the same eps is (up to
    discretisation) the identity, so inverting with the conditional eps makes w = 1 return the initial label
    unchanged whatever the model learned. Inverting along the label prior (eps_u) and coming back along the
    guided eps translates ``E(p)`` from the prior to the guided model, as in dual diffusion implicit bridges:
    w = 0 keeps the initial label, w = 1 follows the guidance, w > 1 amplifies it. On the 32x32 ellipse
    phantoms of ``tests/test_calibrator.py`` with scale/shift-corrupted one-hot labels this takes mean Dice
    0.632 -> 0.873 after 300 denoiser iterations and 0.632 -> 0.910 after 1,200 (w = 2, s = 1, 10 steps).

    Args:
        calibrator: trained calibrator; it is put in eval mode.
        schedule: the noise schedule it was trained with.
        image: (B, 1, H, W) images in [0, 1].
        probs: (B, C, H, W) initial label probabilities.
        features: (B, F, h, w) segmenter features for the same images.
        w: guidance strength (0 = unconditional, 1 = conditional, > 1 amplified).
        s: calibration strength in (0, 1].
        num_steps: DDIM steps over the full schedule.

    Returns:
        (B, C, H, W) calibrated probabilities: ``p + softmax(D(z_0')) - softmax(D(E(p)))``, clipped at 0 and
        renormalised, where ``z_0'`` is the calibrated latent. Where the diffusion leaves the latent unchanged the
        initial label is returned as it is, whatever the autoencoder's reconstruction error.
    """
    _check_inputs(calibrator, image, probs, features)
    calibrator.eval()
    device = next(calibrator.parameters()).device
    image, probs, features = image.to(device).float(), probs.to(device).float(), features.to(device).float()
    calibrator.latent_hw(tuple(image.shape[-2:]))  # refuses a size the networks cannot round-trip
    steps = schedule.timesteps(num_steps, s)
    with torch.no_grad():
        ae = calibrator.autoencoder
        z_p = ae.encode(probs)
        guidance = calibrator.guidance(image, z_p, features)
        z = z_p
        batch = z.shape[0]
        no_guidance = torch.zeros_like(guidance)
        for t_from, t_to in zip(steps[:-1], steps[1:]):
            t = torch.full((batch,), t_from, dtype=torch.long, device=device)
            eps = schedule.epsilon(z, calibrator.velocity(z, t, no_guidance), t_from)
            z = schedule.move(z, eps, t_from, t_to)
        both_guidance = torch.cat([guidance, no_guidance])
        for t_from, t_to in zip(steps[:0:-1], steps[-2::-1]):
            t = torch.full((2 * batch,), t_from, dtype=torch.long, device=device)
            z2 = torch.cat([z, z])
            eps_c, eps_u = schedule.epsilon(z2, calibrator.velocity(z2, t, both_guidance), t_from).chunk(2)
            z = schedule.move(z, eps_u + w * (eps_c - eps_u), t_from, t_to)
        # Apply only the change the diffusion made: decode(E(p)) differs from p by the autoencoder's
        # reconstruction error, which would otherwise be passed off as a calibration (on HC18 it cost 1.3 Dice
        # points of every label). Both decodes sum to 1 per pixel, so p + delta does too before clipping.
        delta = torch.softmax(ae.decode(z), dim=1) - torch.softmax(ae.decode(z_p), dim=1)
        moved = (probs + delta).clamp_min(0.0)
        return moved / moved.sum(1, keepdim=True)


def _check_inputs(calibrator: Calibrator, image: torch.Tensor, probs: torch.Tensor, features: torch.Tensor) -> None:
    if image.ndim != 4 or image.shape[1] != 1:
        raise DataError("image", f"expected shape (B, 1, H, W), got {tuple(image.shape)}")
    expected = (image.shape[0], calibrator.num_classes, *image.shape[-2:])
    if tuple(probs.shape) != expected:
        raise DataError("probs", f"expected shape {expected}, got {tuple(probs.shape)}")
    if features.ndim != 4 or features.shape[0] != image.shape[0] or features.shape[1] != calibrator.feature_channels:
        raise DataError(
            "features",
            f"expected shape ({image.shape[0]}, {calibrator.feature_channels}, h, w), got {tuple(features.shape)}",
        )


