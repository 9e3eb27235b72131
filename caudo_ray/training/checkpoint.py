"""Atomic training checkpoints: the latest state of a round's training, resumable after a crash."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from caudo_ray.errors import ModelFileError

log = logging.getLogger(__name__)


class TrainingCheckpoint:
    """The latest training state of one round, written atomically, read with ``torch.load(weights_only=True)``.

    A state records its phase (``segmenter``, ``autoencoder`` or ``denoiser``), the iterations done in it, the
    state dicts of the networks and optimizer and, for the calibrator, its RNG states; the segmenter needs none,
    since its iteration ``i`` draws everything from ``(seed, i)``. ``key`` ties the file to the config, round and
    warm start it was written under, so a checkpoint of other training is ignored rather than resumed.
    """

    def __init__(self, path: Path, key: str):
        self.path = Path(path)
        self.key = key

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, weights_only=True, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 (torch raises pickle, runtime and zip errors for bad files)
            raise ModelFileError(str(self.path), f"not a loadable training checkpoint ({type(exc).__name__}: {exc})") from None
        if not isinstance(state, dict):
            raise ModelFileError(str(self.path), f"not a training checkpoint: holds a {type(state).__name__}")
        if state.get("key") != self.key:
            log.warning("%s belongs to other training (%s); starting this round's training afresh", self.path, state.get("key"))
            return None
        log.info("resuming training from %s: %s iteration %d", self.path, state["phase"], state["iteration"])
        return state

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save({**state, "key": self.key}, tmp)
        os.replace(tmp, self.path)  # atomic: a kill mid-write leaves the previous checkpoint intact

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)
