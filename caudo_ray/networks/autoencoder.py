"""The label autoencoder: C-channel label maps to a bounded latent at 1/downsample of the working size."""

from __future__ import annotations

import math

import torch
from torch import nn

_AE_WIDTHS = (16, 32)  # full-resolution and downsampled widths of the label autoencoder


class LabelAutoencoder(nn.Module):
    """Maps C-channel label maps to a bounded latent of ``latent_channels`` at ``1 / downsample`` resolution.

    The encoder ends in ``tanh``, so latents are bounded; ``latent_scale`` (a buffer, saved in the state dict)
    rescales them to unit standard deviation, measured on training labels after the autoencoder is trained, the
    way diffusers' ``scaling_factor`` does for image VAEs. The diffusion schedule assumes unit-scale data.

    Args:
        num_classes: C, channels of the label maps (background included).
        latent_channels: d, channels of the latent.
        downsample: spatial reduction factor, 1, 2, 4 or 8.
    """

    def __init__(self, num_classes: int, latent_channels: int, downsample: int):
        super().__init__()
        if downsample not in (1, 2, 4, 8):
            raise ValueError(f"downsample must be 1, 2, 4 or 8, got {downsample}")
        self.num_classes = num_classes
        self.latent_channels = latent_channels
        self.downsample = downsample
        n_down = int(math.log2(downsample))
        lo, hi = _AE_WIDTHS
        enc: list[nn.Module] = [nn.Conv2d(num_classes, lo, 3, padding=1), nn.SiLU()]
        ch = lo
        for _ in range(n_down):
            enc += [nn.Conv2d(ch, hi, 3, stride=2, padding=1), nn.SiLU(), nn.Conv2d(hi, hi, 3, padding=1), nn.SiLU()]
            ch = hi
        enc.append(nn.Conv2d(ch, latent_channels, 1))
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, ch, 3, padding=1), nn.SiLU()]
        for i in range(n_down):
            out = lo if i == n_down - 1 else hi
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, out, 3, padding=1), nn.SiLU()]
            ch = out
        dec += [nn.Conv2d(ch, ch, 3, padding=1), nn.SiLU(), nn.Conv2d(ch, num_classes, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self.register_buffer("latent_scale", torch.ones(()))

    def encode(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) label probabilities -> (B, d, H/ds, W/ds) latent of about unit scale."""
        return torch.tanh(self.encoder(probs)) * self.latent_scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, d, H/ds, W/ds) latent -> (B, C, H, W) logits."""
        return self.decoder(z / self.latent_scale)

