"""Data-parallel training of a round through Ray Train's TorchTrainer (DDP on gloo) on a real local cluster."""

import os

import numpy as np
import pytest
import torch
from conftest import tiny_config

from caudo_ray.distributed.train_parallel import train_data_parallel, weights_digest
from caudo_ray.labelling.engine import LabelingEngine
from caudo_ray.networks.segmenter import build_segmenter
from caudo_ray.rounds.executor import TrainContext
from caudo_ray.run.prepare import prepare_run


@pytest.mark.slow
def test_round_trains_data_parallel_with_replicas_in_sync(tmp_path, ray_session):
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    cfg = tiny_config(tmp_path / "run", **{"runtime.num_train_workers": 2, "runtime.trainer_cpus": 1})
    prepared = prepare_run(cfg, progress=False)
    ctx = TrainContext(cfg, prepared.workspace.store_url, prepared.num_classes)

    # train_data_parallel compares the two replicas' weights after training and raises if they differ.
    models = train_data_parallel(ctx, 0, None, with_calibrator=True)

    assert models.round == 0 and models.calibrator is not None
    assert (tmp_path / "run" / "ray_train" / "round_0").is_dir()  # Ray Train's own checkpoint of the round
    # The returned weights are usable as they are: the calibration worker's engine labels a batch with them.
    images = prepared.store.read_images(np.arange(4))
    result = LabelingEngine(cfg, models).label_batch(images)
    assert result.calibrated.shape == images.shape
    assert set(np.unique(result.calibrated)) <= {0, 1}


def test_weights_digest_tells_replicas_apart_and_ignores_the_ddp_wrapper():
    net = build_segmenter(tiny_config("unused").segmenter, 2, seed=0)
    wrapped = torch.nn.Module()
    wrapped.module = net  # how DDP holds the replica: its state dict keys gain a "module." prefix
    assert weights_digest(wrapped) == weights_digest(net)
    twin = build_segmenter(tiny_config("unused").segmenter, 2, seed=0)
    assert weights_digest(twin) == weights_digest(net)
    with torch.no_grad():
        next(twin.parameters()).view(-1)[0] += 1e-6
    assert weights_digest(twin) != weights_digest(net)
