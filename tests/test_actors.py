"""The Ray runtime end to end on a real local cluster (2 CPUs): trainer actor, 2 calibration workers, MLflow."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_config
from test_coordinator import assert_complete_run, assert_mlflow_run

from caudo_ray.run.coordinator import Coordinator
from caudo_ray.store import PseudoLabelStore


@pytest.fixture(scope="module")
def runs(ray_session, tmp_path_factory):
    """The same tiny two-round config run on Ray (2 workers, 1 CPU each) and in this process."""
    from caudo_ray.distributed.executor import RayExecutor

    root = tmp_path_factory.mktemp("ray")
    # A 0-CPU trainer fits beside both 1-CPU workers on the 2-CPU cluster, so all actors start once per run
    # (training and labelling alternate, so they never compete for the cores).
    ray_cfg = tiny_config(
        root / "ray", **{"runtime.use_ray": True, "runtime.num_workers": 2, "runtime.cpus_per_worker": 1, "runtime.trainer_cpus": 0}
    )
    local_cfg = tiny_config(root / "local")
    assert ray_cfg.method_hash() == local_cfg.method_hash()
    ray_result = Coordinator(ray_cfg, executor_factory=RayExecutor, progress=False).run()
    local_result = Coordinator(local_cfg, progress=False).run()
    return ray_cfg, ray_result, local_result


def test_ray_run_fills_the_store_and_mlflow(runs):
    cfg, result, _ = runs
    store = assert_complete_run(cfg, result)
    assert result.recomputed == cfg.rounds * int(store.usable_mask().sum())
    assert_mlflow_run(cfg, result)


def test_ray_results_equal_the_local_executors(runs):
    """Ray changes where the work runs, never what it computes (CPU, seeded training, deterministic DDIM)."""
    cfg, ray_result, local_result = runs
    a, b = PseudoLabelStore.open(ray_result.store_url), PseudoLabelStore.open(local_result.store_url)
    assert a.case_ids == b.case_ids
    for r in range(cfg.rounds):
        x, y = a.rounds.read(r), b.rounds.read(r)
        np.testing.assert_array_equal(x["initial"], y["initial"])
        np.testing.assert_array_equal(x["calibrated"], y["calibrated"])
        for name in ("reliability", "agreement", "confidence", "entropy", "area", "initial_dice", "calibrated_dice"):
            np.testing.assert_array_equal(x["scores"][name], y["scores"][name], err_msg=f"round {r} {name}")
        np.testing.assert_array_equal(a.rounds.selected(r), b.rounds.selected(r))
    assert ray_result.final_metrics == local_result.final_metrics
    # Each round's segmenter is scored on the validation cases in the trainer actor too (they travel with each
    # train call, not with the actor's constructor).
    ray_val, local_val = [r["val"] for r in ray_result.rounds], [r["val"] for r in local_result.rounds]
    assert ray_val == local_val and all("dice" in v for v in ray_val)
