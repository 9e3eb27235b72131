"""The noise schedule shared by calibrator training and calibration.

One object owns every step that depends on the schedule: noising and the v target for training, the timesteps a
calibration of strength s walks, and the deterministic DDIM moves in both directions.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers import DDIMScheduler

BETA_SCHEDULE = "squaredcos_cap_v2"  # keeps useful signal at large t, where few-step DDIM spends most steps


class CalibrationSchedule:
    """DDIM schedule of ``num_train_timesteps`` steps over ``squaredcos_cap_v2`` noise levels, v-prediction.

    Args:
        num_train_timesteps: T.
    """

    def __init__(self, num_train_timesteps: int):
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        self.num_train_timesteps = num_train_timesteps
        scheduler = DDIMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=BETA_SCHEDULE,
            clip_sample=False,
            set_alpha_to_one=True,
            prediction_type="v_prediction",
        )
        self.alphas_cumprod = scheduler.alphas_cumprod.clone().float()

    def noisy(self, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_t, v)``: the latents noised to timesteps ``t`` (B,) and the v target of the denoiser."""
        a = self.alphas_cumprod.to(z0.device)[t][:, None, None, None]
        return a.sqrt() * z0 + (1 - a).sqrt() * noise, a.sqrt() * noise - (1 - a).sqrt() * z0

    def timesteps(self, num_steps: int, strength: float) -> list[int]:
        """Increasing DDIM timesteps from 0 (the clean latent) to ``t* = round(s T)``.

        A calibration of strength ``s`` walks ``ceil(s * num_steps)`` DDIM steps, the share of a full
        ``num_steps`` schedule that lies below ``t*``. ``t*`` is capped at ``T - 1``, the last trained timestep.

        Returns:
            ``[0, ..., t*]`` without repeats; just ``[0]`` when ``t*`` rounds to 0 (no calibration).
        """
        if not 0.0 < strength <= 1.0:
            raise ValueError(f"calibration strength must be in (0, 1], got {strength}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        t_star = min(round(strength * self.num_train_timesteps), self.num_train_timesteps - 1)
        if t_star == 0:
            return [0]
        k = math.ceil(strength * num_steps)
        return sorted({int(round(v)) for v in np.linspace(0.0, t_star, k + 1)})

    def epsilon(self, z_t: torch.Tensor, v: torch.Tensor, t: int) -> torch.Tensor:
        """The noise implied by the model's v for latents ``z_t`` at timestep ``t``."""
        a = self.alphas_cumprod[t].to(z_t.device)
        return a.sqrt() * v + (1 - a).sqrt() * z_t

    def move(self, z: torch.Tensor, eps: torch.Tensor, t_from: int, t_to: int) -> torch.Tensor:
        """One deterministic DDIM move (eta 0) of latents ``z`` at ``t_from`` to ``t_to``, given the noise ``eps``.

        Timestep 0 stands for the clean latent itself (alpha = 1), so an inversion starts from ``E(p)`` exactly.
        """
        a_from, a_to = self._alpha(t_from, z.device), self._alpha(t_to, z.device)
        x0 = (z - (1.0 - a_from).sqrt() * eps) / a_from.sqrt()
        return a_to.sqrt() * x0 + (1.0 - a_to).sqrt() * eps

    def _alpha(self, t: int, device: torch.device) -> torch.Tensor:
        return torch.ones((), device=device) if t == 0 else self.alphas_cumprod[t].to(device)
