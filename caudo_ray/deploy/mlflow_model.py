"""Logging a run's final segmenter as an MLflow Model and registering it under ``tracking.model_name``.

The model is the ``python_function`` of :mod:`caudo_ray.deploy.pyfunc`, logged from code with the caudo-ray
package as its code path and exact pip requirements, so ``mlflow models serve`` and ``mlflow.pyfunc.load_model``
run it where caudo-ray is not installed. Its registered version carries the run's validation Dice, exemplar ids
and config hash as tags.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.pyfunc
from mlflow.models import Model
from mlflow.models.model import ModelInfo
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from packaging.version import Version

import caudo_ray
from caudo_ray.config import RunConfig
from caudo_ray.deploy import pyfunc
from caudo_ray.deploy.from_run import provenance, segmenter_of
from caudo_ray.deploy.segmenter import Segmenter
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.tracking import names
from caudo_ray.tracking.tracker import Tracker
from caudo_ray.workspace import Workspace

log = logging.getLogger(__name__)

# Passed to MLflow as a path, never imported here: running it registers the model object (set_model).
MODEL_CODE = Path(__file__).with_name("model_code.py")
MODEL_NAME = "segmenter"  # the final segmenter's logged model, within its run
ROUND_MODEL_NAME = "segmenter_round_{r}"  # tracking.round_models: each round's segmenter, not registered
# What the model imports when it runs (caudo_ray.deploy.pyfunc and what it needs); pinned to this environment's
# versions so a served model behaves as the run's own code did.
REQUIREMENTS = ("mlflow", "torch", "monai", "numpy", "pillow", "pyyaml", "safetensors")


@dataclass(frozen=True)
class LoggedSegmenter:
    """Where a run's segmenter went: its logged model and, when registered, its registry version.

    Attributes:
        model_uri: ``models:/<model_id>``, loadable with ``mlflow.pyfunc.load_model``.
        registered_name: ``tracking.model_name``, or None when not registered.
        version: the registered version, or None.
    """

    model_uri: str
    registered_name: str | None = None
    version: str | None = None

    @property
    def registry_uri(self) -> str | None:
        """``models:/<name>/<version>``: what ``mlflow models serve -m`` takes."""
        return f"models:/{self.registered_name}/{self.version}" if self.version is not None else None


@contextmanager
def _tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for the block; the caller's URI and its ``MLFLOW_TRACKING_URI``
    come back afterwards (MLflow's own helper unsets that variable when no URI was set before)."""
    variable = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with _use_tracking_uri(uri):
            yield
    finally:
        if variable is not None:
            os.environ["MLFLOW_TRACKING_URI"] = variable


def pip_requirements() -> list[str]:
    """:data:`REQUIREMENTS` at this environment's public versions (a local tag such as torch's ``+cpu`` is dropped:
    no index serves it)."""
    return [f"{name}=={Version(importlib.metadata.version(name)).public}" for name in REQUIREMENTS]


def pyfunc_model_args(segmenter_folder: Path) -> dict:
    """The arguments of MLflow's pyfunc ``log_model`` / ``save_model`` for a segmenter saved in ``segmenter_folder``."""
    return {
        "python_model": str(MODEL_CODE),
        "artifacts": {pyfunc.ARTIFACT: str(segmenter_folder)},
        "code_paths": [str(Path(caudo_ray.__file__).parent)],
        "signature": pyfunc.signature(),
        "input_example": pyfunc.input_example(),
        "pip_requirements": pip_requirements(),
    }


def save_mlflow_model(segmenter: Segmenter, out: Path) -> Path:
    """Write ``segmenter`` as an MLflow Model folder (``MLmodel`` and its files) at ``out``, outside any run."""
    with tempfile.TemporaryDirectory() as tmp:
        mlflow.pyfunc.save_model(path=str(out), **pyfunc_model_args(segmenter.save(Path(tmp) / pyfunc.ARTIFACT)))
    return Path(out)


def log_final_model(cfg: RunConfig, tracker: Tracker, model_path: Path, exemplar_ids: list[str]) -> LoggedSegmenter:
    """Log the final segmenter as the run's MLflow Model and register it, once per run.

    With ``tracking.round_models``, each saved round's segmenter is logged first (``segmenter_round_<r>``, not
    registered). A resumed run whose model is already logged (run tag :data:`names.TAG_MODEL_URI`) logs nothing
    again.

    Args:
        cfg: the run's config (network shape, working size, label names, ``tracking.model_name``).
        tracker: the run's MLflow run.
        model_path: the final segmenter's weights (``models/final.pt``), with its validation metrics.
        exemplar_ids: the case ids the segmenter was trained from (a tag of the registered version).

    Returns:
        Where the model was logged and registered.
    """
    done = tracker.client.get_run(tracker.run_id).data.tags
    if names.TAG_MODEL_URI in done:
        return LoggedSegmenter(done[names.TAG_MODEL_URI], done.get(names.TAG_MODEL_NAME), done.get(names.TAG_MODEL_VERSION))
    if cfg.tracking.round_models:
        ws = Workspace.of(cfg)
        for r in ws.saved_rounds():
            _log_model(cfg, tracker, ws.model_path(r), exemplar_ids, ROUND_MODEL_NAME.format(r=r), None)
    info, tags = _log_model(cfg, tracker, model_path, exemplar_ids, MODEL_NAME, cfg.tracking.model_name)
    logged = LoggedSegmenter(info.model_uri)
    run_tags = {names.TAG_MODEL_URI: info.model_uri}
    if info.registered_model_version is not None:
        version = str(info.registered_model_version)
        for key, value in tags.items():
            tracker.client.set_model_version_tag(cfg.tracking.model_name, version, key, value)
        logged = LoggedSegmenter(info.model_uri, cfg.tracking.model_name, version)
        run_tags |= {names.TAG_MODEL_NAME: cfg.tracking.model_name, names.TAG_MODEL_VERSION: version}
    tracker.set_tags(run_tags)
    log.info("final segmenter logged as %s%s", info.model_uri, f", registered as {logged.registry_uri}" if logged.version else "")
    return logged


def _log_model(
    cfg: RunConfig, tracker: Tracker, model_path: Path, exemplar_ids: list[str], name: str, registered_name: str | None
) -> tuple[ModelInfo, dict[str, str]]:
    """Log the segmenter of ``model_path`` as the run's model ``name``; returns MLflow's answer and the tags."""
    models = RoundModels.load(model_path)
    origin = provenance(cfg, models, exemplar_ids)
    tags = {
        names.TAG_METHOD_HASH: origin["method_hash"],
        names.TAG_EXEMPLARS: json.dumps(origin["exemplars"]),
        names.TAG_VAL_DICE: "none" if origin["val_dice"] is None else f"{origin['val_dice']:.6f}",
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = segmenter_of(cfg, models, source=str(model_path)).save(Path(tmp) / pyfunc.ARTIFACT)
        # Created here, in the run's experiment: left to Model.log, it would land in MLflow's active experiment.
        model = tracker.client.create_logged_model(
            tracker.experiment_id, name=name, source_run_id=tracker.run_id, tags=tags, model_type="segmenter"
        )
        # Model.log is MLflow's model API with an explicit run id; it resolves the store from the global tracking
        # URI, which is pointed at this run's store only for the call (the coordinator is one thread here).
        with _tracking_uri(tracker.tracking_uri):
            info = Model.log(
                artifact_path=None,  # deprecated in favour of name, but still a required positional argument
                name=name,
                flavor=mlflow.pyfunc,
                run_id=tracker.run_id,
                model_id=model.model_id,
                registered_model_name=registered_name,
                **pyfunc_model_args(folder),
            )
    return info, tags
