"""What a dashboard shows, read from MLflow alone: self-training runs and Ray Tune searches.

Reads ``search_runs``, metric histories and artifacts only, so it works on any tracking server without access to
the run's store. What a run logs for it beyond metrics (per-case tables, galleries, answered queries) is written by
:mod:`caudo_ray.tracking.run_log`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.exceptions import MlflowException
from PIL import Image

from caudo_ray.tracking import names

# What Tune searches log, by name.
TUNE_PARAMS = {"w": names.PARAM_GUIDANCE, "s": names.PARAM_STRENGTH, "steps": names.PARAM_STEPS}


class DashboardError(ValueError):
    """The runs asked for do not exist or hold nothing a dashboard can show."""


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


def trial_value(run: Run, key: str) -> float | None:
    """A Tune trial's parameter ``key`` as a number, None where it is missing or not a number."""
    text = run.data.params.get(key)
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def stopped_early(trial: Run) -> bool:
    return trial.data.tags.get(names.TAG_STOPPED_EARLY) == "true"


@dataclass
class TuneSearch:
    """A Tune search: the parent run and its nested trial runs."""

    parent: Run
    trials: list[Run]

    @property
    def name(self) -> str:
        return self.parent.info.run_name or self.parent.info.run_id

    def best_trial(self) -> Run | None:
        """The trial the search chose (the parent's ``best.*`` params), else the highest final objective."""
        chosen = {key: self.parent.data.params.get(names.BEST_PREFIX + key) for key in TUNE_PARAMS.values()}
        if all(v is not None for v in chosen.values()):
            for trial in self.trials:
                if all(trial_value(trial, key) == float(v) for key, v in chosen.items()):
                    return trial
        scored = [t for t in self.trials if names.METRIC_OBJECTIVE in t.data.metrics]
        return max(scored, key=lambda t: t.data.metrics[names.METRIC_OBJECTIVE]) if scored else None

    def ranked_trials(self) -> list[Run]:
        """The trials, highest objective first (trials without one last)."""
        return sorted(self.trials, key=lambda t: -t.data.metrics.get(names.METRIC_OBJECTIVE, -math.inf))


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
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


@contextlib.contextmanager
def quiet_downloads() -> Iterator[None]:
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
    """The self-training runs and Tune searches to show, read from MLflow (artifacts go to ``scratch``).

    Raises:
        DashboardError: no such run or experiment, or nothing to show.
    """
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
