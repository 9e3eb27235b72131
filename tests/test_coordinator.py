"""The local self-training loop end to end: store contents, MLflow run, idempotent reruns, multi-class, resume."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import assert_labels_close, assert_selection_close, tiny_config
from mlflow import MlflowClient

from caudo_ray.arrays import IGNORE
from caudo_ray.labelling.selection import area_strata
from caudo_ray.rounds.executor import LocalExecutor
from caudo_ray.rounds.steps import training_inputs
from caudo_ray.run.coordinator import Coordinator
from caudo_ray.store import NO_TRUTH, PseudoLabelStore
from caudo_ray.tracking import names
from caudo_ray.tracking.tracker import sqlite_tracking_uri
from caudo_ray.workspace import Workspace

# Metrics every round of a phantom run logs (the pool has hidden truth and a validation split exists).
# reliability_spearman is left out: it is NaN, hence not logged, when the tiny model's reliabilities tie.
ROUND_METRICS = [
    names.PSEUDO_DICE_INITIAL,
    names.PSEUDO_DICE_CALIBRATED,
    names.CALIBRATION_GAIN,
    names.SELECTED,
    names.SELECTED_FRACTION,
    names.RELIABILITY_MEAN,
    names.RELIABILITY_P10,
    names.RELIABILITY_P50,
    names.AGREEMENT_MEAN,
    names.VAL_DICE,
    names.VAL_HD95_PX,  # phantoms are PNG: no spacing
    names.CASES_PER_S,
    names.INFER_S_PER_CASE,
    names.DDIM_S_PER_CASE,
    names.SCORE_S_PER_CASE,
    names.STORE_S_PER_CASE,
    names.TRAIN_S,
]


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    """Every artifact file of a run, as paths relative to its artifact root."""
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def assert_complete_run(cfg, result) -> PseudoLabelStore:
    """Every usable case of every round is in the store exactly once, committed, with its selection."""
    store = PseudoLabelStore.open(result.store_url)
    usable = store.usable_mask()
    assert usable.sum() > 0
    assert store.rounds.numbers() == list(range(cfg.rounds)) == store.rounds.committed()
    for r in range(cfg.rounds):
        assert store.rounds.done(r)[usable].all()
        assert len(store.case_ids) == len(set(store.case_ids))  # one chunk row per case id
        labels = store.rounds.read(r)
        assert labels["initial"].max() < store.num_classes and labels["calibrated"].max() < store.num_classes
        assert np.isfinite(labels["scores"]["reliability"][usable]).all()
        # Selection: the most reliable fraction per target-size stratum (selection.select_top's contract).
        selected = store.rounds.selected(r)
        assert not selected[~usable].any()
        n, frac = int(usable.sum()), cfg.fraction_for_round(r)
        strata = area_strata(np.where(usable, store.rounds.scores(r)["area"], 0.0))
        bound = sum(math.ceil(frac * (strata == s).sum()) for s in np.unique(strata))
        assert math.ceil(frac * n) <= selected.sum() <= bound
        summary = store.rounds.summary(r)
        assert summary["selected"] == selected.sum() and summary["cases"] == n
    return store


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """One two-round binary run, then a rerun of the same config."""
    cfg = tiny_config(tmp_path_factory.mktemp("local") / "run")
    first = Coordinator(cfg, progress=False).run()
    second = Coordinator(cfg, progress=False).run()
    return cfg, first, second


def test_local_loop_fills_the_store(local_run):
    cfg, first, _ = local_run
    store = assert_complete_run(cfg, first)
    assert first.recomputed == cfg.rounds * int(store.usable_mask().sum())
    assert [s["round"] for s in first.rounds] == [0, 1]


def assert_mlflow_run(cfg, result):
    """The run is FINISHED, each documented round metric has one value per round, every artifact is there."""
    client = MlflowClient(tracking_uri=result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for name in ROUND_METRICS:
        assert [m.step for m in client.get_metric_history(result.run_id, name)] == list(range(cfg.rounds)), name
    arts = artifact_paths(client, result.run_id)
    summaries = {f"rounds/round_{r}/summary.json" for r in range(cfg.rounds)}
    assert {"config.yaml", "split.json", "model/final.pt", *summaries} <= arts
    for r in range(cfg.rounds):
        overlays = [a for a in arts if a.startswith(f"overlays/round_{r}/") and a.endswith(".png")]
        assert len(overlays) == cfg.tracking.num_overlays
    return client, run


def test_local_loop_logs_the_mlflow_run(local_run):
    cfg, first, _ = local_run
    work = Path(cfg.work_dir)
    assert first.tracking_uri == sqlite_tracking_uri(Path(work) / "mlflow.db") and (work / "mlflow.db").is_file()
    client, run = assert_mlflow_run(cfg, first)
    assert run.data.params["rounds"] == "2" and run.data.params["calibrator.guidance_strength"] == str(cfg.calibrator.guidance_strength)
    selected = {m.step: m.value for m in client.get_metric_history(first.run_id, names.SELECTED)}
    assert selected == {s["round"]: s["selected"] for s in first.rounds}
    # Artifacts live in the work dir, next to the sqlite store.
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(work.resolve())


def test_rerun_recomputes_nothing_and_logs_into_the_same_run(local_run):
    _, first, second = local_run
    assert second.recomputed == 0
    assert second.run_id == first.run_id
    assert [s["selected"] for s in second.rounds] == [s["selected"] for s in first.rounds]
    client = MlflowClient(tracking_uri=second.tracking_uri)
    assert client.get_run(second.run_id).info.status == "FINISHED"
    # Committed rounds are not logged twice.
    assert [m.step for m in client.get_metric_history(second.run_id, names.SELECTED)] == [0, 1]


def test_loop_with_anchored_consistency(local_run, tmp_path):
    """Round 0 trains without the pool (its labels equal the plain run's); round 1 reads round 0's labels of it."""
    _, plain, _ = local_run
    cfg = tiny_config(tmp_path / "run", **{"consistency.enabled": True, "consistency.anchored": True, "consistency.unlabelled_batch_size": 2})
    store = assert_complete_run(cfg, Coordinator(cfg, progress=False).run())
    plain_store = PseudoLabelStore.open(plain.store_url)
    assert_labels_close(store.rounds.read(0)["initial"], plain_store.rounds.read(0)["initial"], "round 0 initial labels")
    usable = np.flatnonzero(store.usable_mask())
    first, later = training_inputs(store, 0, with_pool=True), training_inputs(store, 1, with_pool=True)
    assert first.pool_labels is None and len(first.pool_images) == len(usable)
    np.testing.assert_array_equal(later.pool_labels, store.rounds.read(0, usable)["calibrated"])
    np.testing.assert_array_equal(later.pool_images, store.read_images(usable))
    assert training_inputs(store, 1).pool_labels is None


def test_multiclass_loop(tmp_path):
    cfg = tiny_config(tmp_path / "run", **{"data.phantom.num_classes": 3, "rounds": 1, "tracking.num_overlays": 1})
    result = Coordinator(cfg, progress=False).run()
    store = assert_complete_run(cfg, result)
    assert store.num_classes == 3
    _, _, exemplar_labels = store.exemplars()
    assert set(np.unique(exemplar_labels)) == {0, 1, 2}
    truth = store.read_truth()
    assert set(np.unique(truth[truth != NO_TRUTH])) == {0, 1, 2}  # hidden truth of the pool's labelled cases
    assert {"dice_class1", "dice_class2"} <= set(result.final_metrics)
    # The round's stored labels carry all three classes, and each case's stored Dice is the mean over the two
    # foreground classes, each computed on its own (a map collapsed to foreground/background would not match).
    done = np.flatnonzero(store.rounds.done(0))
    labels, scores, known = store.rounds.read(0, done), store.rounds.scores(0), truth[done]
    assert (known != NO_TRUTH).any(axis=(1, 2)).sum() >= 5  # cases to score
    for kind in ("initial", "calibrated"):
        assert set(np.unique(labels[kind])) == {0, 1, 2}, kind
        stored = scores[f"{kind}_dice"][done]
        for i, (pred, true) in enumerate(zip(labels[kind], known)):
            if (true == NO_TRUTH).all():
                assert np.isnan(stored[i])
                continue
            per_class = [1.0 if not ((pred == c) | (true == c)).any() else 2 * ((pred == c) & (true == c)).sum() / ((pred == c).sum() + (true == c).sum()) for c in (1, 2)]
            assert stored[i] == pytest.approx(np.mean(per_class), abs=1e-6), (kind, i)
    final = result.final_metrics
    assert final["dice"] == pytest.approx((final["dice_class1"] + final["dice_class2"]) / 2, abs=1e-6)
    assert final["dice_class1"] != final["dice_class2"]  # two classes scored apart, not one copied


class FailingExecutor(LocalExecutor):
    """A local executor that dies after ``k`` batches of round ``fail_round``, as a killed run would."""

    def __init__(self, ctx, fail_round: int, k: int):
        super().__init__(ctx, progress=False)
        self.fail_round, self.k = fail_round, k

    def label(self, r, models, batches):
        for n, stats in enumerate(super().label(r, models, batches)):
            yield stats
            if r == self.fail_round and n + 1 == self.k:
                raise KeyboardInterrupt("simulated interruption")


def _chunk_mtimes(store_url: str, r: int, indices) -> dict[int, int]:
    # A batch's scores are one chunk (never all fill value, so always a file): rewritten only if it is recomputed.
    size = PseudoLabelStore.open(store_url, mode="r").rounds.chunk_size(r)
    base = Path(store_url) / "rounds" / str(r) / "scores" / "c"
    return {int(c): (base / str(int(c)) / "0").stat().st_mtime_ns for c in np.unique(np.asarray(indices) // size)}


def test_resume_recomputes_only_missing_cases(local_run, tmp_path):
    clean_cfg, clean, _ = local_run
    cfg = tiny_config(tmp_path / "run")
    assert cfg.method_hash() == clean_cfg.method_hash()
    with pytest.raises(KeyboardInterrupt):
        Coordinator(cfg, executor_factory=lambda ctx: FailingExecutor(ctx, fail_round=1, k=2), progress=False).run()

    store = PseudoLabelStore.open(str(tmp_path / "run" / "store.zarr"))
    usable = store.usable_mask()
    assert store.rounds.committed() == [0]
    done_before = np.flatnonzero(store.rounds.done(1) & usable)
    assert len(done_before) == 2 * cfg.runtime.batch_size < usable.sum()
    mtimes = _chunk_mtimes(store.url, 1, done_before)
    info = Workspace(tmp_path / "run").read_run_info()
    run_id, client = info["run_id"], MlflowClient(tracking_uri=info["tracking_uri"])
    assert client.get_run(run_id).info.status == "KILLED"  # interrupted, not failed

    resumed = Coordinator(cfg, progress=False).run()
    assert resumed.recomputed == int(usable.sum()) - len(done_before)
    assert resumed.run_id == run_id and client.get_run(run_id).info.status == "FINISHED"
    assert _chunk_mtimes(store.url, 1, done_before) == mtimes
    assert_complete_run(cfg, resumed)

    # Calibration is deterministic on CPU: the resumed run ends where an uninterrupted one does (to float32 ties).
    ref = PseudoLabelStore.open(clean.store_url)
    for r in range(cfg.rounds):
        a, b = store.rounds.read(r), ref.rounds.read(r)
        assert_labels_close(a["initial"], b["initial"])
        assert_labels_close(a["calibrated"], b["calibrated"])
        assert_selection_close(store.rounds.selected(r), ref.rounds.selected(r), b["scores"]["reliability"])


def test_veto_ignores_the_pixels_the_calibrator_disputes(local_run, tmp_path):
    """With ``calibrator.veto``, round 1 trains on round 0's kept labels except where the calibrator proposed
    another class: those pixels are IGNORE, in the selected labels and in the pool's anchor labels alike."""
    _, plain, _ = local_run
    url = tmp_path / "store.zarr"
    shutil.copytree(plain.store_url, url)
    arrays = zarr.open_group(str(url), mode="r+")["rounds/0/labels"]
    kept = arrays[:, 1]
    proposed = kept.copy()
    proposed[:, :4] = 1 - proposed[:, :4]  # the calibrator disputes the top four rows of every label
    arrays[:, 2] = proposed
    store = PseudoLabelStore.open(url)
    usable = np.flatnonzero(store.usable_mask())
    selected = np.flatnonzero(store.rounds.selected(0))

    vetoed = training_inputs(store, 1, with_pool=True, veto=True)
    assert (vetoed.pseudo_labels[:, :4] == IGNORE).all() and (vetoed.pool_labels[:, :4] == IGNORE).all()
    np.testing.assert_array_equal(vetoed.pseudo_labels[:, 4:], kept[selected][:, 4:])
    np.testing.assert_array_equal(vetoed.pool_labels[:, 4:], kept[usable][:, 4:])
    plain_inputs = training_inputs(store, 1, with_pool=True)
    np.testing.assert_array_equal(plain_inputs.pseudo_labels, kept[selected])
