"""Shared fixtures: tiny run configs on phantoms, one local Ray cluster per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from caudo_ray.config import RunConfig, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
HC18 = REPO_ROOT.parent / "shared" / "data" / "hc18"

# One thread per test process: the suite runs on 2 cores next to Ray workers.
torch.set_num_threads(1)


def tiny_config(work_dir: Path, **overrides) -> RunConfig:
    """A whole run on 32x32 phantoms with tiny networks: seconds, not minutes."""
    raw = {
        "work_dir": str(work_dir),
        "rounds": 2,
        "data": {
            "working_size": [32, 32],
            "phantom": {"num_labelled": 16, "num_unlabelled": 20, "size": [48, 48], "num_groups": 8, "seed": 1},
        },
        "split": {"val_fraction": 0.2, "test_fraction": 0.2},
        "segmenter": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0, "iterations": 20, "finetune_iterations": 10, "batch_size": 4},
        "calibrator": {
            "block_out_channels": [8, 16],
            "autoencoder_iterations": 10,
            "denoiser_iterations": 10,
            "batch_size": 4,
            "inference_steps": 4,
        },
        "selection": {"fractions": [0.5, 0.75], "num_queries": 5},
        "runtime": {"use_ray": False, "num_workers": 2, "batch_size": 8, "max_in_flight": 2},
        "tracking": {"num_overlays": 2},
    }
    return load_config(raw, overrides)


@pytest.fixture
def tiny_cfg(tmp_path) -> RunConfig:
    return tiny_config(tmp_path / "run")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray cluster (2 CPUs) shared by the tests that need one; started once, it takes ~10 s."""
    ray = pytest.importorskip("ray")
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
