"""CI smoke test of benchmarks/accuracy.py: the fast profile with tiny networks on a handful of HC18 cases."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
from conftest import HC18, REPO_ROOT

from caudo_ray.config import load_config
from caudo_ray.store import PseudoLabelStore


def _load_benchmark(name: str = "accuracy"):
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through the module's entry
    spec.loader.exec_module(module)
    return module


ACDC = REPO_ROOT.parent / "shared" / "data" / "acdc"


def _check_summaries(report: dict, level: str) -> None:
    """Every method's summary is the mean of its draws, and each draw's Dice the mean of its cases (or volumes)."""
    for name, m in report["methods"].items():
        per_draw = [d[level]["dice"] for d in m["draws"]]
        assert m[level]["dice_per_draw"] == pytest.approx(per_draw, abs=1e-9), name
        assert m[level]["dice_mean"] == pytest.approx(float(np.mean(per_draw)), abs=1e-9), name
        for d in m["draws"]:
            cases = d[level]["dice_per_volume"].values() if level == "volume" else d[level]["dice_per_case"]
            assert d[level]["dice"] == pytest.approx(float(np.mean(list(cases))), abs=1e-6), name
        assert m["wall_s"] > 0


def test_fast_smoke_on_hc18_writes_every_field(tmp_path, capsys):
    if not (HC18 / "images").is_dir():
        pytest.skip(f"HC18 not found at {HC18}")
    bench = _load_benchmark()
    out = tmp_path / "accuracy.json"
    bench.main(["--fast", "--smoke", "--limit", "12", "--work-dir", str(tmp_path / "work"), "--out", str(out)])

    report = json.loads(out.read_text())
    assert report["profile"] == "fast" and report["smoke"] is True
    assert report["group_column"] == "exam_id"
    assert report["working_size"] == [32, 32] and report["metric_level"] == "slice"
    assert report["labelled_sets"][0]["kind"] == "cases" and len(report["labelled_sets"][0]["ids"]) == 1
    assert set(report["methods"]) == set(bench.METHODS)
    _check_summaries(report, "slice")
    # HC18's PNGs get meta.csv's pixel size (at full resolution: doubled), so HD95 is in millimetres.
    assert all(m["slice"]["hd95_unit"] == "mm" and "hd95_mm" in m["draws"][0]["slice"] for m in report["methods"].values())
    assert report["methods"]["supervised_3x"]["draws"][0]["labelled"] == report["methods"]["supervised"]["draws"][0]["labelled"]
    # A smoke budget cannot separate the methods, and the report says so instead of ranking them.
    gap = report["methods"]["supervised"]["slice"]["dice_mean"] - report["methods"]["exemplar_only"]["slice"]["dice_mean"]
    assert report["supervised_minus_exemplar_only"] == pytest.approx(gap)
    assert report["separates_methods"] is (gap >= bench.SEPARATION)
    assert ("too small to separate the methods" in capsys.readouterr().out) is (gap < bench.SEPARATION)

    rounds = report["config"]["rounds"]
    caudo_rows = [row for row in report["pseudo_labels"] if row["method"] == "caudo"]
    assert [row["round"] for row in caudo_rows] == list(range(rounds))
    for row in report["pseudo_labels"]:
        assert row["calibration_gain"] == pytest.approx(row["calibrated_dice"] - row["initial_dice"], abs=1e-6)
        assert 0.0 <= row["round_model_test_dice"] <= 1.0
    plain = [row for row in report["pseudo_labels"] if row["method"] == "self_training"]
    assert all(row["initial_dice"] == row["calibrated_dice"] for row in plain)  # no calibration, no change
    # Reliability must rank the pool's calibrated labels by their true Dice without seeing it: 0.19 and 0.31 in the
    # two rounds of this smoke (mean 0.25); reliability taken as plain agreement gives NaN, an inverted one -0.14.
    assert np.isfinite(report["reliability_spearman"]) and report["reliability_spearman"] >= 0.1, report["reliability_spearman"]
    # The ablation of calibration: the same loop without it, its labels untouched, compared draw by draw.
    uncalibrated = [row for row in report["pseudo_labels"] if row["method"] == "caudo_uncalibrated"]
    assert [row["round"] for row in uncalibrated] == list(range(rounds))
    assert all(row["initial_dice"] == row["calibrated_dice"] and row["calibrator_train_s"] == 0.0 for row in uncalibrated)
    assert caudo_rows[0]["calibrator_train_s"] > 0.0  # trained once, in round 0; later rounds reuse it by default
    assert all(0.0 <= row["exemplar_view_dice"] <= 1.0 for row in caudo_rows)
    (ablation,) = report["calibration_ablation"]["draws"]
    assert ablation["difference"] == pytest.approx(
        report["methods"]["caudo"]["slice"]["dice_mean"] - report["methods"]["caudo_uncalibrated"]["slice"]["dice_mean"], abs=1e-9
    )
    assert ablation["stage_s"]["caudo"]["calibrator_train_s"] == pytest.approx(sum(r["calibrator_train_s"] for r in caudo_rows), rel=1e-9)
    assert 0.0 < ablation["calibration_share_of_wall"] < 1.0

    # The ablations label pool cases with the caudo run's round-1 models and compare the gates on them.
    ablations = _load_benchmark("ablations").main(
        ["--run-dir", str(tmp_path / "work" / "draw0" / "caudo"), "--round", "1", "--cases", "4",
         "--threads", "1", "--registration", "--out", str(tmp_path / "ablations.json")]
    )
    gates = [row["gate"] for row in ablations["gates"]]
    assert gates[:2] == ["none (all changes)", "pixel only"] and len(gates) == 2 + len(ablations_bounds())
    for row in ablations["gates"]:
        assert row["gain"] == pytest.approx(row["dice"] - ablations["initial_dice"], abs=1e-6)
        assert 0.0 <= row["better"] + row["worse"] <= 1.0
    rules = {row["rule"]: row for row in ablations["label_rules"]}
    assert rules["initial label (no calibration)"]["gain"] == 0.0
    assert "gate + arbitration + class presence (the default)" in rules and len(rules) == 16 + 2 * len(ablations_confident_add())
    registration = ablations["registration"]  # the warped labels, scored as a rule and on their own, agree
    assert rules["registered exemplar alone (no segmenter)"]["dice"] == pytest.approx(registration["dice"], abs=1e-6)
    assert [row["round"] for row in registration["rounds"]] == list(range(rounds))
    assert any("the views or the rounds dispute" in rule for rule in rules)  # round 1 compares with round 0's model
    # The oracle turns only wrong agreed pixels right, which no class's Dice can lose by.
    oracle = rules["oracle: agreed pixels take q only where it is right, no class presence"]
    assert oracle["dice"] >= rules["gate + arbitration"]["dice"] - 1e-6
    flips = ablations["presence_flips"]
    assert flips["gain_from_flips"] + flips["gain_from_others"] == pytest.approx(rules["gate + arbitration"]["gain"], abs=1e-5)
    disputed = ablations["disputed"]
    assert all(0.0 <= disputed[k] <= 1.0 for k in ("share", "right_initial", "right_mirrored", "right_calibrated"))
    assert [row["round"] for row in ablations["reliability"]] == list(range(rounds))
    signals = ablations["initial_signals"]
    assert set(signals) >= {"reliability", "self-Dice", "reliability x self-Dice"}
    assert signals["reliability"] == pytest.approx(ablations["initial_reliability_spearman"], nan_ok=True)
    moved = ablations["veto"]["the calibration moves the label"]
    assert 0.0 <= moved["share"] <= 1.0 and 0.0 <= moved["errors_held"] <= 1.0
    veto = ablations["veto"]  # the union of two masks holds at least the errors of either
    assert veto["the views or the rounds dispute"]["errors_held"] >= max(veto["the views dispute"]["errors_held"], veto["round r-1's segmenter disagrees"]["errors_held"]) - 1e-9
    assert json.loads((tmp_path / "ablations.json").read_text())["cases"] == ablations["cases"] == 4


def test_self_dice_is_one_for_certain_labels_and_lower_for_unsure_ones():
    probs = np.zeros((3, 2, 8, 8), np.float32)
    probs[:, 0] = 1.0
    probs[0, :, 2:6, 2:6] = np.array([0.0, 1.0])[:, None, None]  # a certain square
    probs[2, :, 2:6, 2:6] = np.array([0.4, 0.6])[:, None, None]  # the same square at 0.6: 2 * 9.6 / (9.6 + 16)
    got = _load_benchmark("ablations").self_dice(probs)
    np.testing.assert_allclose(got, [1.0, 1.0, 0.75], atol=1e-6)  # case 1: no foreground in label or probabilities


def ablations_bounds() -> list:
    return [b for b in _load_benchmark("ablations").CASE_BOUNDS if b != (0.0, 0.0)]


def ablations_confident_add() -> tuple:
    return _load_benchmark("ablations").CONFIDENT_ADD


def test_fast_smoke_on_acdc_reports_volume_metrics_per_class(tmp_path):
    """ACDC's published protocol: one labelled patient (patient099, every slice), 3D Dice per test volume.

    Run as the second of two draws alone (``--draw 1``), as a long profile is split across machines.
    """
    if not (ACDC / "meta.csv").is_file():
        pytest.skip(f"ACDC not found at {ACDC}")
    bench = _load_benchmark()
    report = bench.main(
        ["--data", str(ACDC), "--fast", "--smoke", "--limit", "40", "--methods", "caudo", "--draws", "2", "--draw", "1",
         "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "acdc.json")]
    )
    first, second = report["labelled_sets"]
    assert first == {"kind": "groups", "ids": ["patient099"]} and second["kind"] == "groups" and len(second["ids"]) == 1
    assert [d["draw"] for d in report["methods"]["caudo"]["draws"]] == ["draw1"] and report["only_draw"] == 1
    assert report["methods"]["caudo"]["draws"][0]["labelled"] == second["ids"]
    assert report["split"]["predefined"] is True and report["metric_level"] == "volume"
    assert report["num_classes"] == 4
    _check_summaries(report, "volume")
    for m in report["methods"].values():
        assert m["draws"][0]["volume"]["volumes"] == 40  # the standard test set: 20 patients, 2 frames each
        assert {f"dice_class{c}" for c in (1, 2, 3)} <= set(m["volume"]["per_class_mean"])
        # This copy of ACDC is PNG slices with no pixel size in meta.csv (SOURCE.md): HD95 stays in pixels, and
        # its keys say so rather than pass pixels off as millimetres.
        assert m["slice"]["hd95_unit"] == m["volume"]["hd95_unit"] == "px"
        assert {f"hd95_px_class{c}" for c in (1, 2, 3)} <= set(m["volume"]["per_class_mean"])
    assert report["separates_methods"] is None  # supervised was not run: nothing to compare

    # The ablations' volume context: each case's two adjacent slices (meta.csv's volume and slice columns), read
    # back here through the case ids' own slice numbers instead.
    run_dir = tmp_path / "work" / "draw1" / "caudo"
    store = PseudoLabelStore.open(str(run_dir / "store.zarr"), mode="r")
    done = np.flatnonzero(store.rounds.done(0))
    context = _load_benchmark("ablations").adjacent_slice_labels(store, load_config(run_dir / "config.yaml"), done, 0)
    position = {store.case_ids[i]: i for i in done}
    kept = store.rounds.read(0, done)["calibrated"]
    checked = 0
    for j, i in enumerate(done):
        volume, number = store.case_ids[i].rsplit("_slice_", 1)
        around = [position.get(f"{volume}_slice_{int(number) + d}") for d in (-1, 1)]
        labels = [kept[np.searchsorted(done, k)].astype(np.int64) for k in around if k is not None]
        if labels:
            expected = labels[0] if len(labels) == 1 else np.where(labels[0] == labels[1], labels[0], -1)
            np.testing.assert_array_equal(context[j, 0].numpy(), expected)
            checked += 1
        else:
            assert (context[j] == -1).all()
    assert checked > 0


def test_refuses_a_draw_the_profile_does_not_make(tmp_path):
    if not (HC18 / "meta.csv").is_file():
        pytest.skip(f"HC18 not found at {HC18}")
    bench = _load_benchmark()
    with pytest.raises(SystemExit, match="--draw 2: the profile draws 2 labelled sets"):
        bench.main(["--fast", "--smoke", "--limit", "12", "--draws", "2", "--draw", "2", "--work-dir", str(tmp_path / "work")])


def test_refuses_a_work_dir_it_did_not_make(tmp_path):
    bench = _load_benchmark()
    (tmp_path / "data" / "images").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    (work / "mine.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not made by this benchmark"):
        bench.main(["--fast", "--smoke", "--data", str(tmp_path / "data"), "--work-dir", str(work)])
    assert (work / "mine.txt").exists()
