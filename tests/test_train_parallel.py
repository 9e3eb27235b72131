"""Data-parallel training of a round through Ray Train's TorchTrainer (DDP on gloo) on a real local cluster."""

import os

import numpy as np
import pytest
from conftest import tiny_config

from caudo_ray.rounds.executor import TrainContext
from caudo_ray.run.prepare import prepare_run


@pytest.mark.slow
def test_round_trains_data_parallel_and_matches_the_single_process_api(tmp_path, ray_session):
    from caudo_ray.distributed.train_parallel import train_data_parallel
    from caudo_ray.labelling.engine import LabelingEngine

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    cfg = tiny_config(tmp_path / "run", **{"runtime.num_train_workers": 2, "runtime.trainer_cpus": 1})
    prepared = prepare_run(cfg, progress=False)
    ctx = TrainContext(cfg, prepared.workspace.store_url, prepared.num_classes)

    models = train_data_parallel(ctx, 0, None, with_calibrator=True)

    assert models.round == 0 and models.calibrator is not None
    assert (tmp_path / "run" / "ray_train" / "round_0").is_dir()  # Ray Train's own checkpoint of the round
    # The returned weights are usable as they are: the calibration worker's engine labels a batch with them.
    images = prepared.store.read_images(np.arange(4))
    result = LabelingEngine(cfg, models).label_batch(images)
    assert result.calibrated.shape == images.shape
    assert set(np.unique(result.calibrated)) <= {0, 1}
