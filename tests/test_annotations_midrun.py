"""Answers to annotation queries given while a run goes join its next round, on the local and the Ray executor,
and a run resumed on the work dir continues from its last committed round with them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from mlflow import MlflowClient
from PIL import Image

from caudo_ray import data as D
from caudo_ray.rounds.executor import LocalExecutor
from caudo_ray.rounds.steps import annotation_queries, training_inputs
from caudo_ray.run.coordinator import Coordinator
from caudo_ray.store import PseudoLabelStore
from caudo_ray.tracking import names
from caudo_ray.workspace import Workspace


def draw_answer(cfg, case_id: str) -> np.ndarray:
    """A person's answer for ``case_id``: a box mask at the source image's size, written into ``annotations/``."""
    ws = Workspace.of(cfg)
    image = Image.open(ws.phantom_dir / "unlabeled" / f"{case_id}.png") if case_id.startswith("u") else None
    if image is None:
        image = Image.open(ws.phantom_dir / "images" / f"{case_id}.png")
    mask = np.zeros((image.height, image.width), np.uint8)
    mask[8:30, 10:36] = 1
    Image.fromarray(mask).save(ws.annotations_dir / f"{case_id}.png")
    return mask


class Spy:
    """Wraps an executor and records, for every training, the exemplar ids and selected pseudo-labelled images
    it trains on, read from the store the moment it starts (as the trainer reads them)."""

    def __init__(self, inner, store_url: str, seen: dict):
        self.inner, self.store_url, self.seen = inner, store_url, seen

    def train(self, r, previous, *, with_calibrator=True):
        store = PseudoLabelStore.open(self.store_url, mode="r")
        self.seen[r] = (store.exemplars()[0], training_inputs(store, r))
        return self.inner.train(r, previous, with_calibrator=with_calibrator)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def run_answering_after_round_0(cfg, executor_cls):
    """A two-round run whose hook answers, after round 0, its least reliable query and a case round 0 selected for
    round 1's pseudo labels; returns (result, {case id: mask}, seen)."""
    seen: dict = {}
    answered: dict = {}

    def hook(r: int, store: PseudoLabelStore) -> None:
        assert store.rounds.is_committed(r)
        # The page was rebuilt for this round already, before the run ends.
        answered.setdefault("pages", []).append(Workspace.of(cfg).dashboard_path.read_text())
        if r == 0:
            query = annotation_queries(store, r, 1)[0].case_id
            selected = store.case_ids[int(np.flatnonzero(store.rounds.selected(0))[0])]
            for case_id in (query, selected):
                answered[case_id] = draw_answer(cfg, case_id)

    def factory(ctx):
        return Spy(executor_cls(ctx, progress=False), ctx.store_url, seen)

    result = Coordinator(cfg, executor_factory=factory, progress=False, on_round_committed=hook).run()
    pages = answered.pop("pages")
    assert len(pages) == cfg.rounds and "What annotations bought" not in pages[0] and "What annotations bought" in pages[1]
    return result, answered, seen


def assert_joined_round_1(cfg, result, answered, seen):
    store = PseudoLabelStore.open(result.store_url, mode="r")
    assert sorted(store.annotations) == sorted(answered) and len(answered) == 2
    for case_id, mask in answered.items():
        assert_joined(cfg, store, case_id, mask, seen)
    client = MlflowClient(tracking_uri=result.tracking_uri)
    history = {m.step: m.value for m in client.get_metric_history(result.run_id, names.ANNOTATIONS)}
    assert history == {0: 0.0, 1: 2.0, 2: 2.0}  # step 2: the final segmenter
    assert [s["annotations"] for s in result.rounds] == [0, 2]
    # The answered queries, as a table in MLflow and on the page, with what each case's reliability was when asked.
    table = json.loads(Path(client.download_artifacts(result.run_id, names.ANSWERED_QUERIES)).read_text())["answers"]
    reliability = store.rounds.scores(0)["reliability"]
    assert [row["case_id"] for row in table] == sorted(answered) and {row["round"] for row in table} == {1}
    for row in table:
        assert row["reliability_before"] == pytest.approx(float(reliability[store.case_ids.index(row["case_id"])]), rel=1e-6)
    page = result.dashboard.read_text()
    assert "What annotations bought" in page and all(case_id in page for case_id in answered)
    # Rebuilt after every round and at the end, into one report run.
    reports = client.search_runs([client.get_run(result.run_id).info.experiment_id], f"tags.{names.TAG_SOURCES} = '{result.run_id}'")
    assert len(reports) == 1


def assert_joined(cfg, store, case_id, mask, seen):
    i = store.case_ids.index(case_id)
    # Round 0 trained on the split's exemplars alone; round 1 and the final segmenter on the answer too.
    assert case_id not in seen[0][0]
    assert case_id in seen[1][0] and case_id in seen[cfg.rounds][0]
    ids, images, labels = store.exemplars()
    k = ids.index(case_id)
    np.testing.assert_array_equal(labels[k], D.resize_mask(mask, cfg.data.working_size))
    np.testing.assert_array_equal(images[k], store.read_images([i])[0])
    # The answered image is among round 1's exemplar images and not among its pseudo-labelled ones, nor among the
    # split's exemplars, on whose views the drift guard reads every round.
    image = store.read_images([i])[0]
    inputs = seen[1][1]
    assert any(np.array_equal(image, x) for x in inputs.exemplar_images)
    assert inputs.pseudo_images is None or not any(np.array_equal(image, x) for x in inputs.pseudo_images)
    first_images, _ = inputs.first_exemplars()
    np.testing.assert_array_equal(first_images, seen[0][1].exemplar_images)
    # It left the pool: not labelled in round 1, not selected, not usable, and recorded as an annotation.
    assert not store.rounds.done(1)[i] and not store.rounds.selected(1)[i] and not store.usable_mask()[i]
    record = store.annotations[case_id]
    assert record["round"] == 1 and record["file"] == f"{case_id}.png" and len(record["sha256"]) == 64
    assert record["annotator"].startswith("unknown")  # dropped into annotations/, not given through annotate


def test_an_answer_given_while_the_run_goes_joins_the_next_round_locally(tmp_path):
    cfg = tiny_config(tmp_path / "run", **{"tracking.dashboard_every_round": True})
    assert_joined_round_1(cfg, *run_answering_after_round_0(cfg, LocalExecutor))


def test_an_answer_given_while_the_run_goes_joins_the_next_round_on_ray(ray_session, tmp_path):
    from caudo_ray.distributed.executor import RayExecutor

    cfg = tiny_config(
        tmp_path / "run",
        **{
            "runtime.use_ray": True,
            "runtime.num_workers": 2,
            "runtime.cpus_per_worker": 1,
            "runtime.trainer_cpus": 0,
            "tracking.dashboard_every_round": True,
        },
    )
    assert_joined_round_1(cfg, *run_answering_after_round_0(cfg, RayExecutor))


class Stop(Exception):
    """Ends a run after a round, as a crash or a kill would."""


def test_a_resumed_run_continues_from_its_last_committed_round_with_the_answers(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    ws = Workspace.of(cfg)

    def stop_after_round_0(r, store):
        raise Stop

    with pytest.raises(Stop):
        Coordinator(cfg, progress=False, on_round_committed=stop_after_round_0).run()
    store = PseudoLabelStore.open(ws.store_url, mode="r")
    assert store.rounds.committed() == [0] and ws.saved_rounds() == [0]
    round0 = store.rounds.read(0)
    model_mtime = ws.model_path(0).stat().st_mtime_ns
    case_id = annotation_queries(store, 0, 1)[0].case_id
    mask = draw_answer(cfg, case_id)

    result = Coordinator(cfg, progress=False).run()
    store = PseudoLabelStore.open(ws.store_url, mode="r")
    i = store.case_ids.index(case_id)
    # Round 0 is not recomputed: its models and labels stay; only round 1 labels, without the answered case.
    assert ws.model_path(0).stat().st_mtime_ns == model_mtime
    again = store.rounds.read(0)
    np.testing.assert_array_equal(again["calibrated"], round0["calibrated"])
    assert result.recomputed == int(store.usable_mask().sum()) and not store.rounds.done(1)[i]
    assert store.annotations[case_id]["round"] == 1
    ids, _, labels = store.exemplars()
    np.testing.assert_array_equal(labels[ids.index(case_id)], D.resize_mask(mask, cfg.data.working_size))
    assert [s["annotations"] for s in result.rounds] == [0, 1]


def test_a_dashboard_that_cannot_be_built_does_not_fail_the_run(tmp_path, monkeypatch, caplog):
    from caudo_ray.tracking import report

    def broken(*args, **kwargs):
        raise RuntimeError("no page today")

    monkeypatch.setattr(report, "build_dashboard", broken)
    cfg = tiny_config(tmp_path / "run", rounds=1)
    result = Coordinator(cfg, progress=False).run()
    assert result.dashboard is None and "could not be built" in caplog.text
    assert MlflowClient(tracking_uri=result.tracking_uri).get_run(result.run_id).info.status == "FINISHED"
