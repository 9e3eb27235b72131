"""The segmenter S: a 2D MONAI UNet and its feature-tapping inference.

At inference S gives the softmax probabilities and a decoder feature map, tapped with a forward hook on
:func:`feature_module`, so the calibrator's guidance comes from the very network that made the pseudo label (no
second copy of it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.networks.nets import UNet
from torch import nn

from caudo_ray.arrays import check_images
from caudo_ray.config import SegmenterConfig
from caudo_ray.errors import DataError


def build_segmenter(cfg: SegmenterConfig, num_classes: int, *, seed: int | None = None) -> UNet:
    """Build the 2D MONAI UNet.

    Args:
        cfg: channels, strides and residual units.
        num_classes: output channels, background included.
        seed: when given, the initial weights are drawn from this seed without touching the global torch RNG.

    Returns:
        An untrained ``monai.networks.nets.UNet`` (1 input channel, ``num_classes`` output logits).
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")

    def make() -> UNet:
        return UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=num_classes,
            channels=tuple(cfg.channels),
            strides=tuple(cfg.strides),
            num_res_units=cfg.num_res_units,
        )

    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def feature_module(model: nn.Module) -> nn.Module:
    """The submodule whose output is the segmenter's feature map.

    MONAI's UNet is ``Sequential(down_0, SkipConnection(inner), up_0)`` where ``up_0`` is the final output
    convolution. We tap the top ``SkipConnection``: its output is the concatenation of the first encoder stage
    and the last decoder stage, at 1/``strides[0]`` of the input resolution, i.e. exactly the tensor the output
    layer turns into logits. It therefore carries both the decoder's semantic evidence and the encoder's
    edge-level detail, with ``feature_channels(cfg)`` channels, at a resolution that is cheap to store and
    downsample to the calibrator's latent grid.

    Args:
        model: a UNet from :func:`build_segmenter`, optionally wrapped (DDP's ``.module`` is unwrapped).
    """
    net = getattr(model, "module", model)
    if not isinstance(net, UNet):
        raise TypeError(f"expected a monai UNet from build_segmenter, got {type(net).__name__}")
    return net.model[1]


def feature_channels(cfg: SegmenterConfig) -> int:
    """Number of channels F of the feature map tapped by :func:`feature_module`."""
    # The inner block's up layer returns channels[0] when there are deeper levels; with only two levels the
    # bottom unit's channels[1] are concatenated directly.
    inner = cfg.channels[0] if len(cfg.channels) > 2 else cfg.channels[1]
    return cfg.channels[0] + inner


@dataclass
class Prediction:
    """Segmenter output for a set of images.

    Attributes:
        probs: (N, C, H, W) float32 softmax probabilities.
        features: (N, F, h, w) float32 feature map from :func:`feature_module`, or None when not requested.
    """

    probs: np.ndarray
    features: np.ndarray | None


def predict_tensor(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities and feature map for a batch, in one forward pass.

    Runs without gradients and in eval mode (the previous mode is restored). The hook is removed before
    returning, also when the forward pass raises, so repeated calls never accumulate hooks.

    Args:
        model: a UNet from :func:`build_segmenter`.
        x: (B, 1, H, W) float tensor on the model's device.

    Returns:
        ``(probs (B, C, H, W), features (B, F, h, w))`` tensors on the model's device.
    """
    captured: list[torch.Tensor] = []
    handle = feature_module(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
        model.train(was_training)
    return torch.softmax(logits, dim=1), captured[0]


def predict(
    model: nn.Module,
    images: np.ndarray,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    return_features: bool = True,
) -> Prediction:
    """Predict probabilities (and features) for (N, H, W) float images in [0, 1].

    The model is moved to ``device``. Features are only copied back to host memory when asked for.
    """
    images = check_images("images", images)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    model.to(device)
    probs, feats = [], []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).unsqueeze(1).to(device)
        p, f = predict_tensor(model, x)
        probs.append(p.float().cpu().numpy())
        if return_features:
            feats.append(f.float().cpu().numpy())
    if not probs:
        raise DataError("images", "no images to predict")
    return Prediction(
        probs=np.concatenate(probs).astype(np.float32, copy=False),
        features=np.concatenate(feats).astype(np.float32, copy=False) if return_features else None,
    )

