"""The noise schedule shared by calibrator training and calibration, owned by diffusers' DDIM schedulers.

One object answers every question that depends on the schedule: noising and the v target for training
(``DDIMScheduler.add_noise`` / ``get_velocity``), the timesteps a calibration of strength s walks, and the
deterministic DDIM moves in both directions (``DDIMScheduler.step`` with eta 0, ``DDIMInverseScheduler.step``).
"""

from __future__ import annotations

import math

import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

BETA_SCHEDULE = "squaredcos_cap_v2"  # keeps useful signal at large t, where few-step DDIM spends most steps


class CalibrationSchedule:
    """DDIM with v-prediction over ``num_train_timesteps`` noise levels, walked in ``num_inference_steps`` steps.

    The inference grid is diffusers' "leading" spacing with ``steps_offset = stride - 1``: the timesteps are
    ``stride - 1, 2 stride - 1, ..., n stride - 1`` (``stride = T // n``), so the step below the lowest one lands
    on the clean latent exactly (``set_alpha_to_one``) in both directions, and the highest is ``T - 1`` whenever
    ``n`` divides ``T`` (995 for the default T = 1000, n = 6). A calibration of strength ``s`` walks the lowest
    ``ceil(s n)`` steps of this grid, the share of the schedule below ``t* = s T`` (as diffusers' img2img
    pipelines take the last ``s n`` steps).

    Args:
        num_train_timesteps: T, the noise levels the denoiser is trained on.
        num_inference_steps: n, DDIM steps over the whole schedule.
    """

    def __init__(self, num_train_timesteps: int, num_inference_steps: int):
        if not 1 <= num_inference_steps <= num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, num_train_timesteps={num_train_timesteps}], got {num_inference_steps}"
            )
        self.num_train_timesteps = num_train_timesteps
        self.num_inference_steps = num_inference_steps
        self.stride = num_train_timesteps // num_inference_steps
        config = {
            "num_train_timesteps": num_train_timesteps,
            "beta_schedule": BETA_SCHEDULE,
            "clip_sample": False,
            "set_alpha_to_one": True,
            "prediction_type": "v_prediction",
            "timestep_spacing": "leading",
            "steps_offset": self.stride - 1,
        }
        self.scheduler = DDIMScheduler(**config)
        self.scheduler.set_timesteps(num_inference_steps)
        self.inverse = DDIMInverseScheduler(**config)
        self.inverse.set_timesteps(num_inference_steps)

    # ------------------------------------------------------------------ training

    def noisy(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_t, v)``: latents noised to timesteps ``t`` (B,) and the denoiser's v target there."""
        return self.scheduler.add_noise(z0, noise, t), self.scheduler.get_velocity(z0, noise, t)

    # ------------------------------------------------------------------ calibration

    def steps(self, strength: float) -> int:
        """How many DDIM steps a calibration of strength ``s`` walks each way: ``ceil(s n)``."""
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"calibration strength must be in (0, 1], got {strength}")
        return math.ceil(strength * self.num_inference_steps)

    def inversion_timesteps(self, strength: float) -> list[int]:
        """Ascending target timesteps of the inversion from the clean latent to ``t*``."""
        return [int(t) for t in self.inverse.timesteps[: self.steps(strength)]]

    def denoising_timesteps(self, strength: float) -> list[int]:
        """Descending timesteps of the denoising from ``t*`` back to the clean latent."""
        return [int(t) for t in self.scheduler.timesteps[self.num_inference_steps - self.steps(strength) :]]

    def model_timestep_of_inversion(self, t: int) -> int:
        """Where the model is queried for the inversion step that ends at ``t``: at the step's start (0 for the
        clean latent), so each inversion step is the exact reverse of the matching denoising step's update rule."""
        return max(t - self.stride, 0)

    def invert(self, v: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
        """One deterministic inversion step of latents ``z`` up to timestep ``t``, given the model's v."""
        return self.inverse.step(v, t, z).prev_sample

    def denoise(self, v: torch.Tensor, t: int, z: torch.Tensor) -> torch.Tensor:
        """One deterministic (eta 0) DDIM step of latents ``z`` at timestep ``t`` down to the next lower one."""
        return self.scheduler.step(v, t, z, eta=0.0).prev_sample
