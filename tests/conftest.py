"""Shared fixtures: tiny run configs on phantoms, one local Ray cluster per test session."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from caudo_ray.config import RunConfig, load_config
from caudo_ray.run.coordinator import Coordinator
from caudo_ray.training.checkpoint import TrainingCheckpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
HC18 = REPO_ROOT.parent / "shared" / "data" / "hc18"

# One thread per test process: the suite runs on 2 cores next to Ray workers.
torch.set_num_threads(1)


def under_ci() -> bool:
    """True on a CI runner (``CI=true``, which CI services set and ``.ci/run`` exports)."""
    return os.environ.get("CI", "").lower() in ("true", "1")


def require(present: bool, component: str, install: str) -> None:
    """Skip a test whose required component is missing, except under CI, where the skip would go unnoticed and a
    part of the suite would silently not run: there the test fails, naming the component and how to install it."""
    if present:
        return
    if under_ci():
        pytest.fail(f"{component} is missing, and CI=true requires it ({install})")
    pytest.skip(f"{component} is missing ({install})")


def tiny_config(work_dir: Path, **overrides) -> RunConfig:
    """A whole run on 32x32 phantoms with tiny networks: seconds, not minutes."""
    raw = {
        "work_dir": str(work_dir),
        # CPU always: on a CUDA torch the Ray and local runs compared bit for bit must run on the same device.
        "device": "cpu",
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
        # The page is built once, at the end: a rebuild after every round costs each run a few seconds more.
        # tests/test_annotations_midrun.py turns the rebuild on and checks it.
        "tracking": {"num_overlays": 2, "dashboard_every_round": False},
        # 20 iterations leave the exemplar-view reading noise; tests/test_guard.py turns the guard on.
        "guard": {"enabled": False},
    }
    return load_config(raw, overrides)


# Label maps are the argmax of float32 probabilities. A case labelled in another batch composition (a re-queued or
# resumed batch, another batch size) or with another thread count gets its probabilities from differently ordered
# float reductions, which may differ in the last bit; where two classes tie that closely, the argmax may differ.
LABEL_TOLERANCE = 1e-3  # share of pixels allowed to differ for that reason
SCORE_RTOL, SCORE_ATOL = 1e-5, 1e-6  # per-case scores: float32 rounding of the same reductions


class RecordingCheckpoint(TrainingCheckpoint):
    """A real checkpoint file that also keeps every state it was given, as loaded back from disk."""

    def __init__(self, path):
        super().__init__(path, key="test")
        self.states = {}

    def save(self, state):
        super().save(state)
        self.states[state["iteration"]] = self.load()


def assert_labels_close(a: np.ndarray, b: np.ndarray, what: str = "labels") -> None:
    """Label maps equal up to float32 ties (:data:`LABEL_TOLERANCE`), same shape and dtype."""
    assert a.shape == b.shape and a.dtype == b.dtype, (what, a.shape, b.shape, a.dtype, b.dtype)
    differ = float(np.mean(a != b))
    assert differ <= LABEL_TOLERANCE, f"{what}: {differ:.2%} of pixels differ"


def _nearest_sources(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source index of each output pixel whose centre is nearest, by exact integer arithmetic: ``(low, high)``,
    equal except where the centre falls exactly between two source pixels (either is a right answer there)."""
    num = (2 * np.arange(n_out) + 1) * n_in  # the output centre (i + 1/2) * n_in / n_out, times 2 n_out
    high = np.minimum(num // (2 * n_out), n_in - 1)
    low = np.where(num % (2 * n_out) == 0, np.maximum(high - 1, 0), high)
    return low, high


def assert_nearest_resize(written: np.ndarray, mask: np.ndarray, what: str = "mask", tolerance: float = 0.0) -> None:
    """``written`` is ``mask`` resized to its shape by nearest neighbour: each pixel holds the class of the source
    pixel nearest its centre. The reference is written out in numpy, not built with the resize the code uses.

    Args:
        written: the (H, W) map to check.
        mask: the (h, w) map it was resized from.
        what: names the map in the failure message.
        tolerance: share of pixels allowed to differ (for a ``mask`` that is itself a reference computed another way).
    """
    assert written.ndim == mask.ndim == 2, (what, written.shape, mask.shape)
    rows, cols = _nearest_sources(mask.shape[0], written.shape[0]), _nearest_sources(mask.shape[1], written.shape[1])
    ok = np.zeros(written.shape, bool)
    for r in rows:
        for c in cols:
            ok |= written == mask[np.ix_(r, c)]
    assert np.mean(~ok) <= tolerance, f"{what}: {np.mean(~ok):.2%} of pixels are not the nearest source pixel's class"


def assert_selection_close(a: np.ndarray, b: np.ndarray, reliability: np.ndarray) -> None:
    """Selections equal, except for cases whose reliability ties another case's to float32 rounding."""
    for i in np.flatnonzero(a != b):
        gap = np.min(np.abs(np.delete(reliability, i) - reliability[i]))
        assert gap <= SCORE_ATOL + SCORE_RTOL * abs(reliability[i]), f"case {i} selected differently (gap {gap:g})"


@pytest.fixture
def tiny_cfg(tmp_path) -> RunConfig:
    return tiny_config(tmp_path / "run")


# One round on the phantoms: fault tests compare their outcome with this config's clean run.
ONE_ROUND = {"rounds": 1, "tracking.num_overlays": 1}


@pytest.fixture(scope="session")
def clean_one_round(tmp_path_factory):
    """An uninterrupted one-round run in this process: ``(cfg, RunResult)``, the reference every fault is compared with."""
    cfg = tiny_config(tmp_path_factory.mktemp("clean") / "run", **ONE_ROUND)
    return cfg, Coordinator(cfg, progress=False).run()


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray cluster (2 CPUs) shared by the tests that need one; started once, it takes ~10 s."""
    require(importlib.util.find_spec("ray") is not None, "ray", "make venv")
    import ray
    os.environ["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
