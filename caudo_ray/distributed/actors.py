"""Ray actors around the round steps: a trainer, calibration workers and the store's owner.

- :class:`SegmenterTrainer` trains a round's models (``TrainContext.train``), reading its inputs from the store.
- :class:`CalibrationWorker` labels batches (``rounds.steps.label_cases``): segmenter inference and DDIM
  calibration in one process, on the worker's GPU share when it has one, results written straight into the
  store's chunk of the batch.
- :class:`StoreOwner` hosts round begin/commit and group attributes; :class:`OwnedStore` is the coordinator's
  view of it with the store's own API.

Weights travel once per round: the driver ``ray.put``s the round's models and hands each batch the same object
reference (wrapped in a list so Ray does not resolve it per call); a worker fetches and builds the models only
when the round changes, so a restarted worker also recovers by itself.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import numpy as np
import ray
import torch

from caudo_ray.config import RunConfig
from caudo_ray.data import LabelledCases
from caudo_ray.distributed.placement import worker_device
from caudo_ray.labelling.engine import LabelingEngine
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.rounds.executor import TrainContext, labelling_precision
from caudo_ray.rounds.steps import BatchStats, label_cases
from caudo_ray.run.logs import attach_file_log
from caudo_ray.store import PseudoLabelStore, RoundRecords
from caudo_ray.workspace import Workspace


@ray.remote(num_cpus=0)
class StoreOwner:
    """Hosts the store's owner side (group attributes, round begin and commit) on the cluster.

    It takes no CPU slot, so it never competes with trainer or workers for scheduling. It holds no state but the
    open store, so the executor places it on the driver's node and lets Ray restart it.
    """

    def __init__(self, url: str):
        self.store = PseudoLabelStore.open(url)

    def call(self, path: str, args: tuple, kwargs: dict) -> Any:
        return self.get(path)(*args, **kwargs)

    def get(self, path: str) -> Any:
        target = self.store
        for name in path.split("."):
            target = getattr(target, name)
        return target


class OwnedStore:
    """The coordinator's view of a store hosted by a :class:`StoreOwner`: the store's API, calls go to the actor.

    ``owned.rounds.commit(...)`` calls ``store.rounds.commit(...)`` in the actor; properties are read there too.
    """

    _PARTS: ClassVar[dict[str, type]] = {"rounds": RoundRecords}  # attributes of the store that are objects with an API of their own

    def __init__(self, actor, path: str = "", api: type = PseudoLabelStore):
        self._actor, self._path, self._api = actor, path, api

    def __getattr__(self, name: str):
        path = f"{self._path}{name}"
        if name in self._PARTS and self._api is PseudoLabelStore:
            return OwnedStore(self._actor, f"{path}.", self._PARTS[name])
        if isinstance(getattr(self._api, name, None), property):
            return ray.get(self._actor.get.remote(path))
        return lambda *args, **kwargs: ray.get(self._actor.call.remote(path, args, kwargs))


TRAINER_PROGRESS_LINES = 4  # per training phase, from the trainer actor to the driver's output


@ray.remote
class SegmenterTrainer:
    """Trains each round's segmenter and calibrator where the trainer's resources are.

    Started with restarts and task retries: when its process dies, Ray starts a new one and calls ``train``
    again, which resumes from the round's training checkpoint in the work dir (``TrainContext.train``).

    Its constructor takes only small arguments (a context without validation cases), which Ray passes inline and
    keeps for a restart; arguments large enough to go to the object store could be gone when a restart needs them
    (ray-project/ray#53727). The validation cases travel with each ``train`` call, whose arguments Ray keeps for
    that call's retries.
    """

    def __init__(self, ctx: TrainContext, threads: int):
        if ctx.val is not None:
            raise ValueError("pass the validation cases to train(), not to the constructor")
        torch.set_num_threads(threads)
        self.ctx = ctx
        # The trainer's own lines (a resume from a checkpoint, above all) belong in the run's log, where the work
        # dir is on this node's file system.
        log_path = Workspace.of(ctx.cfg).log_path
        if log_path.parent.is_dir():
            attach_file_log(log_path)

    def train(
        self,
        r: int,
        previous: RoundModels | None,
        with_calibrator: bool = True,
        val: LabelledCases | None = None,
        progress: bool = True,
    ) -> RoundModels:
        """``TrainContext.train`` of round ``r``, scoring the models on the validation cases ``val`` when given and,
        with ``progress``, printing where training is (:data:`TRAINER_PROGRESS_LINES` lines per phase)."""
        # Copies: arrays from the object store are read-only, which torch.from_numpy warns about.
        ctx = self.ctx if val is None else dataclasses.replace(self.ctx, val=dataclasses.replace(val, images=np.array(val.images), labels=np.array(val.labels)))
        if progress:
            # Lines, not a progress bar: Ray forwards this process's output to the driver line by line.
            print(f"round {r}: training the segmenter{' and calibrator' if with_calibrator else ''}", flush=True)
        lines = TRAINER_PROGRESS_LINES if progress else 0
        return ctx.train(r, previous, with_calibrator=with_calibrator, progress_lines=lines)

    def pid(self) -> int:
        return os.getpid()


@ray.remote
class CalibrationWorker:
    """Labels batches of one round; builds the round's models once, on the first batch of that round.

    ``engine_factory(cfg, models, device)`` builds what labels a batch (``label_batch``); the throughput
    benchmark swaps in a no-op engine to measure the coordinator and store alone.
    """

    def __init__(self, cfg: RunConfig, store_url: str, threads: int, engine_factory=LabelingEngine):
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.engine_factory = engine_factory
        self.store = PseudoLabelStore.open(store_url)
        self.device = worker_device(cfg.device, ray.get_gpu_ids(), torch.cuda.is_available())
        self.engine: LabelingEngine | None = None
        self.version: str | None = None

    def label(self, r: int, models_ref: list, indices: np.ndarray) -> BatchStats:
        version = f"{r}:{models_ref[0].hex()}"
        if self.version != version:
            self.engine = self.engine_factory(self.cfg, ray.get(models_ref[0]), self.device)
            self.version = version
        with labelling_precision(self.cfg.runtime.autocast, self.device):
            return label_cases(self.engine, self.store, r, indices)

    def pid(self) -> int:
        return os.getpid()

    def where(self) -> dict[str, Any]:
        """Where this worker runs: pid, Ray node id, GPU ids Ray gave it, torch device."""
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "device": str(self.device),
        }
