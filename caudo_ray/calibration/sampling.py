"""Deterministic DDIM calibration of pseudo labels: invert the label latent along the prior, denoise it guided.

Every step is deterministic, so the same inputs give bit-identical outputs on CPU.
"""

from __future__ import annotations

import math

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
) -> torch.Tensor:
    """Calibrate initial label probabilities by deterministic DDIM inversion and guided DDIM denoising.

    ``z = E(probs)`` is inverted (eta 0) from the clean latent to ``t*`` over ``ceil(s n)`` steps with the
    UNCONDITIONAL model (guidance zeroed), then denoised back with ``v = v_u + w (v_c - v_u)``; the conditional
    and unconditional passes share one forward call. No randomness: same inputs, same output.

    Why the inversion is unconditional: DDIM inversion followed by DDIM denoising with the same model is (up to
    discretisation) the identity, so inverting with the conditional model makes w = 1 return the initial label
    unchanged whatever the model learned. Inverting along the label prior and coming back along the guided model
    translates ``E(p)`` from the prior to the guided model, as in dual diffusion implicit bridges: w = 0 keeps
    the initial label, w = 1 follows the guidance, w > 1 amplifies it. (Guidance on v equals guidance on eps: at a
    given latent and timestep eps is affine in v.)

    Args:
        calibrator: trained calibrator; it is put in eval mode.
        schedule: the noise schedule it was trained with, and the DDIM steps to walk.
        image: (B, 1, H, W) images in [0, 1].
        probs: (B, C, H, W) initial label probabilities.
        features: (B, F, h, w) segmenter features for the same images.
        w: guidance strength (0 = unconditional, 1 = conditional, > 1 amplified).
        s: calibration strength in (0, 1]: how far up the schedule the label is inverted.

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
    with torch.no_grad():
        ae = calibrator.autoencoder
        z_p = ae.encode(probs)
        guidance = calibrator.guidance(image, z_p, features)
        z = z_p
        batch = z.shape[0]
        no_guidance = torch.zeros_like(guidance)
        for t in schedule.inversion_timesteps(s):
            at = torch.full((batch,), schedule.model_timestep_of_inversion(t), dtype=torch.long, device=device)
            z = schedule.invert(calibrator.velocity(z, at, no_guidance), t, z)
        both_guidance = torch.cat([guidance, no_guidance])
        for t in schedule.denoising_timesteps(s):
            at = torch.full((2 * batch,), t, dtype=torch.long, device=device)
            v_c, v_u = calibrator.velocity(torch.cat([z, z]), at, both_guidance).chunk(2)
            z = schedule.denoise(v_u + w * (v_c - v_u), t, z)
        # Apply only the change the diffusion made: decode(E(p)) differs from p by the autoencoder's
        # reconstruction error, which would otherwise be passed off as a calibration (on HC18 it cost 1.3 Dice
        # points of every label). Both decodes sum to 1 per pixel, so p + delta does too before clipping.
        delta = torch.softmax(ae.decode(z), dim=1) - torch.softmax(ae.decode(z_p), dim=1)
        moved = (probs + delta).clamp_min(0.0)
        return moved / moved.sum(1, keepdim=True)


def gate_calibration(
    initial: torch.Tensor, calibrated: torch.Tensor, reliability: torch.Tensor, bounds: tuple[float, float]
) -> torch.Tensor:
    """Keep of the calibrator's change what the segmenter's own doubt allows, case by case and pixel by pixel.

    Each pixel moves from the initial toward the calibrated probabilities by ``g = max(case, pixel)``:

    - ``pixel``: the initial map's normalised entropy there, so a pixel the segmenter is sure of keeps its class
      unless the calibrator disagrees strongly, and an unsure one follows the calibrator;
    - ``case``: 1 for a case whose initial label's reliability is at most ``lo``, 0 from ``hi`` up, linear in
      between (a step at ``lo`` when ``lo == hi``): a label already judged reliable is only touched where it is
      unsure, a doubtful one may be redrawn.

    A calibrator learns its prior from the views of one exemplar; the gate bounds what a wrong prior can do to
    labels the segmenter got right, which most are.

    Args:
        initial: (B, C, H, W) the segmenter's probabilities.
        calibrated: (B, C, H, W) the calibrator's.
        reliability: (B,) the initial labels' reliability in [0, 1].
        bounds: ``(lo, hi)``; ``(0, 0)`` gates by pixel alone.

    Returns:
        (B, C, H, W) probabilities.
    """
    case = case_weight(reliability, bounds).to(device=initial.device, dtype=initial.dtype)[:, None, None, None]
    p = initial.clamp_min(1e-8)
    pixel = -(p * p.log()).sum(1, keepdim=True) / math.log(initial.shape[1])
    return initial + torch.maximum(case, pixel.clamp(0.0, 1.0)) * (calibrated - initial)


def arbitrate(initial: torch.Tensor, calibrated: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
    """The calibrated probabilities where the segmenter's two views dispute a pixel, the initial ones elsewhere.

    Where the segmenter labels a pixel alike in the image and in its mirror (flipped back), two views of the data
    agree and the calibrator, whose prior comes from one exemplar, has less to go on than they do; where they
    disagree, the segmenter does not know, and the calibrator decides.

    Args:
        initial: (B, C, H, W) the segmenter's probabilities.
        calibrated: (B, C, H, W) the (gated) calibrated probabilities.
        mirrored: (B, C, H, W) the segmenter's probabilities on the mirrored image, flipped back.
    """
    agree = initial.argmax(1, keepdim=True) == mirrored.to(initial.device).argmax(1, keepdim=True)
    return torch.where(agree, initial, calibrated)


def keep_class_presence(initial: torch.Tensor, calibrated: torch.Tensor) -> torch.Tensor:
    """The calibrated probabilities, except where they would add or erase a structure: there the initial ones.

    The calibrator refines a label's shape from a latent at a quarter of the working size and a prior learnt from
    the exemplars' views; whether a structure is in the image at all is the segmenter's call, made at full
    resolution. A one-patient prior says every cardiac slice has a left ventricle, so on ACDC the calibrator drew
    one into apical and basal slices whose label had none, and such presence flips were all of its round-0 loss
    (docs/method.md). Per case and foreground class:

    - a class absent from ``argmax initial`` stays absent: the pixels the calibrated map gives it keep the
      initial probabilities;
    - a class present there stays present: if the calibrated map erases it, the pixels ``argmax initial`` gives
      it keep the initial probabilities.

    One pass: the restored pixels take classes present in the initial label, so no new class appears.

    Args:
        initial: (B, C, H, W) the segmenter's probabilities.
        calibrated: (B, C, H, W) the calibrated (gated, arbitrated) probabilities.

    Returns:
        (B, C, H, W) probabilities.
    """
    num_classes = initial.shape[1]
    a = initial.argmax(1)
    b = calibrated.argmax(1)
    present_a = torch.nn.functional.one_hot(a, num_classes).flatten(1, 2).any(1)  # (B, C)
    present_b = torch.nn.functional.one_hot(b, num_classes).flatten(1, 2).any(1)
    created = present_b & ~present_a
    erased = present_a & ~present_b
    created[:, 0] = False  # background is not a structure
    erased[:, 0] = False
    restore = created.gather(1, b.flatten(1)).view_as(b) | erased.gather(1, a.flatten(1)).view_as(a)
    return torch.where(restore[:, None], initial, calibrated)


def case_weight(reliability: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """(B,) how freely each case may move: 1 at reliability <= lo, 0 from hi up, linear in between."""
    lo, hi = bounds
    rel = reliability.float()
    return ((hi - rel) / (hi - lo)).clamp(0.0, 1.0) if hi > lo else (rel < lo).float()


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


