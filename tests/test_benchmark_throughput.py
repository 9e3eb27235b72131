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
    "ratio_pipeline_vs_bare",
    "scaling_2w_vs_1w",
    "memory_ratio_10k_vs_1k",
    "noop_ceiling_cases_per_s",
)


# Measured 4 min at load average 6 on 2 shared cores, mostly starting three worker pools (torch/MONAI imports).
@pytest.mark.slow
def test_quick_profile_writes_every_field_and_logs_to_mlflow(ray_session, tmp_path, monkeypatch):
    # Imported as a package module so Ray workers (PYTHONPATH = repo root) can unpickle its NoopEngine.
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    throughput = importlib.import_module("benchmarks.throughput")
    work, out = tmp_path / "work", tmp_path / "throughput.json"
    throughput.main(["--quick", "--work-dir", str(work), "--out", str(out)])

    report = json.loads(out.read_text())
    for key in HEADLINE:
        assert math.isfinite(report[key]) and report[key] > 0, key
    small, large = throughput.PROFILES["quick"].memory_counts
    assert set(report["driver_peak_rss_mb"]) == {str(small), str(large)}
    assert all(v > 0 for v in report["driver_peak_rss_mb"].values())
    assert report["memory_ratio_10k_vs_1k"] == report["driver_peak_rss_mb"][str(large)] / report["driver_peak_rss_mb"][str(small)]
    assert set(report["goals"]) == set(throughput.GOALS)
    assert set(report["per_case_ms"]) == {"bare", "pipeline_1w", "pipeline_2w"}
    # the real models spend time in both stages; the store write is timed by the workers
    assert report["per_case_ms"]["pipeline_1w"]["ddim_ms_per_case"] > 0
    assert report["per_case_ms"]["pipeline_1w"]["store_write_ms_per_case"] > 0
    assert not (work / "model.zarr").exists() and not (work / "noop.zarr").exists()

    run = MlflowClient(tracking_uri=report["mlflow_tracking_uri"]).get_run(report["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["bench/bare_cases_per_s"] == report["bare_cases_per_s"]
    assert run.data.metrics[names.CASES_PER_S] == report["pipeline_1w_cases_per_s"]
    assert names.DDIM_S_PER_CASE in run.data.metrics and names.STORE_S_PER_CASE in run.data.metrics
