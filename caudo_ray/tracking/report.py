"""Label-quality dashboards built from MLflow runs.

:func:`build_dashboard` reads MLflow only (``search_runs``, metric histories, artifacts), so it works on any
tracking server without access to the run's store. It draws the figures with matplotlib's object API, writes one
self-contained HTML page (figures inlined as base64 PNG, inline CSS, no external URLs) and logs page and PNGs as
artifacts of a report run tagged ``caudo_ray.kind=dashboard``. What a run logs for it beyond metrics (per-case
tables and galleries) is written by :mod:`caudo_ray.tracking.run_log`.

Views: per-round pseudo-label Dice before and after calibration and the calibration gain; selected fraction and
reliability quantiles per round; reliability against true Dice (where the pool has hidden truth); the gallery;
Ray Tune searches (objective against guidance strength w and calibration strength s, from runs tagged
``caudo_ray.kind=tune`` and their nested trials); throughput (``perf/*``).
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.exceptions import MlflowException

from caudo_ray.tracking import names
from caudo_ray.tracking.tracker import Tracker

log = logging.getLogger(__name__)

# What Tune searches log, by name.
TUNE_PARAMS = {"w": names.PARAM_GUIDANCE, "s": names.PARAM_STRENGTH, "steps": names.PARAM_STEPS}

_DPI = 90


class DashboardError(ValueError):
    """The runs asked for do not exist or hold nothing a dashboard can show."""


# -------------------------------------------------------------------------------------------------- collecting


@dataclass
class TrainingRun:
    """What the views of one self-training run need, as read from MLflow."""

    run: Run
    metrics: dict[str, list[tuple[int, float]]]
    tables: dict[int, dict[str, Any]]
    gallery_round: int | None = None
    gallery: dict[str, list[tuple[dict[str, Any], np.ndarray]]] = field(default_factory=dict)
    answers: list[dict[str, Any]] = field(default_factory=list)  # the answered queries (run_log.answered_queries)

    @property
    def name(self) -> str:
        return self.run.info.run_name or self.run.info.run_id

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = sorted(self.metrics.get(key, []))
        return [s for s, _ in points], [v for _, v in points]


@dataclass
class TuneSearch:
    """A Tune search: the parent run and its nested trial runs."""

    parent: Run
    trials: list[Run]


@dataclass
class Figure:
    key: str  # file stem of the PNG
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


def _search_all(client: MlflowClient, experiment_ids: list[str], filter_string: str = "") -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _source_runs(client: MlflowClient, run_ids: Sequence[str] | None, experiment: str | None) -> list[Run]:
    if run_ids:
        runs = []
        for run_id in run_ids:
            try:
                runs.append(client.get_run(run_id))
            except MlflowException as err:
                raise DashboardError(
                    f"MLflow run {run_id!r} not found in {client.tracking_uri}: {err.message}"
                ) from err
        return runs
    if not experiment:
        raise DashboardError("a dashboard needs run ids or an experiment name")
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise DashboardError(f"MLflow experiment {experiment!r} not found in {client.tracking_uri}")
    # Trials show up inside their search's view, report runs are outputs, not sources.
    return [
        run
        for run in _search_all(client, [exp.experiment_id])
        if run.data.tags.get(names.TAG_KIND) != names.KIND_DASHBOARD and names.TAG_PARENT not in run.data.tags
    ]


def _collect_training(client: MlflowClient, run: Run, scratch: Path) -> TrainingRun:
    run_id = run.info.run_id
    metrics = {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)] for key in run.data.metrics}
    tables: dict[int, dict[str, Any]] = {}
    top = {info.path for info in client.list_artifacts(run_id)}
    if "rounds" in top:
        local = Path(client.download_artifacts(run_id, "rounds", str(scratch / run_id)))
        for path in local.glob("round_*/cases.json"):
            table = json.loads(path.read_text())
            tables[int(table["round"])] = table
    out = TrainingRun(run, metrics, tables)
    if names.ANSWERED_QUERIES.split("/")[0] in top:
        local = Path(client.download_artifacts(run_id, names.ANSWERED_QUERIES, str(scratch / run_id)))
        out.answers = json.loads(local.read_text())["answers"]
    with_gallery = [r for r, t in tables.items() if any(t.get("gallery", {}).values())]
    if with_gallery:
        r = max(with_gallery)
        local = Path(client.download_artifacts(run_id, names.GALLERY_DIR.format(r=r), str(scratch / run_id)))
        out.gallery_round = r
        for group, entries in tables[r]["gallery"].items():
            out.gallery[group] = [(entry, _read_png(local / Path(entry["artifact"]).name)) for entry in entries]
    return out


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@contextlib.contextmanager
def _quiet_downloads():
    """No MLflow download progress bars: a dashboard built at the end of a run would print one per folder."""
    name = MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def collect(
    client: MlflowClient,
    scratch: Path,
    run_ids: Sequence[str] | None = None,
    experiment: str | None = None,
) -> tuple[list[TrainingRun], list[TuneSearch]]:
    """The self-training runs and Tune searches to show, read from MLflow (artifacts go to ``scratch``)."""
    training, searches = [], []
    for run in _source_runs(client, run_ids, experiment):
        if run.data.tags.get(names.TAG_KIND) == names.KIND_TUNE:
            trials = _search_all(
                client,
                [run.info.experiment_id],
                f"tags.`{names.TAG_PARENT}` = '{run.info.run_id}'",
            )
            searches.append(TuneSearch(run, trials))
        elif run.data.tags.get(names.TAG_KIND) != names.KIND_DASHBOARD:
            training.append(_collect_training(client, run, scratch))
    if not training and not searches:
        raise DashboardError("no self-training runs or Tune searches among the runs asked for")
    return training, searches


# ---------------------------------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    # matplotlib.figure.Figure without pyplot: no global state, no GUI backend, safe in threads.
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(width, height))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _png(fig) -> bytes:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_xlabel() == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _quality_figure(tr: TrainingRun) -> bytes | None:
    keys = [
        names.PSEUDO_DICE_INITIAL,
        names.PSEUDO_DICE_CALIBRATED,
        names.VAL_DICE,
    ]
    if not any(tr.metrics.get(k) for k in keys):
        return None
    fig, axes = _new_figure(10, 3.2, ncols=2)
    ax = axes[0, 0]
    for key, label in zip(
        keys,
        [
            "initial pseudo labels",
            "calibrated pseudo labels",
            "segmenter on validation",
        ],
    ):
        steps, values = tr.series(key)
        if steps:
            ax.plot(steps, values, marker="o", label=label)
    ax.set(title="Dice per round", xlabel="round", ylabel="Dice")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    steps, gains = tr.series(names.CALIBRATION_GAIN)
    ax.bar(steps, gains, color=["tab:green" if g >= 0 else "tab:red" for g in gains])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(
        title="calibration gain (calibrated - initial Dice)",
        xlabel="round",
        ylabel="Dice gain",
    )
    return _png(fig)


def _annotations_figure(tr: TrainingRun) -> bytes | None:
    """Validation Dice of each round's segmenter against the answered queries it trained on."""
    made = dict(tr.metrics.get(names.ANNOTATIONS, []))
    # Rounds' segmenters, then the final one (its step is the number of rounds, its Dice final/val_dice).
    val = dict(tr.metrics.get(names.VAL_DICE, [])) | dict(tr.metrics.get(f"{names.FINAL_VAL_PREFIX}dice", []))
    final = max(dict(tr.metrics.get(f"{names.FINAL_VAL_PREFIX}dice", [])), default=None)
    steps = sorted(set(made) & set(val))
    if not steps or not any(made.values()):
        return None
    fig, axes = _new_figure(5.5, 3.2)
    ax = axes[0, 0]
    x, y = [made[r] for r in steps], [val[r] for r in steps]
    ax.plot(x, y, marker="o")
    for r, xi, yi in zip(steps, x, y):
        ax.annotate("final" if r == final else f"round {r}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(title="segmenter on validation against annotations made", xlabel="annotations in use", ylabel="val Dice")
    return _png(fig)


def _answers_table(tr: TrainingRun) -> str:
    if not tr.answers:
        return ""
    columns = [("case", "case_id"), ("joined round", "round"), ("reliability when asked", "reliability_before"), ("annotator", "annotator"), ("time", "time")]
    head = "".join(f"<th class='text'>{label}</th>" for label, _ in columns)
    rows = "".join("<tr>" + "".join(f"<td class='text'>{_fmt(a.get(key))}</td>" for _, key in columns) + "</tr>" for a in tr.answers)
    return f"<table><tr>{head}</tr>{rows}</table>"


def _selection_figure(tr: TrainingRun) -> bytes | None:
    steps, fractions = tr.series(names.SELECTED_FRACTION)
    if not steps:
        return None
    fig, axes = _new_figure(10, 3.2, ncols=2)
    ax = axes[0, 0]
    ax.bar(steps, fractions, color="tab:blue")
    _, counts = tr.series(names.SELECTED)
    for s, f, n in zip(steps, fractions, counts):
        ax.annotate(f"{int(n)}", (s, f), ha="center", va="bottom", fontsize=8)
    ax.set(
        title="selected for the next round (count on bars)",
        xlabel="round",
        ylabel="fraction of pool",
        ylim=(0, 1.1),
    )
    ax = axes[0, 1]
    for key in (
        names.RELIABILITY_P10,
        names.RELIABILITY_P50,
        names.RELIABILITY_MEAN,
        names.AGREEMENT_MEAN,
        names.ACCEPTED_FRACTION,
    ):
        s, v = tr.series(key)
        if s:
            ax.plot(s, v, marker="o", label=key.split("/", 1)[1])
    ax.set(title="reliability of the pool, calibrations accepted", xlabel="round", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    return _png(fig)


def _reliability_figure(tr: TrainingRun) -> bytes | None:
    rounds = [r for r in sorted(tr.tables) if any(v is not None for v in tr.tables[r].get("calibrated_dice", []))]
    if not rounds:
        return None
    rounds = rounds[-4:]
    fig, axes = _new_figure(3.4 * len(rounds) + 0.6, 3.4, ncols=len(rounds))
    for ax, r in zip(axes[0], rounds):
        t = tr.tables[r]
        rel = np.array([np.nan if v is None else v for v in t["reliability"]], dtype=float)
        dice = np.array([np.nan if v is None else v for v in t["calibrated_dice"]], dtype=float)
        chosen = np.array(t["selected"], dtype=bool)
        ok = np.isfinite(rel) & np.isfinite(dice)
        ax.scatter(
            rel[ok & ~chosen],
            dice[ok & ~chosen],
            s=12,
            alpha=0.6,
            color="tab:gray",
            label="not selected",
        )
        ax.scatter(
            rel[ok & chosen],
            dice[ok & chosen],
            s=12,
            alpha=0.8,
            color="tab:blue",
            label="selected",
        )
        rho = dict(tr.metrics.get(names.RELIABILITY_SPEARMAN, [])).get(r)
        title = f"round {r}" + (f" (Spearman {rho:.2f})" if rho is not None else "")
        ax.set(
            title=title,
            xlabel="reliability",
            ylabel="true Dice (calibrated)",
            xlim=(0, 1.02),
            ylim=(0, 1.02),
        )
        ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


_GALLERY_CELLS = ("changed_fraction", "reliability", "initial_dice", "calibrated_dice")


def _gallery_figure(tr: TrainingRun, group: str) -> bytes | None:
    entries = tr.gallery.get(group, [])
    if not entries:
        return None
    table = tr.tables[tr.gallery_round]
    row_of = {cid: i for i, cid in enumerate(table["case_id"])}
    ncols = 2
    nrows = math.ceil(len(entries) / ncols)
    fig, axes = _new_figure(10, 2.0 * nrows + 0.4, ncols=ncols, nrows=nrows)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (entry, panel) in zip(axes.flat, entries):
        i = row_of.get(entry["case_id"])
        cell = {name: (table[name][i] if i is not None and name in table else None) for name in _GALLERY_CELLS}
        parts = [entry["case_id"]]
        if cell["changed_fraction"] is not None:
            parts.append(f"changed {cell['changed_fraction']:.0%}")
        if cell["reliability"] is not None:
            parts.append(f"rel {cell['reliability']:.2f}")
        if cell["initial_dice"] is not None and cell["calibrated_dice"] is not None:
            parts.append(f"Dice {cell['initial_dice']:.2f}->{cell['calibrated_dice']:.2f}")
        ax.imshow(panel, interpolation="nearest")
        ax.set_title("  ".join(parts), fontsize=8)
    fig.suptitle(
        f"round {tr.gallery_round}, {group.replace('_', ' ')}: image | initial | calibrated",
        fontsize=10,
    )
    return _png(fig)


def _throughput_figure(tr: TrainingRun) -> bytes | None:
    steps, rate = tr.series(names.CASES_PER_S)
    stages = [
        (names.INFER_S_PER_CASE, "segmenter"),
        (names.DDIM_S_PER_CASE, "DDIM"),
        (names.SCORE_S_PER_CASE, "scores"),
        (names.STORE_S_PER_CASE, "store write"),
    ]
    if not steps and not any(tr.metrics.get(k) for k, _ in stages):
        return None
    fig, axes = _new_figure(12, 3.2, ncols=3)
    axes[0, 0].plot(steps, rate, marker="o")
    axes[0, 0].set(title="labelling throughput", xlabel="round", ylabel="cases / s")
    ax = axes[0, 1]
    bottom: dict[int, float] = {}
    for key, label in stages:
        s, v = tr.series(key)
        ax.bar(
            s,
            [x * 1000 for x in v],
            bottom=[bottom.get(i, 0.0) for i in s],
            label=label,
        )
        for i, x in zip(s, v):
            bottom[i] = bottom.get(i, 0.0) + x * 1000
    ax.set(
        title="time per case by stage (summed over workers)",
        xlabel="round",
        ylabel="ms / case",
    )
    ax.legend(fontsize=8)
    s, v = tr.series(names.TRAIN_S)
    axes[0, 2].bar(s, v, color="tab:purple")
    axes[0, 2].set(title="training time per round", xlabel="round", ylabel="s")
    return _png(fig)


def _trial_value(run: Run, key: str) -> float | None:
    text = run.data.params.get(key)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _stopped_early(trial: Run) -> bool:
    return trial.data.tags.get(names.TAG_STOPPED_EARLY) == "true"


def _best_trial(search: TuneSearch) -> Run | None:
    """The trial the search chose (the parent's ``best.*`` params), else the highest final objective."""
    chosen = {key: search.parent.data.params.get(names.BEST_PREFIX + key) for key in TUNE_PARAMS.values()}
    if all(v is not None for v in chosen.values()):
        for trial in search.trials:
            if all(_trial_value(trial, key) == float(v) for key, v in chosen.items()):
                return trial
    scored = [t for t in search.trials if names.METRIC_OBJECTIVE in t.data.metrics]
    return max(scored, key=lambda t: t.data.metrics[names.METRIC_OBJECTIVE]) if scored else None


def _tune_figure(search: TuneSearch) -> bytes | None:
    points = []
    for trial in search.trials:
        values = {name: _trial_value(trial, key) for name, key in TUNE_PARAMS.items()}
        values["objective"] = trial.data.metrics.get(names.METRIC_OBJECTIVE)
        if all(values[k] is not None for k in ("objective", "w", "s")):
            points.append((trial, values))
    if not points:
        return None
    axes_of = [("w", "guidance strength w", "s"), ("s", "calibration strength s", "w")]
    if len({v["steps"] for _, v in points}) > 1:
        axes_of.append(("steps", "DDIM steps", "w"))
    best = _best_trial(search)
    fig, axes = _new_figure(4.4 * len(axes_of), 3.4, ncols=len(axes_of))
    colour_range = {k: (min(v[k] for _, v in points), max(v[k] for _, v in points)) for k in ("w", "s")}
    for ax, (name, label, colour_by) in zip(axes[0], axes_of):
        lo, hi = colour_range[colour_by]
        for stopped, marker, legend in (
            (False, "o", "evaluated fully"),
            (True, "X", "stopped early (ASHA)"),
        ):
            group = [v for t, v in points if _stopped_early(t) == stopped]
            if group:
                sc = ax.scatter(
                    [v[name] for v in group],
                    [v["objective"] for v in group],
                    c=[v[colour_by] for v in group],
                    cmap="viridis",
                    vmin=lo,
                    vmax=hi,
                    s=36,
                    marker=marker,
                    label=legend,
                )
        if best is not None and names.METRIC_OBJECTIVE in best.data.metrics:
            ax.scatter(
                [_trial_value(best, TUNE_PARAMS[name])],
                [best.data.metrics[names.METRIC_OBJECTIVE]],
                marker="*",
                s=260,
                facecolors="none",
                edgecolors="red",
                label="chosen",
            )
        fig.colorbar(sc, ax=ax, label=colour_by)
        ax.set(title=f"objective vs {name}", xlabel=label, ylabel=names.METRIC_OBJECTIVE)
        ax.legend(fontsize=7)
    return _png(fig)


# ------------------------------------------------------------------------------------------------------- page

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; max-width: 1240px; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ccc; padding-bottom: 4px; margin-top: 32px; }
h3 { font-size: 15px; margin-bottom: 4px; } p.meta { color: #666; font-size: 13px; }
figure { margin: 8px 0 20px 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #555; }
table { border-collapse: collapse; font-size: 12px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; } th { background: #f4f4f4; }
td.text, th.text { text-align: left; } tr.best td { background: #fff4d6; }
"""

# Runs once the page has loaded: every image must have decoded and no script error may have fired. The result
# goes into the DOM, where a headless browser (`chromium --headless --dump-dom`) reads it.
_STATUS_SCRIPT = """
(function () {
  var errors = [];
  window.onerror = function (message) { errors.push(String(message)); };
  window.addEventListener("error", function (e) { errors.push(String(e.message || e.type)); }, true);
  window.addEventListener("load", function () {
    var images = document.images, decoded = 0;
    for (var i = 0; i < images.length; i++) {
      if (images[i].complete && images[i].naturalWidth > 0) { decoded++; }
    }
    var body = document.body;
    body.setAttribute("data-figures", String(decoded));
    body.setAttribute("data-broken", String(images.length - decoded));
    body.setAttribute("data-errors", errors.join(" | "));
    body.setAttribute("data-status", decoded === images.length && errors.length === 0 ? "ok" : "error");
  });
})();
"""

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


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _img(fig: Figure) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    return f'<figure><img alt="{html.escape(fig.title)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(fig.title)}</figcaption></figure>'


def _round_table(tr: TrainingRun) -> str:
    by_key = {key: dict(tr.metrics.get(key, [])) for _, key in _ROUND_COLUMNS}
    rounds = sorted({s for points in by_key.values() for s in points})
    if not rounds:
        return ""
    head = "".join(f"<th>{html.escape(label)}</th>" for label, _ in _ROUND_COLUMNS)
    rows = "".join(
        f"<tr><td>{r}</td>" + "".join(f"<td>{_fmt(by_key[key].get(r))}</td>" for _, key in _ROUND_COLUMNS) + "</tr>"
        for r in rounds
    )
    return f"<table><tr><th>round</th>{head}</tr>{rows}</table>"


def _tune_table(search: TuneSearch) -> str:
    trials = sorted(search.trials, key=lambda t: -t.data.metrics.get(names.METRIC_OBJECTIVE, -math.inf))
    if not trials:
        return "<p class='meta'>no trials logged</p>"
    best = _best_trial(search)
    head = (
        "".join(f"<th>{name}</th>" for name in TUNE_PARAMS)
        + f"<th>{names.METRIC_OBJECTIVE}</th><th>stopped early</th><th>status</th>"
    )
    rows = []
    for t in trials:
        cells = "".join(f"<td>{_fmt(_trial_value(t, key))}</td>" for key in TUNE_PARAMS.values())
        mark = ' class="best"' if t is best else ""
        rows.append(
            f"<tr{mark}><td class='text'>{html.escape(t.info.run_name or t.info.run_id)}</td>{cells}"
            f"<td>{_fmt(t.data.metrics.get(names.METRIC_OBJECTIVE))}</td><td>{'yes' if _stopped_early(t) else ''}</td>"
            f"<td class='text'>{html.escape(t.info.status)}</td></tr>"
        )
    return f"<table><tr><th class='text'>trial</th>{head}</tr>{''.join(rows)}</table>"


def _render(training: list[TrainingRun], searches: list[TuneSearch]) -> tuple[list[Figure], str]:
    figures: list[Figure] = []
    sections: list[str] = []

    def add(key: str, title: str, png: bytes | None) -> str:
        if png is None:
            return ""
        fig = Figure(key, title, png)
        figures.append(fig)
        return _img(fig)

    for n, tr in enumerate(training):
        run_id = tr.run.info.run_id
        prefix = f"run{n}"
        has_truth = bool(tr.metrics.get(names.PSEUDO_DICE_CALIBRATED))
        parts = [
            f"<h2>Self-training run {html.escape(tr.name)}</h2>",
            (
                f"<p class='meta'>run id {run_id} &middot; status {html.escape(tr.run.info.status)} &middot; "
                f"{len(tr.tables)} round case tables</p>"
            ),
            "<h3>Pseudo-label quality per round</h3>",
            _round_table(tr),
            add(
                f"{prefix}_quality",
                "Pseudo-label Dice before and after calibration, and calibration gain",
                _quality_figure(tr),
            )
            or "<p class='meta'>no hidden truth in the pool: pseudo-label Dice is not measured</p>",
            "<h3>Selection</h3>",
            add(
                f"{prefix}_selection",
                "Selected fraction and reliability per round",
                _selection_figure(tr),
            ),
        ]
        if tr.answers or any(v for _, v in tr.metrics.get(names.ANNOTATIONS, [])):
            parts += [
                "<h3>What annotations bought</h3>",
                add(f"{prefix}_annotations", "Validation Dice against the answered queries each round trained on", _annotations_figure(tr)),
                _answers_table(tr),
            ]
        if has_truth:
            parts += [
                "<h3>Reliability vs true Dice</h3>",
                add(
                    f"{prefix}_reliability",
                    "Reliability against true Dice of the calibrated labels, per case",
                    _reliability_figure(tr),
                ),
            ]
        if tr.gallery:
            parts.append("<h3>Gallery</h3>")
            for group in names.GALLERY_GROUPS:
                title = f"{group.replace('_', ' ').capitalize()} cases of round {tr.gallery_round}: image, initial, calibrated"
                parts.append(add(f"{prefix}_gallery_{group}", title, _gallery_figure(tr, group)))
        parts += [
            "<h3>Throughput</h3>",
            add(
                f"{prefix}_throughput",
                "Throughput and time per stage",
                _throughput_figure(tr),
            ),
        ]
        sections.append("\n".join(p for p in parts if p))

    for n, search in enumerate(searches):
        best = search.parent.data.metrics.get(names.METRIC_BEST)
        parts = [
            f"<h2>Tune search {html.escape(search.parent.info.run_name or search.parent.info.run_id)}</h2>",
            f"<p class='meta'>run id {search.parent.info.run_id} &middot; {len(search.trials)} trials"
            + (f" &middot; best objective {_fmt(best)}" if best is not None else "")
            + "</p>",
            add(
                f"tune{n}_objective",
                "Tune objective against guidance strength w and calibration strength s",
                _tune_figure(search),
            ),
            _tune_table(search),
        ]
        sections.append("\n".join(p for p in parts if p))

    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<title>caudo-ray label-quality dashboard</title>"
        f"<style>{_CSS}</style><script>{_STATUS_SCRIPT}</script></head>\n"
        "<body data-status='loading'>\n<h1>caudo-ray label-quality dashboard</h1>\n"
        f"<p class='meta'>built {time.strftime('%Y-%m-%d %H:%M:%S')} from MLflow</p>\n"
        + "\n".join(sections)
        + "\n</body></html>\n"
    )
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
        with _quiet_downloads():
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
