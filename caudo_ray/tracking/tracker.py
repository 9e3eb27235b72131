"""MLflow tracking through ``MlflowClient`` with explicit run ids.

The fluent ``mlflow.log_*`` API keeps the active run in process-global state, which is not safe when the
coordinator logs from several threads or when Tune trials log nested runs side by side; every call here names
its run id instead.

Every name logged is in :mod:`caudo_ray.tracking.names`.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

_UNSAFE_ARTIFACT_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_PARAM_LEN = 6000


def sqlite_tracking_uri(db_path: str | Path) -> str:
    """The URI of a sqlite tracking store (a run's default: MLflow's file store is deprecated and unsafe to share)."""
    return f"sqlite:///{Path(db_path).resolve()}"


def sanitize_artifact_path(path: str) -> str:
    """Make an artifact sub-path safe: no absolute paths, no ``..``, only plain characters per component."""
    parts = [_UNSAFE_ARTIFACT_CHARS.sub("_", p) for p in str(path).replace("\\", "/").split("/")]
    parts = [p for p in parts if p not in ("", ".", "..")]
    return "/".join(parts)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class Tracker:
    """One MLflow run, addressed by id.

    Args:
        tracking_uri: any MLflow tracking URI (``sqlite:///...``, ``http://host:5000``).
        experiment: experiment name; created on first use, with artifacts under ``artifact_root`` when given.
        run_id: continue this run (a resumed self-training run logs into the run it started).
        run_name: name of a new run.
        parent_run_id: makes the new run a nested child (Tune trials).
        artifact_root: artifact location for a new experiment, e.g. the work dir's ``mlartifacts``.
        tags: tags of a new run.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        *,
        run_id: str | None = None,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        artifact_root: str | Path | None = None,
        tags: Mapping[str, str] | None = None,
    ):
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri)
        if run_id is not None:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            return
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = Path(artifact_root).resolve().as_uri() if artifact_root is not None else None
            experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        else:
            experiment_id = exp.experiment_id
        all_tags = dict(tags or {})
        if parent_run_id is not None:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id

    @property
    def experiment_id(self) -> str:
        return self.client.get_run(self.run_id).info.experiment_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (flattened) params once; values already logged with the same value are skipped on resume."""
        existing = self.client.get_run(self.run_id).data.params
        batch = []
        for key, value in flatten(params).items():
            text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
            text = text[:_MAX_PARAM_LEN]
            if existing.get(key) == text:
                continue
            batch.append(Param(key, text))
        for i in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[i : i + 100], synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and not math.isnan(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), sanitize_artifact_path(artifact_path) if artifact_path else None)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, sanitize_artifact_path(artifact_file))

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, sanitize_artifact_path(artifact_file))

    def log_image(self, image: Any, artifact_file: str) -> None:
        """Log an (H, W[, 3]) uint8 array or PIL image as a PNG artifact."""
        self.client.log_image(self.run_id, image, artifact_file=sanitize_artifact_path(artifact_file))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]
