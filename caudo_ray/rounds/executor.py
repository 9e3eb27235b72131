"""Where a round's training and labelling run: the :class:`Executor` protocol and the in-process executor.

:class:`LocalExecutor` runs everything in this process (``--no-ray``); ``caudo_ray.distributed.executor.RayExecutor``
runs training on a trainer actor and labelling on a pool of calibration workers. Both execute the same steps
(:class:`TrainContext.train`, :func:`caudo_ray.rounds.steps.label_cases`), so the choice changes speed, never
results.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn

from caudo_ray.config import RunConfig
from caudo_ray.data import LabelledCases
from caudo_ray.labelling.engine import LabelingEngine
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.networks.device import resolve_device
from caudo_ray.rounds.steps import BatchStats, label_cases, training_inputs
from caudo_ray.rounds.train import train_round_models
from caudo_ray.store import PseudoLabelStore
from caudo_ray.training.checkpoint import TrainingCheckpoint
from caudo_ray.training.hooks import TrainingHooks
from caudo_ray.workspace import Workspace


class Executor(Protocol):
    """Where training and labelling run. Implementations add placement, never method logic."""

    def train(self, r: int, previous: RoundModels | None, *, with_calibrator: bool = True) -> RoundModels: ...

    def label(self, r: int, models: RoundModels, batches: Iterable[np.ndarray]) -> Iterator[BatchStats]: ...

    def owner(self, store: PseudoLabelStore) -> PseudoLabelStore:
        """The store handle through which the coordinator begins and commits rounds."""
        ...

    def close(self) -> None: ...


@dataclass
class TrainContext:
    """What a trainer needs besides the store: the config, class count and validation cases."""

    cfg: RunConfig
    store_url: str
    num_classes: int
    val: LabelledCases | None = None

    def train(
        self,
        r: int,
        previous: RoundModels | None,
        *,
        with_calibrator: bool = True,
        progress: bool = False,
        progress_lines: int = 0,
        wrap_model: Callable[[nn.Module], nn.Module] | None = None,
        rank: int = 0,
    ) -> RoundModels | None:
        """Train round ``r``'s models from the store's inputs; checkpoints in the work dir unless data-parallel."""
        store = PseudoLabelStore.open(self.store_url)
        cfg = self.cfg
        if not with_calibrator:
            cfg = dataclasses.replace(cfg, calibrator=dataclasses.replace(cfg.calibrator, enabled=False))
        hooks = TrainingHooks(progress=progress, progress_lines=progress_lines, wrap_model=wrap_model, rank=rank)
        # Data-parallel ranks would each need the same resume point; only single-process training checkpoints.
        if wrap_model is None:
            previous_version = previous.version if previous is not None else None
            key = f"{cfg.method_hash()} round {r} calibrator={with_calibrator} previous={previous_version}"
            checkpoint = TrainingCheckpoint(Workspace.of(cfg).checkpoint_path(r), key)
            hooks = dataclasses.replace(hooks, checkpoint=checkpoint, every=cfg.runtime.checkpoint_every)
        return train_round_models(
            cfg,
            r,
            # The veto is the labels', so it holds for the final segmenter too, which trains without a calibrator.
            training_inputs(store, r, with_pool=cfg.consistency.online_in_round(r), veto=self.cfg.calibrator.enabled and self.cfg.calibrator.veto),
            num_classes=self.num_classes,
            previous=previous,
            val=self.val,
            hooks=hooks,
        )


def labelling_precision(setting: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context a batch is labelled under (``runtime.autocast``); the same for every executor.

    ``auto`` is bf16 on CUDA (labels equal fp32's up to the ties docs/benchmarks.md measures) and full float32
    elsewhere, where reduced precision saves no time.
    """
    if setting == "auto":
        setting = "bf16" if device.type == "cuda" else "off"
    if setting == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if setting == "bf16" else torch.float16)


class LocalExecutor:
    """Everything in this process, one batch at a time.

    Each phase runs with the torch threads its Ray actor would have (``runtime.trainer_cpus`` for training,
    ``runtime.threads_per_worker`` for labelling): float reductions depend on the thread count, so this keeps a
    run's results the same with or without Ray, and the same when it is resumed.
    """

    def __init__(self, ctx: TrainContext, progress: bool = True):
        self.ctx = ctx
        self.progress = progress
        self.store = PseudoLabelStore.open(ctx.store_url)

    def train(self, r: int, previous: RoundModels | None, *, with_calibrator: bool = True) -> RoundModels:
        torch.set_num_threads(max(1, int(self.ctx.cfg.runtime.trainer_cpus)))
        return self.ctx.train(r, previous, with_calibrator=with_calibrator, progress=self.progress)

    def label(self, r: int, models: RoundModels, batches: Iterable[np.ndarray]) -> Iterator[BatchStats]:
        torch.set_num_threads(self.ctx.cfg.runtime.threads_per_worker)
        device = resolve_device(self.ctx.cfg.device)
        engine = LabelingEngine(self.ctx.cfg, models, device)
        for indices in batches:
            # Entered per batch: autocast is thread state, and the caller runs between two batches.
            with labelling_precision(self.ctx.cfg.runtime.autocast, device):
                stats = label_cases(engine, self.store, r, indices)
            yield stats

    def owner(self, store: PseudoLabelStore) -> PseudoLabelStore:
        return store

    def close(self) -> None:
        pass
