"""The Ray executor: training on a trainer actor, labelling streamed through a pool of calibration workers."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from caudo_ray.distributed.actors import CalibrationWorker, OwnedStore, SegmenterTrainer, StoreOwner
from caudo_ray.distributed.cluster import init_ray
from caudo_ray.distributed.placement import check_worker_device, worker_options, workers_per_gpu
from caudo_ray.distributed.train_parallel import train_data_parallel
from caudo_ray.labelling.engine import LabelingEngine
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.rounds.executor import TrainContext
from caudo_ray.rounds.steps import BatchStats
from caudo_ray.store import PseudoLabelStore

log = logging.getLogger(__name__)


class RayExecutor:
    """Runs training on a :class:`SegmenterTrainer` and labelling on a pool of :class:`CalibrationWorker`.

    Actors start once per run and stay, since each start pays for importing torch, MONAI and diffusers. Training
    and labelling alternate, so when the cluster cannot hold the trainer and the pool at once (2 CPUs for a
    1-CPU trainer and two 1-CPU workers), each phase's actors are released before the other phase starts
    instead of waiting forever for resources.

    Args:
        ctx: the trainer's context (config, store location, validation cases).
        max_batch_retries: how often one batch may be re-queued after worker deaths before the run fails.
        max_trainer_restarts: how often the trainer's process may die (and a round's training resume from its
            checkpoint) before the run fails.
        engine_factory: what each :class:`CalibrationWorker` labels with (default: :class:`LabelingEngine`).
    """

    def __init__(
        self,
        ctx: TrainContext,
        *,
        max_batch_retries: int = 3,
        max_trainer_restarts: int = 3,
        engine_factory=LabelingEngine,
        progress: bool = True,
    ):
        check_worker_device(ctx.cfg.device, ctx.cfg.runtime)
        init_ray(ctx.cfg)
        self.ctx = ctx
        self.progress = progress  # the trainer actor prints progress lines
        self.max_batch_retries = max_batch_retries
        self.max_trainer_restarts = max_trainer_restarts
        self.engine_factory = engine_factory
        self.restarts = 0
        rt = ctx.cfg.runtime
        total = ray.cluster_resources()
        self.keep_alive = rt.num_train_workers == 1 and (
            total.get("CPU", 0) >= rt.trainer_cpus + rt.num_workers * rt.cpus_per_worker
            and total.get("GPU", 0) >= rt.trainer_gpus + rt.num_workers * rt.gpus_per_worker
        )
        self._trainer = None
        self._workers: list = []
        self._owner = None

    def owner(self, store: PseudoLabelStore) -> OwnedStore:
        """Round begin/commit and group attributes go through a :class:`StoreOwner` actor on the driver's node.

        Its node is the one whose loss ends the run anyway (the driver's); Ray restarts it if its process dies.
        """
        here = ray.get_runtime_context().get_node_id()
        self._owner = StoreOwner.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True), max_restarts=-1, max_task_retries=3
        ).remote(store.url)
        return OwnedStore(self._owner)

    def train(self, r: int, previous: RoundModels | None, *, with_calibrator: bool = True) -> RoundModels:
        rt = self.ctx.cfg.runtime
        if rt.num_train_workers > 1:
            self._release_workers()  # Ray Train's workers need the resources the pool holds
            return train_data_parallel(self.ctx, r, previous, with_calibrator)
        self._start_trainer()
        try:
            return ray.get(self._trainer.train.remote(r, previous, with_calibrator, self.ctx.val, self.progress))
        finally:
            if not self.keep_alive:
                self._release_trainer()

    def _start_trainer(self) -> None:
        if self._trainer is None:
            rt = self.ctx.cfg.runtime
            self._trainer = SegmenterTrainer.options(
                num_cpus=rt.trainer_cpus,
                num_gpus=rt.trainer_gpus,
                max_restarts=self.max_trainer_restarts,
                max_task_retries=self.max_trainer_restarts,
            ).remote(dataclasses.replace(self.ctx, val=None), max(1, int(rt.trainer_cpus)))

    def label(self, r: int, models: RoundModels, batches: Iterable[np.ndarray]) -> Iterator[BatchStats]:
        rt = self.ctx.cfg.runtime
        if not self._workers:
            options = worker_options(rt)
            self._workers = [
                CalibrationWorker.options(**options).remote(self.ctx.cfg, self.ctx.store_url, rt.threads_per_worker, self.engine_factory)
                for _ in range(rt.num_workers)
            ]
            shared = f", {workers_per_gpu(rt)} per GPU" if rt.gpus_per_worker else ""
            log.info(
                "starting %d calibration workers (%g CPU, %g GPU each%s; preferred nodes: %s)",
                rt.num_workers, rt.cpus_per_worker, rt.gpus_per_worker, shared, rt.worker_labels or "any",
            )  # fmt: skip
        try:
            yield from self._stream(r, [ray.put(models)], batches, self._workers)
        finally:
            if not self.keep_alive:
                self._release_workers()

    def _stream(self, r: int, models_ref: list, batches: Iterable[np.ndarray], workers: list) -> Iterator[BatchStats]:
        limit = self.ctx.cfg.runtime.max_in_flight
        source = iter(batches)
        retry: deque[tuple[np.ndarray, int]] = deque()
        in_flight: dict[Any, tuple[int, np.ndarray, int]] = {}  # ref -> (worker, indices, attempts)
        load = [0] * len(workers)
        # A worker whose batch failed gets no new batch until a readiness probe (its pid() call) answers: a
        # restarting actor refuses tasks at once, which would burn a batch's retries in milliseconds.
        probes: dict[Any, int] = {}  # probe ref -> worker
        exhausted = False
        while True:
            up = [i for i in range(len(workers)) if i not in probes.values()]
            while up and min(load[i] for i in up) < limit and (retry or not exhausted):
                if retry:
                    indices, attempts = retry.popleft()
                else:
                    indices, attempts = next(source, None), 0
                    if indices is None:
                        exhausted = True
                        break
                w = min(up, key=load.__getitem__)
                in_flight[workers[w].label.remote(r, models_ref, indices)] = (w, indices, attempts)
                load[w] += 1
            if not in_flight and not (probes and (retry or not exhausted)):
                return  # nothing running, and no work waiting for a restarting worker
            [done], _ = ray.wait(list(in_flight) + list(probes), num_returns=1)
            if done in probes:
                w = probes.pop(done)
                try:
                    ray.get(done)
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    time.sleep(0.5)  # still restarting: ask again shortly instead of spinning
                    probes[workers[w].pid.remote()] = w
                continue
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
                if w not in probes.values():
                    probes[workers[w].pid.remote()] = w
                continue
            yield stats

    def _release_trainer(self) -> None:
        if self._trainer is not None:
            ray.kill(self._trainer)
            self._trainer = None

    def _release_workers(self) -> None:
        for w in self._workers:
            ray.kill(w)
        self._workers = []

    def close(self) -> None:
        """Release the run's actors; the Ray cluster itself belongs to the caller."""
        self._release_trainer()
        self._release_workers()
        if self._owner is not None:
            ray.kill(self._owner)
            self._owner = None
