"""Ray actors around the pipeline steps, and the executor that streams batches through them.

- :class:`SegmenterTrainer` trains a round's models (``TrainContext.train``), reading its inputs from the store.
- :class:`CalibrationWorker` labels batches (``pipeline.label_cases``): segmenter inference and DDIM calibration
  in one process, results written straight into the store's per-case chunks.
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
        version = f"{r}:{models_ref[0].hex()}"
        if self.version != version:
            self.engine = LabelingEngine(self.cfg, ray.get(models_ref[0]), resolve_device(self.cfg.device))
            self.version = version
        return pipeline.label_cases(self.engine, self.store, r, indices)

    def pid(self) -> int:
        return os.getpid()


class RayExecutor:
    """Runs training on a :class:`SegmenterTrainer` and labelling on a pool of :class:`CalibrationWorker`.

    The trainer lives for one training and the worker pool for one round's labelling: the two alternate, and on
    a small machine (or a GPU cluster) each needs the CPUs/GPUs the other would otherwise hold.

    Args:
        ctx: the trainer's context (config, store location, validation cases).
        max_batch_retries: how often one batch may be re-queued after worker deaths before the run fails.
    """

    def __init__(self, ctx: TrainContext, *, max_batch_retries: int = 3):
        init_ray(ctx.cfg)
        self.ctx = ctx
        self.max_batch_retries = max_batch_retries
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
        rt = self.ctx.cfg.runtime
        workers = [
            CalibrationWorker.options(
                num_cpus=rt.cpus_per_worker, num_gpus=rt.gpus_per_worker, max_restarts=-1, max_task_retries=0
            ).remote(self.ctx.cfg, self.ctx.store_url, rt.threads_per_worker)
            for _ in range(rt.num_workers)
        ]
        try:
            yield from self._stream(r, [ray.put(models)], batches, workers)
        finally:
            for w in workers:
                ray.kill(w)

    def _stream(self, r: int, models_ref: list, batches: Iterable[np.ndarray], workers: list) -> Iterator[pipeline.BatchStats]:
        limit = self.ctx.cfg.runtime.max_in_flight
        source = iter(batches)
        retry: deque[tuple[np.ndarray, int]] = deque()
        in_flight: dict[Any, tuple[int, np.ndarray, int]] = {}  # ref -> (worker, indices, attempts)
        load = [0] * len(workers)
        exhausted = False
        while True:
            while min(load) < limit and (retry or not exhausted):
                if retry:
                    indices, attempts = retry.popleft()
                else:
                    indices, attempts = next(source, None), 0
                    if indices is None:
                        exhausted = True
                        break
                w = int(np.argmin(load))
                in_flight[workers[w].label.remote(r, models_ref, indices)] = (w, indices, attempts)
                load[w] += 1
            if not in_flight:
                return
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            w, indices, attempts = in_flight.pop(done)
            load[w] -= 1
            try:
                stats = ray.get(done)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                if attempts >= self.max_batch_retries:
                    raise RuntimeError(f"a batch of {len(indices)} cases failed {attempts + 1} times: {err}") from err
                self.restarts += 1
                log.warning("calibration worker %d died (%s); re-queueing %d cases", w, type(err).__name__, len(indices))
                retry.append((indices, attempts + 1))
                continue
            yield stats

    def close(self) -> None:
        """Nothing outlives a round or a training; the Ray cluster itself belongs to the caller."""
