"""The drift guard: its rule on readings, and a real run whose round drifts, stopped with the better segmenter kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import tiny_config
from mlflow import MlflowClient

from caudo_ray.cli import _guard_line
from caudo_ray.config import GuardConfig
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.rounds import guard
from caudo_ray.run.coordinator import Coordinator
from caudo_ray.store import PseudoLabelStore
from caudo_ray.tracking import names
from caudo_ray.workspace import Workspace

ON = GuardConfig(enabled=True, tolerance=0.05, class_tolerance=0.15)


def test_first_segmenter_is_kept():
    assert guard.judge([{"dice_class1": 0.4}], ON) == guard.Verdict(False, 0, -np.inf, -np.inf)


def test_improving_rounds_keep_the_latest():
    history = [{"dice_class1": 0.6}, {"dice_class1": 0.7}, {"dice_class1": 0.8}]
    verdict = guard.judge(history, ON)
    assert not verdict.regressed and verdict.best == 2
    assert verdict.drop == pytest.approx(-0.1, abs=1e-9)


def test_a_wobble_within_tolerance_is_no_regression():
    verdict = guard.judge([{"dice_class1": 0.80}, {"dice_class1": 0.77}], ON)
    assert not verdict.regressed and verdict.best == 1
    assert verdict.drop == pytest.approx(0.03, abs=1e-9)


def test_a_drop_beyond_tolerance_keeps_the_best_earlier():
    history = [{"dice_class1": 0.70}, {"dice_class1": 0.82}, {"dice_class1": 0.74}]
    verdict = guard.judge(history, ON)
    assert verdict.regressed and verdict.best == 1
    assert verdict.drop == pytest.approx(0.08, abs=1e-9)


def test_one_class_collapsing_is_a_regression_even_when_the_mean_rises():
    # The mean rises (0.60 -> 0.62), but class 2 is lost by 0.18: a structure lost is a regression.
    history = [{"dice_class1": 0.60, "dice_class2": 0.60}, {"dice_class1": 0.82, "dice_class2": 0.42}]
    verdict = guard.judge(history, ON)
    assert verdict.regressed and verdict.best == 0
    assert verdict.drop == pytest.approx(-0.02, abs=1e-9)
    assert verdict.class_drop == pytest.approx(0.18, abs=1e-9)


def test_a_class_traded_within_its_tolerance_is_no_regression():
    # ACDC fast, the loop without calibration, round 0 -> round 1 (exemplar views, per class): the left ventricle
    # fell by 0.111 while the others rose and the mean fell by 0.009; test Dice rose 4.9 points on the mean.
    history = [
        {"dice_class1": 0.171, "dice_class2": 0.363, "dice_class3": 0.459},
        {"dice_class1": 0.222, "dice_class2": 0.397, "dice_class3": 0.348},
    ]
    verdict = guard.judge(history, ON)
    assert not verdict.regressed and verdict.best == 1
    assert verdict.drop == pytest.approx(0.026 / 3, abs=1e-9)
    assert verdict.class_drop == pytest.approx(0.111, abs=1e-9)
    # Judged on each class at the mean's tolerance, as the guard once was, it stopped that run.
    assert guard.judge(history, GuardConfig(tolerance=0.05, class_tolerance=0.05)).regressed


def test_the_mean_falling_beyond_tolerance_is_a_regression_with_no_class_collapsed():
    history = [{"dice_class1": 0.70, "dice_class2": 0.70}, {"dice_class1": 0.62, "dice_class2": 0.66}]
    verdict = guard.judge(history, ON)
    assert verdict.regressed and verdict.best == 0
    assert verdict.drop == pytest.approx(0.06, abs=1e-9)
    assert verdict.class_drop == pytest.approx(0.08, abs=1e-9)


def test_disabled_guard_reports_but_never_stops():
    history = [{"dice_class1": 0.9}, {"dice_class1": 0.2}]
    verdict = guard.judge(history, GuardConfig(enabled=False))
    assert not verdict.regressed and verdict.best == 1
    assert verdict.drop == pytest.approx(0.7, abs=1e-9)


def test_empty_history_is_refused():
    with pytest.raises(ValueError, match="at least one"):
        guard.judge([], ON)


def test_reading_takes_the_per_class_dice_only():
    models = RoundModels(0, 3, 8, {}, None, exemplar_metrics={"dice": 0.5, "dice_class1": 0.4, "dice_class2": 0.6})
    assert guard.reading(models) == {"dice_class1": 0.4, "dice_class2": 0.6}


def test_a_drifted_round_stops_the_run_and_the_earlier_segmenter_is_served(tmp_path):
    """A real drift, made on purpose: round 0's committed labels are replaced by labels that take the whole frame
    for the target (what a round that drifted onto the background would write), and round 1 is trained again from
    them. It segments the exemplars' views worse than round 0, so the rerun stops at round 1 and serves round 0's
    segmenter."""
    cfg = tiny_config(
        tmp_path / "run",
        **{
            "guard.enabled": True,
            "guard.tolerance": 0.1,  # the honest rounds of this small model wobble by up to 0.05
            "data.working_size": [48, 48],
            "segmenter.channels": [8, 16, 32],
            "segmenter.iterations": 300,
            "segmenter.finetune_iterations": 150,
            "selection.fractions": [1.0, 1.0],
        },
    )
    first = Coordinator(cfg, progress=False).run()
    assert first.guard["regressed_at"] is None, first.guard  # the honest run does not trip the guard
    ws = Workspace(Path(cfg.work_dir))
    labels = zarr.open_group(str(ws.root / "store.zarr"), mode="r+")["rounds/0/labels"]
    labels[:, 1] = 1  # calibrated
    labels[:, 2] = 1  # proposed
    for path in (ws.model_path(1), ws.checkpoint_path(1), ws.trained_final_path, ws.checkpoint_path(cfg.rounds)):
        path.unlink(missing_ok=True)

    second = Coordinator(cfg, progress=False).run()

    readings = second.guard["readings"]
    assert len(readings) == 2  # round 0, then round 1, where the rounds stopped; no final segmenter was trained
    assert readings[0]["dice_class1"] - readings[1]["dice_class1"] > cfg.guard.tolerance, readings
    assert second.guard == {"readings": readings, "kept": 0, "regressed_at": 1}
    assert not ws.trained_final_path.exists()
    served, round0 = RoundModels.load(ws.final_model_path), RoundModels.load(ws.model_path(0))
    assert served.calibrator is None
    for key, value in round0.segmenter.items():
        assert torch.equal(served.segmenter[key], value), key
    tags = MlflowClient(tracking_uri=second.tracking_uri).get_run(second.run_id).data.tags
    assert tags[names.TAG_GUARD_KEPT] == "0" and tags[names.TAG_GUARD_STOPPED] == "1"
    # MLflow holds each reading, on the mean and per class, at the segmenter's step (the rerun logs rounds 0 and 1
    # again into the first run's MLflow run, which also holds the first run's final segmenter at step 2).
    client = MlflowClient(tracking_uri=second.tracking_uri)
    for key in (names.GUARD_EXEMPLAR_DICE, f"{names.GUARD_EXEMPLAR_DICE}_class1"):
        latest = {m.step: m.value for m in sorted(client.get_metric_history(second.run_id, key), key=lambda m: m.timestamp)}
        assert {0, 1} <= latest.keys(), key
        for step in (0, 1):
            assert latest[step] == pytest.approx(readings[step]["dice_class1"], abs=1e-6), (key, step)
    # The store keeps what was committed: nothing is rewritten by a stop.
    assert PseudoLabelStore.open(second.store_url).rounds.committed() == [0, 1]


def test_the_run_line_names_the_readings_and_the_segmenter_served():
    stopped = {"readings": [{"dice_class1": 0.8, "dice_class2": 0.6}, {"dice_class1": 0.5, "dice_class2": 0.6}], "kept": 0, "regressed_at": 1}
    assert _guard_line(stopped, rounds=3) == (
        "drift guard: exemplar-view Dice 0.700, 0.550 (rounds 0.., then the final segmenter); "
        "round 1 regressed, so the rounds stopped; serving round 0"
    )
    full = {"readings": [{"dice_class1": 0.7}, {"dice_class1": 0.8}, {"dice_class1": 0.81}], "kept": 2, "regressed_at": None}
    assert _guard_line(full, rounds=2).endswith("then the final segmenter); serving the final segmenter")
