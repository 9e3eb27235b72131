"""Dashboards from a real sqlite MLflow store: per-round artifacts, the report run, the page in headless Chromium."""

from __future__ import annotations

import fnmatch
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config, under_ci
from mlflow import MlflowClient
from test_coordinator import artifact_paths

from caudo_ray.cli import main
from caudo_ray.run.coordinator import Coordinator
from caudo_ray.store import PseudoLabelStore
from caudo_ray.tracking import names, report
from caudo_ray.tracking.tracker import Tracker

TUNE_EXPERIMENT = "caudo-ray-tune"
# (w, s, steps, objective per evaluation step) as a Tune search logs them. ASHA stopped trial 2 after one step: its
# objective is the highest but covers fewer cases, so the search chose trial 1 (caudo_ray.tune.pick_best).
TRIALS = [
    (0.5, 0.3, 4, [0.61, 0.66]),
    (1.5, 0.5, 4, [0.70, 0.78]),
    (3.0, 0.7, 4, [0.80]),
]
CHOSEN = 1
SCRIPT = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny local run (it builds and links its own dashboard) and its config."""
    cfg = tiny_config(tmp_path_factory.mktemp("dash") / "run")
    return cfg, Coordinator(cfg, progress=False).run()


@pytest.fixture(scope="module")
def tune_parent(run) -> str:
    """A Tune-shaped search logged by hand into the run's store: a parent tagged as a search, nested trials."""
    _, result = run
    uri = result.tracking_uri
    parent = Tracker(uri, TUNE_EXPERIMENT, run_name="search", tags={names.TAG_KIND: names.KIND_TUNE})
    for n, (w, s, steps, objectives) in enumerate(TRIALS):
        trial = Tracker(uri, TUNE_EXPERIMENT, run_name=f"trial_{n}", parent_run_id=parent.run_id)
        params = {
            "guidance_strength": w,
            "calibration_strength": s,
            "inference_steps": steps,
        }
        trial.log_params({"calibrator": params})
        for step, value in enumerate(objectives):
            trial.log_metrics({names.METRIC_OBJECTIVE: value}, step=step)
        trial.set_tags({names.TAG_STOPPED_EARLY: str(len(objectives) < 2).lower()})
        trial.finish()
        if n == CHOSEN:
            parent.log_params({"best": {"calibrator": params}})
            parent.log_metrics({names.METRIC_BEST: objectives[-1]}, step=0)
    parent.finish()
    return parent.run_id


def test_rounds_log_case_tables_and_galleries(run, tmp_path):
    cfg, result = run
    client = MlflowClient(result.tracking_uri)
    store = PseudoLabelStore.open(result.store_url, mode="r")
    usable = np.flatnonzero(store.usable_mask())
    paths = artifact_paths(client, result.run_id)
    k = cfg.tracking.num_overlays
    for r in range(cfg.rounds):
        table = json.loads(
            Path(client.download_artifacts(result.run_id, names.CASE_TABLE.format(r=r), str(tmp_path))).read_text()
        )
        assert table["index"] == usable.tolist()
        assert table["case_id"] == [store.case_ids[i] for i in usable]
        assert sum(table["selected"]) == store.rounds.summary(r)["selected"] == int(store.rounds.selected(r).sum())
        scores = store.rounds.read(r, usable)["scores"]
        np.testing.assert_allclose(table["reliability"], scores["reliability"], atol=1e-5)
        # Labelled phantoms in the pool carry hidden truth, unlabelled ones none: their Dice cells are null.
        dice = [v for v in table["calibrated_dice"] if v is not None]
        assert 0 < len(dice) < len(usable)
        assert np.mean(dice) == pytest.approx(store.rounds.summary(r)["pseudo_dice_calibrated"], abs=1e-4)
        assert all(0.0 <= v <= 1.0 for v in table["changed_fraction"])
        for group in names.GALLERY_GROUPS:
            entries = table["gallery"][group]
            assert len(entries) == k
            assert {e["artifact"] for e in entries} <= paths
        least = min(table["reliability"])
        assert table["reliability"][table["case_id"].index(table["gallery"]["least_reliable"][0]["case_id"])] == least


def test_finished_run_links_its_dashboard(run):
    _, result = run
    client = MlflowClient(result.tracking_uri)
    source = client.get_run(result.run_id)
    report_id = source.data.tags[names.TAG_DASHBOARD_RUN]
    assert f"runs/{report_id}/artifactPath/dashboard/index.html" in source.data.tags[names.TAG_NOTE]
    report = client.get_run(report_id)
    assert report.data.tags[names.TAG_KIND] == "dashboard"
    assert report.data.tags[names.TAG_SOURCES] == result.run_id
    assert report.info.experiment_id == source.info.experiment_id and report.info.status == "FINISHED"
    paths = artifact_paths(client, report_id)
    assert "dashboard/index.html" in paths
    assert {
        "run0_quality",
        "run0_selection",
        "run0_reliability",
        "run0_throughput",
    } <= {Path(p).stem for p in paths if p.startswith("dashboard/figures/")}
    assert result.dashboard == result.work_dir / "dashboard.html" and result.dashboard.exists()


def test_dashboard_of_a_run_and_a_tune_search(run, tune_parent, tmp_path):
    _, result = run
    built = report.build_dashboard(
        result.tracking_uri,
        run_ids=[result.run_id, tune_parent],
        out=tmp_path / "d.html",
    )
    keys = [f.key for f in built.figures]
    assert keys == [
        "run0_quality",
        "run0_selection",
        "run0_reliability",
        "run0_gallery_most_changed",
        "run0_gallery_least_reliable",
        "run0_throughput",
        "tune0_objective",
    ]
    assert sorted(p.name for p in (tmp_path / "d_figures").iterdir()) == sorted(f"{k}.png" for k in keys)
    page = built.html_path.read_text()
    assert page.count("<img ") == len(keys)
    # Self-contained: every src/href is inline data or an in-page anchor.
    assert not re.findall(r"""(?:src|href)=["'](?!data:|#)""", page)
    assert "<link" not in page and "<script src" not in page
    # The table marks the trial the search chose, not the stopped trial with the higher partial objective.
    best_row = re.search(r'<tr class="best">(.*?)</tr>', page).group(1)
    assert f"trial_{CHOSEN}" in best_row and "0.78" in best_row and "1.5" in best_row
    assert page.count('<tr class="best">') == 1 and "best objective 0.78" in page

    # A whole experiment: the search and its trials, without the report runs of earlier builds.
    tune_only = report.build_dashboard(result.tracking_uri, experiment=TUNE_EXPERIMENT, out=tmp_path / "t.html")
    assert [f.key for f in tune_only.figures] == ["tune0_objective"]
    assert tune_only.source_run_ids == [tune_parent]
    with pytest.raises(report.DashboardError, match="not found"):
        report.build_dashboard(result.tracking_uri, experiment="no-such-experiment")


def test_cli_builds_from_a_work_dir(run, tmp_path, capsys):
    _, result = run
    out = tmp_path / "cli.html"
    assert main(["dashboard", "--work-dir", str(result.work_dir), "--out", str(out)]) == 0
    assert "6 figures" in capsys.readouterr().out and out.exists()
    assert main(["dashboard", "--work-dir", str(tmp_path)]) == 2
    assert main(["dashboard", "--tracking-uri", result.tracking_uri, "--run-id", "0" * 32]) == 2


def _chromium() -> str:
    exe = shutil.which("chromium")
    if exe is None:
        if os.environ.get("CAUDO_REQUIRE_CHROMIUM") == "1" or under_ci():
            pytest.fail("chromium is not installed but CAUDO_REQUIRE_CHROMIUM=1 or CI=true (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install -y --no-install-recommends chromium)")
    return exe


def _body_of(page: Path, profile: Path) -> dict[str, str]:
    """The <body> attributes after the page loaded in headless Chromium (its status script writes them)."""
    dom = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(1)))


def test_page_loads_in_headless_chromium(run, tmp_path):
    _, result = run
    figures = result.dashboard.read_text().count("<img ")
    assert figures == 6
    body = _body_of(result.dashboard, tmp_path / "profile")
    assert body["data-status"] == "ok", body
    assert body["data-figures"] == str(figures)

    # The status script does check: a figure that cannot decode turns the page's status to error.
    broken = tmp_path / "broken.html"
    broken.write_text(
        re.sub(
            r"data:image/png;base64,[^\"']+",
            "data:image/png;base64,AAAA",
            result.dashboard.read_text(),
            count=1,
        )
    )
    body = _body_of(broken, tmp_path / "profile")
    assert body["data-status"] == "error" and body["data-broken"] == "1"


def test_dashboard_failure_is_only_a_warning(run, tmp_path, caplog):
    _, result = run
    assert report.build_and_link(result.tracking_uri, "0" * 32, tmp_path / "x.html") is None
    assert "could not be built" in caplog.text


def test_names_and_answers_from_mlflow_are_escaped(tmp_path):
    """Run, trial and search names, case ids, label names and annotators are text on the page, never markup."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = "escapes"
    source = Tracker(uri, exp, run_name=f"run {SCRIPT}", artifact_root=tmp_path / "artifacts")
    source.log_params({"tracking": {"label_names": ["background", f"label {SCRIPT}"]}})
    source.log_metrics({names.VAL_DICE: 0.5, names.ANNOTATIONS: 0}, step=0)
    source.log_metrics({names.VAL_DICE: 0.6, names.ANNOTATIONS: 1}, step=1)
    answer = {
        "case_id": f"case {SCRIPT}",
        "round": 1,
        "reliability_before": 0.25,
        "annotator": f"annotator {SCRIPT}",
        "time": "2025-01-01T10:00:00",
    }
    source.log_dict({"answers": [answer]}, names.ANSWERED_QUERIES)
    source.finish()
    search = Tracker(uri, exp, run_name=f"search {SCRIPT}", tags={names.TAG_KIND: names.KIND_TUNE})
    trial = Tracker(uri, exp, run_name=f"trial {SCRIPT}", parent_run_id=search.run_id)
    trial.log_metrics({names.METRIC_OBJECTIVE: 0.7}, step=0)
    trial.finish()
    search.finish()

    built = report.build_dashboard(uri, run_ids=[source.run_id, search.run_id], out=tmp_path / "page.html")
    page = built.html_path.read_text()
    assert SCRIPT not in page and "alert(1)</script>" not in page
    assert f"<h2>Self-training run run {ESCAPED}</h2>" in page
    assert f"<h2>Tune search search {ESCAPED}</h2>" in page
    assert f'<td class="text">trial {ESCAPED}</td>' in page
    assert f'<td class="text">case {ESCAPED}</td>' in page and f'<td class="text">annotator {ESCAPED}</td>' in page
    # The page shows no label names: the one logged must not reach it, raw or escaped.
    assert "label &lt;script" not in page
    # The only scripts are the page's own status script.
    assert page.count("<script") == 1
    assert [f.key for f in built.figures] == ["run0_quality", "run0_annotations"]


def test_the_page_template_ships_with_the_package():
    template = importlib.resources.files("caudo_ray.tracking").joinpath("templates", report.TEMPLATE)
    assert template.is_file() and template.read_text().startswith("{#- The label-quality dashboard")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["caudo_ray"]
    assert any(fnmatch.fnmatch(f"tracking/templates/{report.TEMPLATE}", pattern) for pattern in patterns), patterns
    assert any(re.match(r"jinja2\b", dep, re.IGNORECASE) for dep in pyproject["project"]["dependencies"])
