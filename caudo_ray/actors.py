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
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import ray
import torch

from caudo_ray import pipeline
from caudo_ray.config import RunConfig
from caudo_ray.coordinator import TrainContext, attach_file_log
from caudo_ray.method import LabelingEngine, RoundModels, resolve_device
from caudo_ray.store import PseudoLabelStore
from caudo_ray.workspace import Workspace

log = logging.getLogger("caudo_ray")


def init_ray(cfg: RunConfig, *, log_to_driver: bool = True) -> None:
    """Join ``runtime.address`` or start a local Ray whose dashboard listens on ``runtime.dashboard_host`` only.

    A local cluster gets at least as many logical CPUs as the trainer and the worker pool ask for together, so
    both stay alive for the whole run. Training and labelling alternate and each actor pins its own torch thread
    count, so the extra logical CPUs never oversubscribe the cores.
    """
    if ray.is_initialized():
        return
    rt = cfg.runtime
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in [_project_root(), os.environ.get("PYTHONPATH", "")] if p)}}
    if rt.address:
        ray.init(address=rt.address, runtime_env=env, log_to_driver=log_to_driver)
        return
    needed = rt.trainer_cpus + rt.num_workers * rt.cpus_per_worker
    ray.init(
        num_cpus=int(max(os.cpu_count() or 1, np.ceil(needed))),
        include_dashboard=False,
        dashboard_host=rt.dashboard_host,
        runtime_env=env,
        log_to_driver=log_to_driver,
    )


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_data_parallel(ctx: TrainContext, r: int, previous: RoundModels | None, with_calibrator: bool) -> RoundModels:
    """Train a round's models with Ray Train's TorchTrainer over ``runtime.num_train_workers`` workers (DDP).

    Every worker runs the same ``TrainContext.train`` with its model wrapped by ``prepare_model``; rank 0 trains
    the calibrator afterwards and reports the round's models as a Ray Train checkpoint.
    """
    import tempfile
    from pathlib import Path

    import ray.train
    import ray.train.torch

    rt = ctx.cfg.runtime

    def loop() -> None:
        torch.set_num_threads(max(1, int(rt.trainer_cpus)))
        rank = ray.train.get_context().get_world_rank()
        models = ctx.train(r, previous, with_calibrator=with_calibrator, wrap_model=ray.train.torch.prepare_model, rank=rank)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if models is not None:
                models.save(Path(tmp) / "models.pt")
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"round": r}, checkpoint=checkpoint)

    trainer = ray.train.torch.TorchTrainer(
        loop,
        scaling_config=ray.train.ScalingConfig(
            num_workers=rt.num_train_workers,
            use_gpu=rt.trainer_gpus > 0,
            resources_per_worker={"CPU": rt.trainer_cpus, **({"GPU": rt.trainer_gpus} if rt.trainer_gpus else {})},
        ),
        run_config=ray.train.RunConfig(
            name=f"round_{r}" if with_calibrator else "final",
            storage_path=str(Path(ctx.cfg.work_dir).resolve() / "ray_train"),
            # A dead worker restarts the group; the round then trains again from its start (no mid-round
            # checkpoints across ranks).
            failure_config=ray.train.FailureConfig(max_failures=2),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as path:
        return RoundModels.load(Path(path) / "models.pt")


@ray.remote(num_cpus=0)
class StoreOwner:
    """Hosts the store's owner side (group attributes, round begin and commit) on the cluster.

    It takes no CPU slot, so it never competes with trainer or workers for scheduling.
    """

    def __init__(self, url: str):
        self.store = PseudoLabelStore.open(url)

    def call(self, name: str, args: tuple, kwargs: dict) -> Any:
        return getattr(self.store, name)(*args, **kwargs)

    def get(self, name: str) -> Any:
        return getattr(self.store, name)


class OwnedStore:
    """The coordinator's view of a store hosted by a :class:`StoreOwner`: same API, calls go to the actor."""

    def __init__(self, actor):
        self._actor = actor

    def __getattr__(self, name: str):
        if isinstance(getattr(PseudoLabelStore, name, None), property):
            return ray.get(self._actor.get.remote(name))
        return lambda *args, **kwargs: ray.get(self._actor.call.remote(name, args, kwargs))


@ray.remote
class SegmenterTrainer:
    """Trains each round's segmenter and calibrator where the trainer's resources are.

    Started with restarts and task retries: when its process dies, Ray starts a new one and calls ``train``
    again, which resumes from the round's training checkpoint in the work dir (``TrainContext.train``).
    """

    def __init__(self, ctx: TrainContext, threads: int):
        torch.set_num_threads(threads)
        self.ctx = ctx
        # The trainer's own lines (a resume from a checkpoint, above all) belong in the run's log, where the work
        # dir is on this node's file system.
        log_path = Workspace.of(ctx.cfg).log_path
        if log_path.parent.is_dir():
            attach_file_log(log_path)

    def train(self, r: int, previous: RoundModels | None, with_calibrator: bool = True) -> RoundModels:
        return self.ctx.train(r, previous, with_calibrator=with_calibrator)

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
        self.engine: LabelingEngine | None = None
        self.version: str | None = None

    def label(self, r: int, models_ref: list, indices: np.ndarray) -> pipeline.BatchStats:
        version = f"{r}:{models_ref[0].hex()}"
        if self.version != version:
            self.engine = self.engine_factory(self.cfg, ray.get(models_ref[0]), resolve_device(self.cfg.device))
            self.version = version
        return pipeline.label_cases(self.engine, self.store, r, indices)

    def pid(self) -> int:
        return os.getpid()


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

    def __init__(self, ctx: TrainContext, *, max_batch_retries: int = 3, max_trainer_restarts: int = 3, engine_factory=LabelingEngine):
        init_ray(ctx.cfg)
        self.ctx = ctx
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
        """Round begin/commit and group attributes go through a :class:`StoreOwner` actor."""
        self._owner = StoreOwner.remote(store.url)
        return OwnedStore(self._owner)

    def train(self, r: int, previous: RoundModels | None, *, with_calibrator: bool = True) -> RoundModels:
        rt = self.ctx.cfg.runtime
        if rt.num_train_workers > 1:
            self._release_workers()  # Ray Train's workers need the resources the pool holds
            return train_data_parallel(self.ctx, r, previous, with_calibrator)
        self._start_trainer()
        try:
            return ray.get(self._trainer.train.remote(r, previous, with_calibrator))
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
            ).remote(self.ctx, max(1, int(rt.trainer_cpus)))

    def label(self, r: int, models: RoundModels, batches: Iterable[np.ndarray]) -> Iterator[pipeline.BatchStats]:
        rt = self.ctx.cfg.runtime
        if not self._workers:
            self._workers = [
                CalibrationWorker.options(
                    num_cpus=rt.cpus_per_worker, num_gpus=rt.gpus_per_worker, max_restarts=-1, max_task_retries=0
                ).remote(self.ctx.cfg, self.ctx.store_url, rt.threads_per_worker, self.engine_factory)
                for _ in range(rt.num_workers)
            ]
        try:
            yield from self._stream(r, [ray.put(models)], batches, self._workers)
        finally:
            if not self.keep_alive:
                self._release_workers()

    def _stream(self, r: int, models_ref: list, batches: Iterable[np.ndarray], workers: list) -> Iterator[pipeline.BatchStats]:
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
