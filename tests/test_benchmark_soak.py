"""Smoke of benchmarks/soak.py: a small pool streamed through 2 workers while one is SIGKILLed; nothing lost."""

from __future__ import annotations

import importlib
import json

import pytest


@pytest.mark.faults
def test_soak_smoke_every_case_stored_once_despite_kills(ray_session, tmp_path):
    soak = importlib.import_module("benchmarks.soak")
    out = tmp_path / "soak.json"
    res = soak.main(
        [
            "--cases",
            "160",
            "--kill-every",
            "4",
            "--work-dir",
            str(tmp_path),
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == res
    assert res["ok"] and res["done_count"] == res["cases_returned_once"] == 160
    assert res["cases_returned_twice_or_more"] == res["cases_never_returned"] == 0
    assert res["kills"] >= 1 and res["requeued_batches"] >= 1
    assert res["driver_peak_rss_mb"] > 0 and res["cases_per_s"] > 0
