"""Tune search over w, s and DDIM steps: pure parts without Ray, and tiny real searches on the local Ray cluster."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import tiny_config
from mlflow import MlflowClient

from caudo_ray.config import ConfigError, load_config
from caudo_ray.distributed import tune as T
from caudo_ray.tracking import names


def test_parse_space_kinds_and_counts():
    cfg = load_config(
        None,
        {
            "tune.guidance_strength": {"grid": [0, 1, 2]},
            "tune.calibration_strength": {"range": [0.2, 0.8]},
            "tune.inference_steps": {"choice": [5, 10]},
            "tune.num_samples": 2,
        },
    )
    space = T.parse_space(cfg.tune)
    assert space[names.PARAM_GUIDANCE] == T.Dimension("grid", (0.0, 1.0, 2.0))
    assert space[names.PARAM_STRENGTH] == T.Dimension("range", (0.2, 0.8))
    assert space[names.PARAM_STEPS] == T.Dimension("choice", (5, 10), integer=True)
    assert all(isinstance(v, int) for v in space[names.PARAM_STEPS].values)
    assert T.count_trials(space, cfg.tune.num_samples) == 6
    assert T.count_trials(T.parse_space(load_config().tune), 1) >= 8  # the default search covers >= 8 configs


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (
            {"tune.guidance_strength": {"grid": [1.0], "range": [0, 2]}},
            "tune.guidance_strength",
        ),
        (
            {"tune.calibration_strength": {"grid": [0.0]}},
            "tune.calibration_strength.grid[0]",
        ),
        (
            {"tune.calibration_strength": {"range": [0.9, 0.1]}},
            "tune.calibration_strength.range",
        ),
        ({"tune.inference_steps": {"choice": [2.5]}}, "tune.inference_steps.choice[0]"),
        ({"tune.guidance_strength": {"grid": []}}, "tune.guidance_strength.grid"),
        ({"tune.objective": "dice"}, "tune.objective"),
        ({"tune.reduction_factor": 1}, "tune.reduction_factor"),
        ({"tune.bogus": 1}, "tune.bogus"),
    ],
)
def test_bad_tune_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert err.value.key == key


def test_tune_section_does_not_change_method_hash():
    # A search over inference knobs must not make the work dir of a self-training run look like another run's.
    assert load_config().method_hash() == load_config(None, {"tune.num_samples": 3}).method_hash()


def test_objective_resolution():
    assert T.resolve_objective("auto", 5) == names.OBJECTIVE_VAL_DICE
    assert T.resolve_objective("auto", 0) == names.OBJECTIVE_PROXY
    assert T.resolve_objective("proxy", 5) == names.OBJECTIVE_PROXY
    with pytest.raises(ConfigError, match="tune.objective"):
        T.resolve_objective("val_dice", 0)
    assert T.num_steps(33, 16, None) == 3
    assert T.num_steps(33, 16, 2) == 2


def test_eval_tally_running_means():
    tally = T.EvalTally(names.OBJECTIVE_VAL_DICE)
    tally.add(
        {
            "reliability": np.array([0.5, 1.0]),
            "calibrated_dice": np.array([0.8, np.nan]),
            "initial_dice": np.array([0.6, np.nan]),
        }
    )
    tally.add(
        {
            "reliability": np.array([0.0]),
            "calibrated_dice": np.array([0.4]),
            "initial_dice": np.array([0.2]),
        }
    )
    m = tally.metrics()
    assert m["proxy"] == pytest.approx(0.5)
    assert m["dice"] == pytest.approx(0.6) and m["initial_dice"] == pytest.approx(0.4)
    assert m["objective"] == m["dice"]
    proxy = T.EvalTally(names.OBJECTIVE_PROXY)
    proxy.add({"reliability": np.array([0.25, 0.75])})
    assert proxy.metrics() == {"proxy": 0.5, "objective": 0.5}


def test_pick_best_prefers_complete_trials():
    p = {names.PARAM_GUIDANCE: 1.0, names.PARAM_STRENGTH: 0.5, names.PARAM_STEPS: 4}
    stopped = T.TrialOutcome("a", p, {"objective": 0.99}, steps=1)
    done = [
        T.TrialOutcome("b", p, {"objective": 0.7}, steps=3),
        T.TrialOutcome("c", p, {"objective": 0.8}, steps=3),
    ]
    assert T.pick_best([stopped, *done], full_steps=3).trial_id == "c"
    assert T.pick_best([stopped], full_steps=3).trial_id == "a"
    assert "<- best" in T.format_trials([stopped, *done], names.OBJECTIVE_VAL_DICE, done[1])


def test_trial_config_sets_only_the_searched_knobs(tiny_cfg):
    out = T.trial_config(tiny_cfg, {names.PARAM_GUIDANCE: 3.0, names.PARAM_STRENGTH: 0.4, names.PARAM_STEPS: 7.0})
    assert (
        out.calibrator.guidance_strength,
        out.calibrator.calibration_strength,
        out.calibrator.inference_steps,
    ) == (3.0, 0.4, 7)
    assert tiny_cfg.calibrator.guidance_strength != 3.0
    assert out.method_hash() != tiny_cfg.method_hash() and out.segmenter == tiny_cfg.segmenter


def _search_cfg(tmp_path, **overrides):
    return tiny_config(
        tmp_path / "run",
        **{
            "tune.guidance_strength": {"grid": [0.0, 1.0, 3.0]},
            "tune.calibration_strength": {"grid": [0.5]},
            "tune.inference_steps": {"grid": [4]},
            "tune.eval_batch_size": 1,
            "tune.eval_cases": 3,
            # 2 logical CPUs in the test cluster: half a CPU per trial leaves room for anything else alive.
            "tune.cpus_per_trial": 0.5,
            "tune.max_concurrent_trials": 2,
            "tune.grace_period": 2,
            **overrides,
        },
    )


def _runs(result: T.TuneResult):
    client = MlflowClient(tracking_uri=result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    return client, parent, children


@pytest.mark.slow
def test_tiny_search_logs_nested_runs_and_picks_the_best(tmp_path, ray_session):
    cfg = _search_cfg(tmp_path)
    result = T.run_tune(cfg, progress=False)
    assert result.objective == names.OBJECTIVE_VAL_DICE and result.eval_source == "validation"
    assert len(result.trials) == 3 and not result.models_reused
    assert result.shared_train_s > 0 and result.train_saved_s == pytest.approx(2 * result.shared_train_s)

    client, parent, children = _runs(result)
    assert parent.data.tags[names.TAG_KIND] == names.KIND_TUNE and parent.data.tags[names.TAG_OBJECTIVE] == names.OBJECTIVE_VAL_DICE
    assert parent.info.status == "FINISHED"
    assert len(children) == 3
    finals = {}
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags[names.TAG_KIND] == names.KIND_TRIAL
        assert set(names.SEARCH_PARAMS) <= set(child.data.params)
        history = client.get_metric_history(child.info.run_id, names.METRIC_OBJECTIVE)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(1, len(history) + 1))
        assert names.METRIC_VAL_DICE in child.data.metrics and names.METRIC_PROXY in child.data.metrics
        if len(history) == result.full_steps:
            finals[float(child.data.params[names.PARAM_GUIDANCE])] = child.data.metrics[names.METRIC_OBJECTIVE]
    assert {float(c.data.params[names.PARAM_GUIDANCE]) for c in children} == {0.0, 1.0, 3.0}

    # The best: the highest final objective among children that evaluated every step.
    assert parent.data.metrics[names.METRIC_BEST] == pytest.approx(max(finals.values()))
    assert finals[float(parent.data.params[names.BEST_PREFIX + names.PARAM_GUIDANCE])] == pytest.approx(max(finals.values()))
    # Proxy path on the same work dir (tune settings leave the method hash alone): the saved round-0 weights are
    # reused, not retrained, and the objective is the mean reliability of the pool sample.
    # The whole pool (2 steps of 16), so the sample holds cases with hidden truth as well as unlabelled ones.
    proxy_cfg = _search_cfg(
        tmp_path,
        **{
            "tune.objective": "proxy",
            "tune.guidance_strength": {"grid": [2.0]},
            "tune.eval_cases": 64,
            "tune.eval_batch_size": 16,
        },
    )
    proxy = T.run_tune(proxy_cfg, progress=False)
    assert proxy.objective == names.OBJECTIVE_PROXY and proxy.eval_source == "pool sample"
    assert proxy.models_reused and proxy.train_saved_s == pytest.approx(proxy.shared_train_s)
    _, parent, children = _runs(proxy)
    assert parent.data.tags[names.TAG_OBJECTIVE] == names.OBJECTIVE_PROXY and len(children) == 1
    for child in children:
        value = child.data.metrics[names.METRIC_PROXY]
        assert child.data.metrics[names.METRIC_OBJECTIVE] == pytest.approx(value) and 0.0 <= value <= 1.0
        assert names.METRIC_VAL_DICE not in child.data.metrics
        # Phantom pool cases carry hidden truth: reported beside the proxy, never chosen by.
        assert math.isfinite(child.data.metrics[names.METRIC_POOL_DICE])


@pytest.mark.slow
def test_asha_stops_a_bad_setting_early(tmp_path, ray_session):
    """Trials one at a time: the second, with a guidance strength that wrecks every label, is stopped at the
    first rung (its objective is below the first trial's there), so it reports fewer steps than a full trial."""
    cfg = _search_cfg(
        tmp_path,
        **{
            "tune.guidance_strength": {"grid": [0.0, 200.0]},
            "tune.max_concurrent_trials": 1,
            "tune.grace_period": 1,
            "tune.reduction_factor": 2.0,
        },
    )
    result = T.run_tune(cfg, progress=False)
    steps = {t.params[names.PARAM_GUIDANCE]: t.steps for t in result.trials}
    objective = {t.params[names.PARAM_GUIDANCE]: t.metrics["objective"] for t in result.trials}
    assert result.full_steps == 3
    assert steps[0.0] == result.full_steps
    assert steps[200.0] < result.full_steps, (steps, objective)  # stopped early by ASHA
    assert result.best.params[names.PARAM_GUIDANCE] == 0.0


def test_cli_tune_takes_the_run_options(tmp_path):
    from caudo_ray import cli

    args = cli._parser().parse_args(
        [
            "tune",
            "--work-dir",
            str(tmp_path / "w"),
            "--set",
            "tune.objective=proxy",
            "--set",
            "tune.guidance_strength={grid: [0, 2]}",
        ]
    )
    assert args.func is cli.cmd_tune
    cfg = cli.config_from_args(args)
    assert cfg.tune.objective == "proxy" and cfg.tune.guidance_strength.grid == [
        0.0,
        2.0,
    ]
    assert cfg.work_dir == str(tmp_path / "w")
    bad = cli._parser().parse_args(["tune", "--set", "tune.eval_cases=0"])
    with pytest.raises(ConfigError, match="tune.eval_cases"):
        cli.config_from_args(bad)
