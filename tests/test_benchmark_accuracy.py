"""CI smoke test of benchmarks/accuracy.py: the fast profile with tiny networks on a handful of HC18 cases."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from conftest import HC18, REPO_ROOT


def _load_benchmark(name: str = "accuracy"):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fast_smoke_on_hc18_writes_every_field(tmp_path):
    if not (HC18 / "images").is_dir():
        pytest.skip(f"HC18 not found at {HC18}")
    bench = _load_benchmark()
    out = tmp_path / "accuracy.json"
    bench.main(["--fast", "--smoke", "--limit", "12", "--work-dir", str(tmp_path / "work"), "--out", str(out)])

    report = json.loads(out.read_text())
    assert report["profile"] == "fast" and report["smoke"] is True
    assert report["group_column"] == "exam_id"
    assert report["working_size"] == [32, 32]
    assert len(report["exemplars"]) == 1
    assert set(report["methods"]) == {"exemplar_only", "self_training", "caudo", "supervised"}
    for m in report["methods"].values():
        assert 0.0 <= m["test_dice_mean"] <= 1.0
        assert len(m["test_dice_per_exemplar"]) == 1
        assert "test_hd95_mean" in m and m["wall_s"] > 0
        assert "dice_class1" in m["per_class"][0]
    rounds = report["config"]["rounds"]
    caudo_rows = [row for row in report["pseudo_labels"] if row["method"] == "caudo"]
    assert [row["round"] for row in caudo_rows] == list(range(rounds))
    for row in report["pseudo_labels"]:
        assert row["exemplar"] == report["exemplars"][0]
        assert 0.0 <= row["initial_dice"] <= 1.0 and 0.0 <= row["calibrated_dice"] <= 1.0
    plain = [row for row in report["pseudo_labels"] if row["method"] == "self_training"]
    assert all(row["initial_dice"] == row["calibrated_dice"] for row in plain)  # no calibration, no change
    assert isinstance(report["reliability_spearman"], float) or math.isnan(report["reliability_spearman"])
    # The subset is made of whole exam groups, so the split stays group-wise: no exam on both sides.
    assert report["split"]["test"] >= 1 and report["split"]["val"] >= 1

    # The ablations run on the caudo run's work dir: three calibrator variants on round 1's labels, each without
    # and with the accept gate, and the reliability factors of every round.
    ablations = _load_benchmark("ablations").main(
        ["--run-dir", str(tmp_path / "work" / report["exemplars"][0] / "caudo"), "--round", "1", "--cases", "4",
         "--finetune", "2", "--threads", "1", "--out", str(tmp_path / "ablations.json")]
    )
    variants = ["round-0 calibrator", "fine-tuned on exemplar views", "fine-tuned with pseudo pairs"]
    assert [row["variant"] for row in ablations["calibrator_variants"]] == [v + g for v in variants for g in ("", ", accept gate")]
    assert all(0.0 <= row["dice"] <= 1.0 for row in ablations["calibrator_variants"])
    # The gate keeps, per case, the more reliable of the initial and the calibrated label; the ungated row keeps all.
    assert all(0.0 <= row["accepted"] <= 1.0 for row in ablations["calibrator_variants"][1::2])
    assert all(row["accepted"] == 1.0 for row in ablations["calibrator_variants"][::2])
    assert [row["round"] for row in ablations["reliability"]] == list(range(rounds))
    assert json.loads((tmp_path / "ablations.json").read_text())["cases"] == ablations["cases"] > 0


def test_refuses_a_work_dir_it_did_not_make(tmp_path):
    bench = _load_benchmark()
    (tmp_path / "data" / "images").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not made by this benchmark"):
        bench.main(["--fast", "--smoke", "--data", str(tmp_path / "data"), "--work-dir", str(work)])
    assert (work / "mine.txt").exists()
