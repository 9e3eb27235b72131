"""The calibrator's networks: the label autoencoder and a conditional latent denoiser (diffusers ``UNet2DModel``).

The denoiser predicts v for a noisy label latent ``z_t`` under the guidance ``g = [down(features), E(p),
down(image)]``, which carries the segmenter's decoder features, the latent of its initial pseudo label ``p`` and
the image. The noise schedule lives in :mod:`caudo_ray.calibration.schedule`, sampling in
:mod:`caudo_ray.calibration.sampling`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn

from caudo_ray.config import CalibratorConfig
from caudo_ray.errors import DataError
from caudo_ray.networks.autoencoder import LabelAutoencoder


def _norm_groups(channels: tuple[int, ...]) -> int:
    common = math.gcd(*channels)
    return max(g for g in range(1, 9) if common % g == 0)


class Calibrator(nn.Module):
    """Label autoencoder plus conditional latent denoiser.

    Args:
        num_classes: C.
        feature_channels: F, channels of the segmenter features used as guidance.
        latent_channels: d.
        downsample: latent reduction factor.
        block_out_channels: widths of the denoiser's UNet levels.
    """

    def __init__(
        self,
        num_classes: int,
        feature_channels: int,
        latent_channels: int,
        downsample: int,
        block_out_channels: tuple[int, ...],
    ):
        super().__init__()
        self.num_classes = num_classes
        self.feature_channels = feature_channels
        self.latent_channels = latent_channels
        self.downsample = downsample
        self.block_out_channels = tuple(block_out_channels)
        self.autoencoder = LabelAutoencoder(num_classes, latent_channels, downsample)
        self.guidance_channels = feature_channels + latent_channels + 1
        levels = len(self.block_out_channels)
        self.denoiser = UNet2DModel(
            sample_size=None,
            in_channels=latent_channels + self.guidance_channels,
            out_channels=latent_channels,
            block_out_channels=self.block_out_channels,
            layers_per_block=1,
            down_block_types=("DownBlock2D",) * levels,
            up_block_types=("UpBlock2D",) * levels,
            add_attention=False,  # latents are a few pixels across; attention buys nothing there
            norm_num_groups=_norm_groups(self.block_out_channels),
        )

    @classmethod
    def from_config(cls, cfg: CalibratorConfig, num_classes: int, feature_channels: int) -> Calibrator:
        """Build an untrained calibrator from the run configuration."""
        return cls(
            num_classes=num_classes,
            feature_channels=feature_channels,
            latent_channels=cfg.latent_channels,
            downsample=cfg.downsample,
            block_out_channels=tuple(cfg.block_out_channels),
        )

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> Calibrator:
        """Rebuild the architecture from :meth:`config_dict` (weights come from ``load_state_dict``)."""
        return cls(**{**config, "block_out_channels": tuple(config["block_out_channels"])})

    def config_dict(self) -> dict[str, Any]:
        """Plain (JSON-able) constructor arguments."""
        return {
            "num_classes": self.num_classes,
            "feature_channels": self.feature_channels,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
            "block_out_channels": list(self.block_out_channels),
        }

    def latent_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Latent size for a working size, refusing sizes the autoencoder and denoiser can't round-trip."""
        step = self.downsample * 2 ** (len(self.block_out_channels) - 1)
        if hw[0] % step or hw[1] % step:
            raise DataError("calibrator", f"image size {tuple(hw)} must be a multiple of {step} on each side")
        return hw[0] // self.downsample, hw[1] // self.downsample

    def guidance(self, image: torch.Tensor, z_p: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Guidance ``g = [down(features), E(p), down(image)]`` at the latent size of ``z_p``.

        Args:
            image: (B, 1, H, W) images in [0, 1].
            z_p: (B, d, h, w) latent of the initial label, ``autoencoder.encode(p)``.
            features: (B, F, h', w') segmenter decoder features, any spatial size divisible into (h, w).

        Returns:
            (B, F + d + 1, h, w) guidance.
        """
        hw = tuple(z_p.shape[-2:])
        return torch.cat([F.adaptive_avg_pool2d(features, hw), z_p, F.adaptive_avg_pool2d(image, hw)], dim=1)

    def velocity(self, z_t: torch.Tensor, t: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        """The denoiser's output, v = sqrt(a) eps - sqrt(1 - a) z_0, for latents ``z_t`` at timesteps ``t`` (B,).

        v-prediction rather than eps: its loss weighs every t alike in terms of the clean latent, so the
        denoiser also learns what the label should be at large t, where a calibration that inverts to
        ``t* = T`` does its correcting. With eps-prediction the same budget learned almost nothing there (HC18,
        round 0: calibration moved pseudo-label Dice by +0.001; synthetic leaks on exemplar views 0.78 -> 0.80
        against 0.87 with v).
        """
        return self.denoiser(torch.cat([z_t, guidance], dim=1), t).sample
