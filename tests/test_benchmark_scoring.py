"""CI smoke test of benchmarks/scoring.py: tiny maps, this checkout timed against itself in child processes."""

import json

import pytest

from benchmarks import scoring
from benchmarks.workload import REPO_ROOT


def test_scoring_times_two_checkouts_side_by_side(tmp_path):
    res = scoring.main(
        ["--size", "32", "--batch-size", "4", "--repeats", "2", "--rounds", "1", "--against", str(REPO_ROOT),
         "--work-dir", str(tmp_path)]
    )  # fmt: skip
    assert set(res["ms_per_case"]) == {"this checkout", "against"}
    assert all(len(v) == 2 and min(v) > 0 for v in res["runs_ms_per_case"].values())
    assert res["ratio_against_over_this"] > 0
    assert json.loads((tmp_path / "scoring.json").read_text())["size"] == 32


def test_against_must_be_a_checkout(tmp_path):
    with pytest.raises(SystemExit):
        scoring.main(["--against", str(tmp_path), "--work-dir", str(tmp_path)])
