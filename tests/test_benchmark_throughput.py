"""CI smoke test of benchmarks/throughput.py: the quick profile on the session's real Ray cluster."""

from __future__ import annotations

import importlib
import json
import math

import pytest
from conftest import REPO_ROOT
from mlflow import MlflowClient

from caudo_ray.tracking import names

HEADLINE = (
    "bare_cases_per_s",
    "pipeline_1w_cases_per_s",
    "pipeline_2w_cases_per_s",
    "ratio_pipeline_vs_bare",
    "scaling_2w_vs_1w",
    "noop_ceiling_cases_per_s",
)


# Measured 4 min at load average 6 on 2 shared cores, mostly starting three worker pools (torch/MONAI imports),
# and over 10 min beside a full accuracy benchmark: the timeout leaves room for a busy machine.
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_quick_profile_measures_a_batched_store_and_logs_to_mlflow(ray_session, tmp_path, monkeypatch):
    # Imported as a package module so Ray workers (PYTHONPATH = repo root) can unpickle its NoopEngine.
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    throughput = importlib.import_module("benchmarks.throughput")
    work, out = tmp_path / "work", tmp_path / "throughput.json"
    throughput.main(["--quick", "--work-dir", str(work), "--out", str(out)])

    report = json.loads(out.read_text())
    profile = throughput.PROFILES["quick"]
    assert list(report["sizes"]) == [str(s) for s in profile.sizes]
    size = report["sizes"][str(profile.sizes[0])]
    for key in HEADLINE:
        assert math.isfinite(size[key]) and size[key] > 0, key
    assert set(size["goals"]) == set(throughput.SIZE_GOALS)
    assert set(size["per_case_ms"]) == {"bare", "pipeline_1w", "pipeline_2w"}
    # the real models spend time in both stages; store reads and writes are timed by the workers
    assert size["per_case_ms"]["pipeline_1w"]["ddim_ms_per_case"] > 0
    assert size["per_case_ms"]["pipeline_1w"]["store_write_ms_per_case"] > 0

    # The no-op ceiling is measured at each batch size, with the store's own stages timed. How fast is the
    # benchmark's figure, not this test's: rates move with the machine's load (one chunk per batch is checked
    # structurally in test_store.py).
    noop = size["noop_local_per_case_ms_by_batch_size"]
    assert set(noop) == set(size["noop_ceiling_by_batch_size"]) == {str(b) for b in profile.ceiling_batch_sizes}
    for batch in profile.ceiling_batch_sizes:
        assert math.isfinite(size["noop_ceiling_by_batch_size"][str(batch)]) and size["noop_ceiling_by_batch_size"][str(batch)] > 0
        assert noop[str(batch)]["store_write_ms_per_case"] > 0 and noop[str(batch)]["store_read_ms_per_case"] > 0
    # The driver holds indices, never images: its memory does not grow with the pool.
    assert report["memory_ratio_10k_vs_1k"] <= throughput.MEMORY_GOAL
    assert not (work / "model.zarr").exists() and not (work / "noop.zarr").exists()

    run = MlflowClient(tracking_uri=report["mlflow_tracking_uri"]).get_run(report["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics[f"bench/sizes.{profile.sizes[0]}.bare_cases_per_s"] == size["bare_cases_per_s"]
    assert run.data.metrics[names.CASES_PER_S] == size["pipeline_1w_cases_per_s"]
    assert names.DDIM_S_PER_CASE in run.data.metrics and names.STORE_S_PER_CASE in run.data.metrics
