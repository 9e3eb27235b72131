"""LabelingEngine.label_batch with the revert rule on, against the same engine with it off."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from conftest import tiny_config

from benchmarks.workload import untrained_models
from caudo_ray.labelling.engine import LabelingEngine


def _with(cfg, **calibrator):
    return dataclasses.replace(cfg, calibrator=dataclasses.replace(cfg.calibrator, **calibrator))


def test_revert_rule_stores_the_initial_label_where_calibration_lowered_reliability(tmp_path):
    cfg = tiny_config(tmp_path)
    models = untrained_models(cfg, 2)
    images = np.random.default_rng(0).random((8, *cfg.data.working_size), dtype=np.float32)
    plain = LabelingEngine(_with(cfg, revert_if_less_reliable=False), models, torch.device("cpu")).label_batch(images)
    out = LabelingEngine(_with(cfg, revert_if_less_reliable=True), models, torch.device("cpu")).label_batch(images)

    # A reverted case carries its initial label's scores, which beat its calibrated label's; the others are as before.
    reverted = out.scores["reliability"] > plain.scores["reliability"]
    assert reverted.any() and (~reverted).any()  # the untrained calibrator lowers some labels' reliability, not all
    np.testing.assert_array_equal(out.initial, plain.initial)
    np.testing.assert_array_equal(out.calibrated[reverted], out.initial[reverted])
    assert np.all(out.scores["accepted"][reverted] == 0.0) and np.all(out.scores["agreement"][reverted] == 1.0)
    np.testing.assert_array_equal(out.calibrated[~reverted], plain.calibrated[~reverted])
    for name, values in plain.scores.items():
        np.testing.assert_array_equal(out.scores[name][~reverted], values[~reverted])

