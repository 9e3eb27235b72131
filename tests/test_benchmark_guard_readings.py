"""benchmarks/guard_readings.py on a real finished run: the view-by-view reading repeats what the run's guard read."""

from __future__ import annotations

import importlib
import json
import shutil

import pytest


def test_readings_repeat_the_run_s_guard_and_survive_a_moved_run_dir(clean_one_round, tmp_path):
    cfg, result = clean_one_round
    moved = tmp_path / "moved"
    shutil.copytree(cfg.work_dir, moved)  # a run dir read where it was copied to, not where its config says
    bench = importlib.import_module("benchmarks.guard_readings")
    out = tmp_path / "readings.json"

    report = bench.main([str(moved), "--out", str(out)])

    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    rows = report["segmenters"]
    assert [r["segmenter"] for r in rows] == ["round 0", "final"]  # one round, then the final segmenter
    assert all(r["file"].startswith(str(moved)) for r in rows)
    for row, recorded in zip(rows, result.guard["readings"], strict=True):
        assert row["reading"].keys() == recorded.keys()
        for key, value in recorded.items():
            assert row["reading"][key] == pytest.approx(value, abs=1e-6), (row["segmenter"], key)
    final = rows[1]
    assert final["against"] == "round 0"
    for key in recorded:
        assert final["drop"][key] == pytest.approx(rows[0]["reading"][key] - final["reading"][key], abs=1e-6)
        assert final["drop_se"][key] >= 0
    assert final["guard_stops"] == (result.guard["regressed_at"] == 1)


def test_a_folder_that_is_no_run_is_refused_by_name(tmp_path):
    bench = importlib.import_module("benchmarks.guard_readings")
    with pytest.raises(SystemExit, match=r"config.yaml: no such file"):
        bench.main([str(tmp_path)])
