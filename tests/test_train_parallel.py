"""Data-parallel training of a round through Ray Train's TorchTrainer (DDP on gloo) on a real local cluster."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_config

from caudo_ray.distributed.train_parallel import DIGESTS_NAME, train_data_parallel, weights_digest
from caudo_ray.labelling.engine import LabelingEngine
from caudo_ray.networks.segmenter import build_segmenter
from caudo_ray.rounds.executor import TrainContext
from caudo_ray.rounds.train import evaluate
from caudo_ray.run.prepare import load_labelled, prepare_run


@pytest.mark.slow
def test_round_trains_data_parallel_with_replicas_in_sync(tmp_path, ray_session):
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # Four labelled frames and 400 iterations at a higher learning rate: the least training at which the tiny
    # segmenter clearly learns the phantoms' targets (validation Dice ~0.5 against ~0.2 untrained).
    cfg = tiny_config(tmp_path / "run", **{
        "runtime.num_train_workers": 2, "runtime.trainer_cpus": 1, "split.num_exemplars": 4,
        "segmenter.channels": [8, 16, 32], "segmenter.iterations": 400, "segmenter.learning_rate": 5e-3,
    })
    prepared = prepare_run(cfg, progress=False)
    val = load_labelled(prepared, prepared.split.val)
    ctx = TrainContext(cfg, prepared.workspace.store_url, prepared.num_classes, val)

    # train_data_parallel compares the two replicas' weights after training and raises if they differ.
    models = train_data_parallel(ctx, 0, None, with_calibrator=True)

    assert models.round == 0 and models.calibrator is not None
    # Both ranks reported the digest of their replica, and they agree (Ray Train's own record of the round).
    digests = json.loads(next((tmp_path / "run" / "ray_train" / "round_0").rglob(DIGESTS_NAME)).read_text())
    net = build_segmenter(cfg.segmenter, prepared.num_classes)
    net.load_state_dict(models.segmenter)
    assert len(digests) == 2 and digests[0] == digests[1] == weights_digest(net)
    # The segmenter learnt: its validation Dice is near the single-process trainer's on the same round and far above
    # the untrained network's (each rank draws its own batches, so the two differ by more than float rounding).
    local = ctx.train(0, None, with_calibrator=False).val_metrics["dice"]
    untrained = evaluate(build_segmenter(cfg.segmenter, prepared.num_classes, seed=0), val, prepared.num_classes)["dice"]
    dice = models.val_metrics["dice"]
    print(f"val Dice: data-parallel {dice:.4f}, single-process {local:.4f}, untrained {untrained:.4f}")
    assert local > untrained + 0.2 and dice > untrained + 0.2
    assert dice >= local - 0.1
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
