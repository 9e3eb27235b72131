"""Label and calibrate a new dataset with a finished run's models: one round, resumable, exported as files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from caudo_ray import data as D
from caudo_ray.config import load_config
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.rounds.executor import LocalExecutor, TrainContext
from caudo_ray.rounds.loop import stream_round
from caudo_ray.rounds.steps import select_and_commit
from caudo_ray.run.coordinator import ExecutorFactory
from caudo_ray.run.prepare import load_pool
from caudo_ray.store import PseudoLabelStore, export_round
from caudo_ray.workspace import Workspace


def calibrate_dataset(
    run_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    overrides: dict[str, Any] | None = None,
    executor_factory: ExecutorFactory | None = None,
    fmt: str = "source",
    progress: bool = True,
) -> dict:
    """Label and calibrate every image of a dataset folder with a finished run's last round of models.

    Writes ``<out_dir>/store.zarr`` (one round, resumable like a run's round) and exports the calibrated labels
    at each image's original geometry to ``<out_dir>/labels``; reliability and annotation queries come with it.
    ``overrides`` (dotted config keys, e.g. ``runtime.address``) apply on top of the run's config.

    Returns:
        The round summary, plus ``labels_dir``, ``written`` and ``skipped``.
    """
    run = Workspace(Path(run_dir))
    cfg = load_config(run.config_path, {**(overrides or {}), "work_dir": str(out_dir), "runtime.store_url": None})
    rounds = run.saved_rounds()
    if not rounds:
        raise FileNotFoundError(f"{run.models_dir}: no round models; is {run_dir} the work dir of a run?")
    models = RoundModels.load(run.model_path(rounds[-1]))

    out = Workspace.of(cfg)
    out.root.mkdir(parents=True, exist_ok=True)
    index = D.index_dataset(data_dir, group_column=None, nifti_axis=cfg.data.nifti_axis)
    refs = index.labelled + index.unlabelled
    store = PseudoLabelStore.open_or_create(
        out.store_url,
        case_ids=[r.case_id for r in refs],
        working_size=tuple(cfg.data.working_size),
        num_classes=models.num_classes,
        config_hash=f"{cfg.method_hash()}:{models.version}",
        provenance={"run": str(Path(run_dir).resolve()), "data": str(data_dir), "model_version": models.version},
    )
    skipped: dict[str, str] = dict(index.problems)
    load_pool(store, refs, cfg, models.num_classes, lambda source, reason: skipped.__setitem__(source, reason), progress)

    ctx = TrainContext(cfg, store.url, models.num_classes)
    executor = (executor_factory or (lambda c: LocalExecutor(c, progress)))(ctx)
    try:
        owner = executor.owner(store)
        if not owner.rounds.is_committed(0):
            perf, _ = stream_round(cfg, owner, executor, 0, models, progress)
            select_and_commit(cfg, owner, 0, {"perf": perf})
        summary = owner.rounds.summary(0)
    finally:
        executor.close()
    labels_dir = out.root / "labels"
    written = export_round(store, 0, labels_dir, fmt=fmt)
    return {**summary, "labels_dir": str(labels_dir), "written": len(written), "skipped": skipped}
