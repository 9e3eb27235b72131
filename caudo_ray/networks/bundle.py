"""The weights a round produces, as one object that travels once per round, and the networks built from them."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from caudo_ray.config import RunConfig
from caudo_ray.errors import ModelFileError
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
    def from_bytes(cls, data: bytes, source: str = "model bytes") -> RoundModels:
        """Weights saved by :meth:`to_bytes`, loaded as data only.

        Raises:
            ModelFileError: naming ``source``, when the bytes are not a readable model (garbage, truncated, a
                pickle that would run code, or other fields than a round's).
        """
        try:
            # weights_only: a checkpoint is data, never code (a tampered file cannot run anything on load).
            state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 (torch raises pickle, runtime and zip errors for bad files)
            raise ModelFileError(source, f"not a loadable caudo-ray model ({type(exc).__name__}: {exc})") from None
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(state, dict) or not set(state) <= fields or "segmenter" not in state:
            found = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ModelFileError(source, f"not a caudo-ray model: expected fields {sorted(fields)}, found {found}")
        if not isinstance(state["segmenter"], dict) or not all(isinstance(v, torch.Tensor) for v in state["segmenter"].values()):
            raise ModelFileError(source, "not a caudo-ray model: its segmenter is not a state dict of tensors")
        return cls(**state)

    def save(self, path) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(self.to_bytes())
        os.replace(tmp, path)  # atomic: a killed run never leaves a half-written model behind

    @classmethod
    def load(cls, path) -> RoundModels:
        """Read a model file written by :meth:`save`.

        Raises:
            ModelFileError: naming the file, when it is not a readable model (see :meth:`from_bytes`).
        """
        with open(path, "rb") as fh:
            return cls.from_bytes(fh.read(), source=str(Path(path)))


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
