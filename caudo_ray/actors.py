"""Ray actors around the pipeline steps, and the executor that streams batches through them.

- :class:`SegmenterTrainer` trains a round's models (``TrainContext.train``), reading its inputs from the store.
- :class:`CalibrationWorker` labels batches (``pipeline.label_cases``): segmenter inference and DDIM calibration
  in one process, results written straight into the store's per-case chunks.
- :class:`StoreOwner` hosts the store's owner-side operations (round begin/commit, group attributes).
- :class:`RayExecutor` keeps a bounded number of batches in flight per worker (backpressure) and re-queues the
  batches of a worker that died; Ray restarts the actor (``max_restarts``).

Weights travel once per round: the driver ``ray.put``s the round's models and hands each batch the same object
reference (wrapped in a list so Ray does not resolve it per call); a worker fetches and builds the models only
when the round changes, so a restarted worker also recovers by itself.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import ray
import torch

from caudo_ray import pipeline
from caudo_ray.config import RunConfig
from caudo_ray.coordinator import TrainContext
from caudo_ray.method import LabelingEngine, RoundModels, resolve_device
from caudo_ray.store import PseudoLabelStore

log = logging.getLogger("caudo_ray")


def init_ray(cfg: RunConfig, *, log_to_driver: bool = True) -> None:
    """Join ``runtime.address`` or start a local Ray whose dashboard listens on ``runtime.dashboard_host`` only.

    A local cluster gets at least as many logical CPUs as the run asks for at once: training and labelling
    alternate within a run, and each actor pins its own torch thread count, so this cannot oversubscribe cores.
    """
    if ray.is_initialized():
        return
    rt = cfg.runtime
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in [_project_root(), os.environ.get("PYTHONPATH", "")] if p)}}
    if rt.address:
        ray.init(address=rt.address, runtime_env=env, log_to_driver=log_to_driver)
        return
    needed = max(rt.trainer_cpus, rt.num_workers * rt.cpus_per_worker)
    ray.init(
        num_cpus=int(max(os.cpu_count() or 1, np.ceil(needed))),
        include_dashboard=False,
        dashboard_host=rt.dashboard_host,
        runtime_env=env,
        log_to_driver=log_to_driver,
    )


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@ray.remote
class SegmenterTrainer:
    """Trains each round's segmenter and calibrator where the trainer's resources are."""

    def __init__(self, ctx: TrainContext, threads: int):
        torch.set_num_threads(threads)
        self.ctx = ctx

    def train(self, r: int, previous: RoundModels | None, with_calibrator: bool = True) -> RoundModels:
        return self.ctx.train(r, previous, with_calibrator=with_calibrator)


@ray.remote
class CalibrationWorker:
    """Labels batches of one round; builds the round's models once, on the first batch of that round."""

    def __init__(self, cfg: RunConfig, store_url: str, threads: int):
        torch.set_num_threads(threads)
        self.cfg = cfg
        self.store = PseudoLabelStore.open(store_url)
        self.engine: LabelingEngine | None = None
        self.version: str | None = None

    def label(self, r: int, models_ref: list, indices: np.ndarray) -> pipeline.BatchStats:
        models: RoundModels | None = None
        if self.engine is None or self.version != f"{r}:{models_ref[0].hex()}":
            models = ray.get(models_ref[0])
            self.engine = LabelingEngine(self.cfg, models, resolve_device(self.cfg.device))
            self.version = f"{r}:{models_ref[0].hex()}"
        return pipeline.label_cases(self.engine, self.store, r, indices)

    def pid(self) -> int:
        return os.getpid()


class RayExecutor:
    """Runs training on a :class:`SegmenterTrainer` and labelling on a pool of :class:`CalibrationWorker`.

    Args:
        ctx: the trainer's context (config, store location, validation cases).
        max_batch_retries: how often one batch may be re-queued after worker deaths before the run fails.
    """

    def __init__(self, ctx: TrainContext, *, max_batch_retries: int = 3):
        cfg = ctx.cfg
        init_ray(cfg)
        rt = cfg.runtime
        self.ctx = ctx
        self.max_batch_retries = max_batch_retries
        self.workers = [
            CalibrationWorker.options(
                num_cpus=rt.cpus_per_worker,
                num_gpus=rt.gpus_per_worker,
                max_restarts=-1,
                max_task_retries=0,
            ).remote(cfg, ctx.store_url, rt.threads_per_worker)
            for _ in range(rt.num_workers)
        ]
        self.restarts = 0

    def train(self, r: int, previous: RoundModels | None, *, with_calibrator: bool = True) -> RoundModels:
        rt = self.ctx.cfg.runtime
        trainer = SegmenterTrainer.options(num_cpus=rt.trainer_cpus, num_gpus=rt.trainer_gpus).remote(
            self.ctx, max(1, int(rt.trainer_cpus))
        )
        try:
            return ray.get(trainer.train.remote(r, previous, with_calibrator))
        finally:
            ray.kill(trainer)

    def label(self, r: int, models: RoundModels, batches: Iterable[np.ndarray]) -> Iterator[pipeline.BatchStats]:
        models_ref = [ray.put(models)]
        limit = self.ctx.cfg.runtime.max_in_flight
        source = iter(batches)
        retry: deque[tuple[np.ndarray, int]] = deque()
        in_flight: dict[Any, tuple[int, np.ndarray, int]] = {}  # ref -> (worker, indices, attempts)
        load = [0] * len(self.workers)

        def next_batch() -> tuple[np.ndarray, int] | None:
            if retry:
                return retry.popleft()
            batch = next(source, None)
            return None if batch is None else (batch, 0)

        exhausted = False
        while True:
            while not exhausted and min(load) < limit:
                item = next_batch()
                if item is None:
                    exhausted = True
                    break
                w = int(np.argmin(load))
                ref = self.workers[w].label.remote(r, models_ref, item[0])
                in_flight[ref] = (w, item[0], item[1])
                load[w] += 1
            if not in_flight:
                if retry:
                    exhausted = False
                    continue
                return
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            w, indices, attempts = in_flight.pop(done)
            load[w] -= 1
            try:
                yield ray.get(done)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                if attempts >= self.max_batch_retries:
                    raise RuntimeError(f"batch of {len(indices)} cases failed {attempts + 1} times: {err}") from err
                self.restarts += 1
                log.warning("worker %d died (%s); re-queueing %d cases", w, type(err).__name__, len(indices))
                retry.append((indices, attempts + 1))
                exhausted = False

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
