"""The weights a round produces, as one object that travels once per round, and the networks built from them."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field

import torch

from caudo_ray.config import RunConfig
from caudo_ray.networks.calibrator import Calibrator
from caudo_ray.networks.segmenter import build_segmenter, predict_tensor


@dataclass
class RoundModels:
    """Weights of one round's segmenter and calibrator; travels once per round through the object store."""

    round: int
    num_classes: int
    feature_channels: int
    segmenter: dict[str, torch.Tensor]
    calibrator: dict[str, torch.Tensor] | None
    val_metrics: dict[str, float] = field(default_factory=dict)
    # The segmenter on augmented exemplar views drawn alike for every round (rounds.train.exemplar_view_dice).
    exemplar_metrics: dict[str, float] = field(default_factory=dict)
    train_s: float = 0.0  # the whole round's training, calibrator included
    calibrator_train_s: float = 0.0  # of which the calibrator's (autoencoder and denoiser)
    shape_prior: dict[str, list] | None = None  # labelling.reliability.ShapePrior of the round's exemplars

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


def build_models(cfg: RunConfig, models: RoundModels, device: torch.device) -> tuple[torch.nn.Module, Calibrator | None]:
    """Instantiate the networks of ``models`` on ``device`` in eval mode."""
    net = build_segmenter(cfg.segmenter, models.num_classes)
    net.load_state_dict(models.segmenter)
    net.to(device).eval()
    calib = None
    if models.calibrator is not None:
        calib = Calibrator.from_config(cfg.calibrator, models.num_classes, models.feature_channels)
        calib.load_state_dict(models.calibrator)
        calib.to(device).eval()
    return net, calib


def feature_channels_of(net: torch.nn.Module, working_size: tuple[int, int], device: torch.device) -> int:
    with torch.no_grad():
        _, feats = predict_tensor(net, torch.zeros(1, 1, *working_size, device=device))
    return int(feats.shape[1])
