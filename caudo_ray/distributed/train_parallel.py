"""Data-parallel training of a round through Ray Train's TorchTrainer (DDP)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from caudo_ray.networks.bundle import RoundModels
from caudo_ray.rounds.executor import TrainContext
from caudo_ray.workspace import Workspace

DIGESTS_NAME = "replica_digests.json"  # in a round's Ray Train checkpoint: each rank's weights_digest, by rank


class ReplicasDivergedError(RuntimeError):
    """The data-parallel replicas of the segmenter ended training with different weights."""


def weights_digest(model: torch.nn.Module) -> str:
    """A content hash of a model's state dict (DDP's ``module.`` prefix left out)."""
    h = hashlib.sha256()
    for key, value in sorted(getattr(model, "module", model).state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_data_parallel(ctx: TrainContext, r: int, previous: RoundModels | None, with_calibrator: bool) -> RoundModels:
    """Train a round's models with Ray Train's TorchTrainer over ``runtime.num_train_workers`` workers (DDP).

    Every worker runs the same ``TrainContext.train`` with its model wrapped by ``prepare_model``; rank 0 trains
    the calibrator afterwards and reports the round's models as a Ray Train checkpoint. After the segmenter's
    training the ranks compare their weights: DDP keeps replicas identical only while every rank runs the same
    iterations on the same initial weights, and a round whose replicas diverged is refused rather than kept.

    Raises:
        ReplicasDivergedError: the ranks' segmenters differ after training.
    """
    rt = ctx.cfg.runtime

    def loop() -> None:
        torch.set_num_threads(max(1, int(rt.trainer_cpus)))
        context = ray.train.get_context()
        rank = context.get_world_rank()
        replica: list[torch.nn.Module] = []

        def wrap(net: torch.nn.Module) -> torch.nn.Module:
            replica.append(ray.train.torch.prepare_model(net))
            return replica[0]

        models = ctx.train(r, previous, with_calibrator=with_calibrator, wrap_model=wrap, rank=rank)
        digests: list[str | None] = [None] * context.get_world_size()
        torch.distributed.all_gather_object(digests, weights_digest(replica[0]))
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if models is not None:
                models.save(Path(tmp) / "models.pt")
                # Kept with the round's checkpoint: the record that every replica ended with the same weights.
                (Path(tmp) / DIGESTS_NAME).write_text(json.dumps(digests))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({"round": r, "replica_digests": digests}, checkpoint=checkpoint)

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
    digests = result.metrics["replica_digests"]
    if len(set(digests)) != 1:
        raise ReplicasDivergedError(f"round {r}: the {len(digests)} data-parallel replicas ended with different weights {digests}")
    with result.checkpoint.as_directory() as path:
        return RoundModels.load(Path(path) / "models.pt")
