"""Label-quality dashboards built from MLflow runs: the page, its report run, and the link from the source run.

:func:`build_dashboard` reads MLflow only (:mod:`caudo_ray.tracking.report_data`), draws the figures
(:mod:`caudo_ray.tracking.report_figures`), renders one self-contained HTML page from the jinja2 template
``templates/dashboard.html.j2`` (figures inlined as base64 PNG, inline CSS, no external URLs; autoescape on, so
every run name, case id or annotator is escaped) and logs page and PNGs as artifacts of a report run tagged
``caudo_ray.kind=dashboard``.

Views: per-round pseudo-label Dice before and after calibration and the calibration gain; selected fraction and
reliability quantiles per round; what annotations bought (validation Dice against answered queries, and who
answered which); reliability against true Dice (where the pool has hidden truth); the gallery; Ray Tune searches
(objective against guidance strength w and calibration strength s, from runs tagged ``caudo_ray.kind=tune`` and
their nested trials); throughput (``perf/*``).
"""

from __future__ import annotations

import base64
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from caudo_ray.tracking import names
from caudo_ray.tracking import report_figures as draw
from caudo_ray.tracking.report_data import (
    TUNE_PARAMS,
    DashboardError,
    TrainingRun,
    TuneSearch,
    collect,
    quiet_downloads,
    stopped_early,
    trial_value,
)
from caudo_ray.tracking.tracker import Tracker

__all__ = ["DashboardError", "DashboardResult", "Figure", "build_and_link", "build_dashboard", "link_dashboard"]

log = logging.getLogger(__name__)

TEMPLATE = "dashboard.html.j2"

_ROUND_COLUMNS = [
    ("Dice initial", names.PSEUDO_DICE_INITIAL),
    ("Dice calibrated", names.PSEUDO_DICE_CALIBRATED),
    ("gain", names.CALIBRATION_GAIN),
    ("selected", names.SELECTED),
    ("selected fraction", names.SELECTED_FRACTION),
    ("reliability mean", names.RELIABILITY_MEAN),
    ("Spearman rel. vs Dice", names.RELIABILITY_SPEARMAN),
    ("val Dice", names.VAL_DICE),
    ("annotations", names.ANNOTATIONS),
    ("cases/s", names.CASES_PER_S),
]
_ANSWER_COLUMNS = [
    ("case", "case_id"),
    ("joined round", "round"),
    ("reliability when asked", "reliability_before"),
    ("annotator", "annotator"),
    ("time", "time"),
]


@dataclass
class Figure:
    """A figure of the page: the PNG's file stem, its caption and its bytes."""

    key: str
    title: str
    png: bytes


@dataclass
class DashboardResult:
    """A built dashboard: the report run, the page, the figures and how long the build took."""

    run_id: str
    experiment_id: str
    html_path: Path
    figures: list[Figure]
    source_run_ids: list[str]
    build_s: float

    @property
    def artifact_path(self) -> str:
        return f"{names.DASHBOARD_DIR}/index.html"


# ------------------------------------------------------------------------------------------------------- page


@dataclass
class _RunView:
    """A self-training run's section: its round table and figures (None: nothing logged for that view)."""

    run: TrainingRun
    round_rows: list[tuple[int, list[float | None]]]
    quality: Figure | None
    selection: Figure | None
    show_annotations: bool
    annotations: Figure | None
    has_truth: bool
    reliability: Figure | None
    gallery: list[Figure]
    throughput: Figure | None

    @property
    def figures(self) -> list[Figure]:
        """In the order the page shows them."""
        shown = [self.quality, self.selection, self.annotations, self.reliability, *self.gallery, self.throughput]
        return [fig for fig in shown if fig is not None]


@dataclass
class _TrialRow:
    name: str
    params: list[float | None]
    objective: float | None
    stopped_early: bool
    status: str
    best: bool


@dataclass
class _SearchView:
    """A Tune search's section: the objective figure and one row per trial, highest objective first."""

    search: TuneSearch
    best_objective: float | None
    objective: Figure | None
    rows: list[_TrialRow]


def _figure(key: str, title: str, png: bytes | None) -> Figure | None:
    return None if png is None else Figure(key, title, png)


def _round_rows(tr: TrainingRun) -> list[tuple[int, list[float | None]]]:
    by_key = {key: dict(tr.metrics.get(key, [])) for _, key in _ROUND_COLUMNS}
    rounds = sorted({s for points in by_key.values() for s in points})
    return [(r, [by_key[key].get(r) for _, key in _ROUND_COLUMNS]) for r in rounds]


def _run_view(n: int, tr: TrainingRun) -> _RunView:
    prefix = f"run{n}"
    show_annotations = bool(tr.answers) or any(v for _, v in tr.metrics.get(names.ANNOTATIONS, []))
    has_truth = bool(tr.metrics.get(names.PSEUDO_DICE_CALIBRATED))
    return _RunView(
        run=tr,
        round_rows=_round_rows(tr),
        quality=_figure(
            f"{prefix}_quality",
            "Pseudo-label Dice before and after calibration, and calibration gain",
            draw.quality_figure(tr),
        ),
        selection=_figure(
            f"{prefix}_selection", "Selected fraction and reliability per round", draw.selection_figure(tr)
        ),
        show_annotations=show_annotations,
        annotations=_figure(
            f"{prefix}_annotations",
            "Validation Dice against the answered queries each round trained on",
            draw.annotations_figure(tr),
        )
        if show_annotations
        else None,
        has_truth=has_truth,
        reliability=_figure(
            f"{prefix}_reliability",
            "Reliability against true Dice of the calibrated labels, per case",
            draw.reliability_figure(tr),
        )
        if has_truth
        else None,
        gallery=[
            fig
            for group in names.GALLERY_GROUPS
            if (
                fig := _figure(
                    f"{prefix}_gallery_{group}",
                    f"{group.replace('_', ' ').capitalize()} cases of round {tr.gallery_round}: image, initial, calibrated",
                    draw.gallery_figure(tr, group),
                )
            )
        ],
        throughput=_figure(f"{prefix}_throughput", "Throughput and time per stage", draw.throughput_figure(tr)),
    )


def _search_view(n: int, search: TuneSearch) -> _SearchView:
    best = search.best_trial()
    rows = [
        _TrialRow(
            name=t.info.run_name or t.info.run_id,
            params=[trial_value(t, key) for key in TUNE_PARAMS.values()],
            objective=t.data.metrics.get(names.METRIC_OBJECTIVE),
            stopped_early=stopped_early(t),
            status=t.info.status,
            best=t is best,
        )
        for t in search.ranked_trials()
    ]
    return _SearchView(
        search=search,
        best_objective=search.parent.data.metrics.get(names.METRIC_BEST),
        objective=_figure(
            f"tune{n}_objective",
            "Tune objective against guidance strength w and calibration strength s",
            draw.tune_figure(search),
        ),
        rows=rows,
    )


def _fmt(value: Any) -> str:
    """A table cell: empty for a missing or non-finite value, 4 significant digits for a float."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _environment() -> Environment:
    # autoescape on for the whole template: names and ids come from MLflow and annotators, never trusted as HTML.
    env = Environment(
        loader=PackageLoader("caudo_ray.tracking", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["fmt"] = _fmt
    env.filters["b64"] = lambda data: base64.b64encode(data).decode("ascii")
    return env


_ENV = _environment()


def _render(training: list[TrainingRun], searches: list[TuneSearch]) -> tuple[list[Figure], str]:
    runs = [_run_view(n, tr) for n, tr in enumerate(training)]
    tune = [_search_view(n, search) for n, search in enumerate(searches)]
    page = _ENV.get_template(TEMPLATE).render(
        built=time.strftime("%Y-%m-%d %H:%M:%S"),
        runs=runs,
        searches=tune,
        round_columns=[label for label, _ in _ROUND_COLUMNS],
        answer_columns=_ANSWER_COLUMNS,
        tune_params=list(TUNE_PARAMS),
        objective_name=names.METRIC_OBJECTIVE,
    )
    figures = [fig for view in runs for fig in view.figures]
    figures += [view.objective for view in tune if view.objective is not None]
    return figures, page


# ---------------------------------------------------------------------------------------------------- building


def build_dashboard(
    tracking_uri: str,
    *,
    run_ids: Sequence[str] | None = None,
    experiment: str | None = None,
    out: str | Path | None = None,
    report_run_id: str | None = None,
) -> DashboardResult:
    """Build the dashboard of some runs (or a whole experiment) and log it as a new report run.

    Args:
        tracking_uri: MLflow tracking URI of the source runs; the report run goes to the same store.
        run_ids: source runs (self-training runs or Tune parents); or
        experiment: every self-training run and Tune search of this experiment.
        out: also write the page here (figures as PNGs in ``<out stem>_figures/`` next to it).
        report_run_id: log into this earlier report run instead (a rebuild replaces its page).

    Raises:
        DashboardError: no such run or experiment, or nothing to show.
    """
    t0 = time.perf_counter()
    client = MlflowClient(tracking_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="caudo_dashboard_") as tmp:
        scratch = Path(tmp)
        with quiet_downloads():
            training, searches = collect(client, scratch / "downloads", run_ids, experiment)
        figures, page = _render(training, searches)
        site = scratch / "site"
        (site / "figures").mkdir(parents=True)
        (site / "index.html").write_text(page, encoding="utf-8")
        for fig in figures:
            (site / "figures" / f"{fig.key}.png").write_bytes(fig.png)

        sources = [tr.run for tr in training] + [s.parent for s in searches]
        source_ids = [run.info.run_id for run in sources]
        exp_name = experiment or client.get_experiment(sources[0].info.experiment_id).name
        report = Tracker(
            tracking_uri,
            exp_name,
            run_id=report_run_id,
            run_name=f"dashboard {', '.join(r.info.run_name or r.info.run_id for r in sources)}"[:250],
            tags={names.TAG_KIND: names.KIND_DASHBOARD, names.TAG_SOURCES: ",".join(source_ids)},
        )
        try:
            report.client.log_artifacts(report.run_id, str(site), names.DASHBOARD_DIR)
            report.finish("FINISHED")
        except BaseException:
            report.finish("FAILED")
            raise
        html_path = Path(out) if out is not None else Path.cwd() / "dashboard.html"
        html_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(site / "index.html", html_path)
        figure_dir = html_path.with_name(f"{html_path.stem}_figures")
        shutil.rmtree(figure_dir, ignore_errors=True)
        shutil.copytree(site / "figures", figure_dir)
    return DashboardResult(
        report.run_id,
        report.experiment_id,
        html_path,
        figures,
        source_ids,
        time.perf_counter() - t0,
    )


def link_dashboard(client: MlflowClient, source_run_id: str, result: DashboardResult) -> None:
    """Point a source run at its dashboard: a tag with the report run id and a run description (MLflow UI)."""
    link = f"#/experiments/{result.experiment_id}/runs/{result.run_id}/artifactPath/{result.artifact_path}"
    note = (
        "**Label-quality dashboard**: "
        f"[{result.artifact_path} of report run {result.run_id}]({link}) "
        f"(a self-contained page; also written to `{result.html_path}`). "
        f"Rebuild it with `caudo-ray dashboard --run-id {source_run_id}`."
    )
    client.set_tag(source_run_id, names.TAG_DASHBOARD_RUN, result.run_id)
    client.set_tag(source_run_id, names.TAG_NOTE, note)


def _report_run_of(client: MlflowClient, run_id: str) -> str | None:
    """The report run a run's dashboard went to before, while it is still there to log into."""
    earlier = client.get_run(run_id).data.tags.get(names.TAG_DASHBOARD_RUN)
    if earlier is None:
        return None
    try:
        return earlier if client.get_run(earlier).info.lifecycle_stage == "active" else None
    except MlflowException:
        return None


def build_and_link(tracking_uri: str, run_id: str, out: Path) -> Path | None:
    """Build a self-training run's dashboard and link it from the run; never raises.

    A run rebuilds it after every committed round and when it ends, into the report run it linked before, so
    the page of a run of hours can be watched while it goes and the experiment gets one report run per run.

    Returns:
        The page, or None when the build failed (logged as a warning: the run itself goes on, intact).
    """
    try:
        client = MlflowClient(tracking_uri=tracking_uri)
        result = build_dashboard(tracking_uri, run_ids=[run_id], out=out, report_run_id=_report_run_of(client, run_id))
        link_dashboard(client, run_id, result)
    except Exception:  # a report must not fail the run it reports on
        log.warning("the dashboard of MLflow run %s could not be built", run_id, exc_info=True)
        return None
    log.info(
        "dashboard of run %s: %s (report run %s, built in %.1f s)",
        run_id,
        result.html_path,
        result.run_id,
        result.build_s,
    )
    return result.html_path
