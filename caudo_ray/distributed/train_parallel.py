"""Data-parallel training of a round through Ray Train's TorchTrainer (DDP)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from caudo_ray.networks.bundle import RoundModels
from caudo_ray.rounds.executor import TrainContext
from caudo_ray.workspace import Workspace


def train_data_parallel(ctx: TrainContext, r: int, previous: RoundModels | None, with_calibrator: bool) -> RoundModels:
    """Train a round's models with Ray Train's TorchTrainer over ``runtime.num_train_workers`` workers (DDP).

    Every worker runs the same ``TrainContext.train`` with its model wrapped by ``prepare_model``; rank 0 trains
    the calibrator afterwards and reports the round's models as a Ray Train checkpoint.
    """
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
            storage_path=str(Workspace.of(ctx.cfg).ray_train_dir.resolve()),
            # A dead worker restarts the group; the round then trains again from its start (no mid-round
            # checkpoints across ranks).
            failure_config=ray.train.FailureConfig(max_failures=2),
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as path:
        return RoundModels.load(Path(path) / "models.pt")
