"""The coordinator: rounds of train -> label (streamed) -> select -> commit, resumable from the store.

The coordinator owns the store's group attributes, round commits and the MLflow run. Where the work runs is an
:class:`Executor`: :class:`LocalExecutor` runs it in this process (``--no-ray``), ``caudo_ray.actors.RayExecutor``
on a trainer actor and a pool of calibration workers. Both execute the same ``pipeline`` steps, so the choice
changes speed, never results.

Memory: the pool is streamed as index batches; the driver holds indices, per-round (N,) score vectors at commit
and nothing per-pixel, so its footprint does not grow with the images in the pool.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm.auto import tqdm

from caudo_ray import dashboard, pipeline, tracking
from caudo_ray.config import RunConfig
from caudo_ray.method import (
    LabelingEngine,
    RoundModels,
    TrainingCheckpoint,
    resolve_device,
    train_round_models,
    training_checkpoint_path,
)
from caudo_ray.store import PseudoLabelStore
from caudo_ray.workspace import PreparedRun, Workspace, load_labelled, prepare_run

log = logging.getLogger("caudo_ray")


class Executor(Protocol):
    """Where training and labelling run. Implementations add placement, never method logic."""

    def train(self, r: int, previous: RoundModels | None, *, with_calibrator: bool = True) -> RoundModels: ...

    def label(self, r: int, models: RoundModels, batches: Iterable[np.ndarray]) -> Iterator[pipeline.BatchStats]: ...

    def owner(self, store: PseudoLabelStore) -> PseudoLabelStore:
        """The store handle through which the coordinator begins and commits rounds."""
        ...

    def close(self) -> None: ...


@dataclass
class TrainContext:
    """What a trainer needs besides the store: the config, class count and validation cases."""

    cfg: RunConfig
    store_url: str
    num_classes: int
    val_images: np.ndarray | None = None
    val_labels: np.ndarray | None = None

    def train(
        self,
        r: int,
        previous: RoundModels | None,
        *,
        with_calibrator: bool = True,
        progress: bool = False,
        wrap_model=None,
        rank: int = 0,
    ) -> RoundModels | None:
        store = PseudoLabelStore.open(self.store_url)
        inputs = pipeline.training_inputs(store, r)
        cfg = self.cfg if with_calibrator else _without_calibrator(self.cfg)
        # Data-parallel ranks would each need the same resume point; only single-process training checkpoints.
        checkpoint = None
        if wrap_model is None:
            previous_version = previous.version if previous is not None else None
            key = f"{cfg.method_hash()} round {r} calibrator={with_calibrator} previous={previous_version}"
            checkpoint = TrainingCheckpoint(training_checkpoint_path(cfg, r), key)
        return train_round_models(
            cfg,
            r,
            num_classes=self.num_classes,
            exemplar_images=inputs.exemplar_images,
            exemplar_labels=inputs.exemplar_labels,
            pseudo_images=inputs.pseudo_images,
            pseudo_labels=inputs.pseudo_labels,
            pseudo_weights=inputs.pseudo_weights,
            previous=previous,
            val_images=self.val_images,
            val_labels=self.val_labels,
            progress=progress,
            checkpoint=checkpoint,
            wrap_model=wrap_model,
            rank=rank,
        )


def _without_calibrator(cfg: RunConfig) -> RunConfig:
    out = copy.deepcopy(cfg)
    out.calibrator.enabled = False
    return out


class LocalExecutor:
    """Everything in this process, one batch at a time."""

    def __init__(self, ctx: TrainContext, progress: bool = True):
        self.ctx = ctx
        self.progress = progress
        self.store = PseudoLabelStore.open(ctx.store_url)

    def train(self, r: int, previous: RoundModels | None, *, with_calibrator: bool = True) -> RoundModels:
        return self.ctx.train(r, previous, with_calibrator=with_calibrator, progress=self.progress)

    def label(self, r: int, models: RoundModels, batches: Iterable[np.ndarray]) -> Iterator[pipeline.BatchStats]:
        engine = LabelingEngine(self.ctx.cfg, models, resolve_device(self.ctx.cfg.device))
        for indices in batches:
            yield pipeline.label_cases(engine, self.store, r, indices)

    def owner(self, store: PseudoLabelStore) -> PseudoLabelStore:
        return store

    def close(self) -> None:
        pass


@dataclass
class RunResult:
    work_dir: Path
    store_url: str
    run_id: str
    tracking_uri: str
    rounds: list[dict] = field(default_factory=list)
    final_metrics: dict = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    recomputed: int = 0  # cases labelled by this invocation (0 for rounds already complete)
    dashboard: Path | None = None  # the run's dashboard page, when it could be built


def batches_of(indices: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for i in range(0, len(indices), size):
        yield indices[i : i + size]


class Coordinator:
    """Runs (or resumes) a self-training run described by ``cfg``.

    Args:
        cfg: validated run config.
        executor_factory: builds the executor from the prepared run's :class:`TrainContext`; defaults to local.
        progress: show progress bars.
    """

    def __init__(self, cfg: RunConfig, executor_factory=None, progress: bool = True):
        self.cfg = cfg
        self.executor_factory = executor_factory or (lambda ctx: LocalExecutor(ctx, progress))
        self.progress = progress

    def run(self) -> RunResult:
        cfg = self.cfg
        skipped_log: list[tuple[str, str]] = []
        # Logged to the work dir from the start, so files skipped while the pool loads are in run.log too.
        Workspace.of(cfg).root.mkdir(parents=True, exist_ok=True)
        attach_file_log(Workspace.of(cfg).log_path)
        prepared = prepare_run(cfg, progress=self.progress, on_skip=lambda s, r: skipped_log.append((s, r)))
        ws, store = prepared.workspace, prepared.store
        tracker = _open_tracker(cfg, prepared)
        # A bad validation case is skipped and reported like a bad pool file; a bad exemplar stops the run.
        val_images, val_labels = load_labelled(prepared, prepared.split.val, skip_bad=True)
        ctx = TrainContext(cfg, ws.store_url, prepared.num_classes, val_images, val_labels)
        if prepared.skipped:
            tracker.log_dict(prepared.skipped, "data/skipped.json")
            tracker.log_metrics({tracking.SKIPPED: len(prepared.skipped)}, step=0)

        result = RunResult(ws.root, ws.store_url, tracker.run_id, tracker.tracking_uri, skipped=dict(prepared.skipped))
        executor = self.executor_factory(ctx)
        prepared.store = executor.owner(store)
        try:
            previous: RoundModels | None = None
            for r in range(cfg.rounds):
                previous = self._round(r, previous, executor, prepared, tracker, result)
            final = self._final(previous, executor, prepared, tracker)
            result.final_metrics = final
            tracker.finish("FINISHED")
        except BaseException:
            tracker.finish("FAILED")
            raise
        finally:
            executor.close()
            store.release_lock()
        result.dashboard = dashboard.build_and_link(result.tracking_uri, result.run_id, ws.root / "dashboard.html")
        return result

    def _round(self, r, previous, executor: Executor, prepared: PreparedRun, tracker: tracking.Tracker, result: RunResult) -> RoundModels:
        cfg, ws, store = self.cfg, prepared.workspace, prepared.store
        models = _load_or_train(ws.model_path(r), lambda: executor.train(r, previous), training_checkpoint_path(cfg, r))
        if store.is_committed(r):
            result.recomputed += repair_round(cfg, store, executor, r, models)
            result.rounds.append(store.round_summary(r))
            return models
        perf, labelled = stream_round(cfg, store, executor, r, models, self.progress)
        perf["train_s"] = models.train_s
        result.recomputed += labelled
        summary = pipeline.select_and_commit(cfg, store, r, {"perf": perf, "val": _scalars(models.val_metrics)})
        result.rounds.append(summary)
        _log_round(tracker, r, summary, models)
        _log_overlays(tracker, store, r, cfg.tracking.num_overlays)
        # A read-only handle of our own: under Ray ``store`` is the owner actor's proxy, which would ship every label.
        dashboard.log_round_views(tracker, PseudoLabelStore.open(ws.store_url, mode="r"), r, cfg.tracking.num_overlays)
        tracker.log_artifact(tracking.round_curves_png(tracker, ws.root / "round_curves.png"), "curves")
        log.info("round %d committed: %s", r, {k: v for k, v in summary.items() if not isinstance(v, dict)})
        return models

    def _final(self, previous, executor: Executor, prepared: PreparedRun, tracker: tracking.Tracker) -> dict:
        """Train the final segmenter on the exemplars plus the last round's selection, log it, report validation."""
        ws = prepared.workspace
        final = _load_or_train(
            ws.final_model_path,
            lambda: executor.train(self.cfg.rounds, previous, with_calibrator=False),
            training_checkpoint_path(self.cfg, self.cfg.rounds),
        )
        tracker.log_artifact(ws.final_model_path, "model")
        tracker.log_artifact(ws.config_path)
        tracker.log_artifact(ws.split_path)
        metrics = _scalars(final.val_metrics)
        if metrics:
            tracker.log_metrics({f"final/val_{k}": v for k, v in metrics.items()}, step=self.cfg.rounds)
        return metrics


def stream_round(cfg: RunConfig, owner, executor: Executor, r: int, models: RoundModels, progress: bool) -> tuple[dict, int]:
    """Begin round ``r`` and stream its missing cases through ``executor``; returns (per-stage times, cases labelled)."""
    c = cfg.calibrator
    owner.begin_round(
        r,
        {
            "guidance_strength": c.guidance_strength,
            "calibration_strength": c.calibration_strength,
            "inference_steps": c.inference_steps,
            "calibrated": c.enabled,
            "model_version": models.version,
        },
    )
    _drop_corrupt(owner, r)
    todo = owner.missing(r)
    log.info("round %d: labelling %d cases, keeping %d already done", r, len(todo), int(owner.usable_mask().sum()) - len(todo))
    t0 = time.perf_counter()
    sums = {"infer_s": 0.0, "ddim_s": 0.0, "store_s": 0.0}
    bar = tqdm(total=len(todo), desc=f"round {r}: labelling", unit="case", disable=not progress)
    for stats in executor.label(r, models, batches_of(todo, cfg.runtime.batch_size)):
        for key in sums:
            sums[key] += getattr(stats, key)
        bar.update(len(stats.indices))
    bar.close()
    elapsed = time.perf_counter() - t0
    n = max(len(todo), 1)
    perf = {
        "cases_per_s": len(todo) / elapsed if elapsed > 0 and len(todo) else math.nan,
        "infer_s_per_case": sums["infer_s"] / n,
        "ddim_s_per_case": sums["ddim_s"] / n,
        "store_write_s_per_case": sums["store_s"] / n,
    }
    return perf, len(todo)


def repair_round(cfg: RunConfig, owner, executor: Executor, r: int, models: RoundModels) -> int:
    """Recompute the cases of committed round ``r`` whose chunks are corrupt; returns how many were relabelled.

    The round's saved models label them again, which gives the same labels, so the committed selection and
    summary stay valid. Cases an interrupted repair left not done are picked up the same way.
    """
    _drop_corrupt(owner, r)
    todo = owner.missing(r)
    if todo.size:  # a Ray executor would start its worker pool even for nothing
        log.info("round %d (committed): relabelling %d cases", r, todo.size)
        for _ in executor.label(r, models, batches_of(todo, cfg.runtime.batch_size)):
            pass
    return int(todo.size)


def _drop_corrupt(owner, r: int) -> None:
    """Resume keeps the cases an earlier invocation finished only once their chunks read back intact."""
    corrupt = owner.verify(r)
    if corrupt:
        ids = owner.case_ids
        log.warning("round %d: %d stored cases are corrupt and will be recomputed: %s", r, len(corrupt), [ids[i] for i in corrupt])
        owner.invalidate(r, corrupt)


def _load_or_train(path: Path, train, checkpoint: Path) -> RoundModels:
    """The saved models at ``path``, or newly trained ones saved there; their training checkpoint goes once saved."""
    if path.exists():
        return RoundModels.load(path)
    models = train()
    models.save(path)
    checkpoint.unlink(missing_ok=True)
    return models


def _scalars(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float))}


def _open_tracker(cfg: RunConfig, prepared: PreparedRun) -> tracking.Tracker:
    ws = prepared.workspace
    uri = cfg.tracking.tracking_uri or tracking.default_tracking_uri(ws.root)
    info = ws.read_run_info()
    if info.get("run_id") and info.get("tracking_uri") == uri:
        return tracking.Tracker(uri, cfg.tracking.experiment, run_id=info["run_id"])
    tracker = tracking.Tracker(
        uri,
        cfg.tracking.experiment,
        run_name=cfg.tracking.run_name or ws.root.name,
        artifact_root=ws.root / "mlartifacts",
        tags={"caudo_ray.work_dir": str(ws.root.resolve()), "caudo_ray.method_hash": cfg.method_hash()},
    )
    ws.write_run_info({"run_id": tracker.run_id, "tracking_uri": uri, "experiment": cfg.tracking.experiment})
    tracker.log_params(cfg.to_dict())
    tracker.log_params({"data.num_classes_used": prepared.num_classes, "split.pool_size": len(prepared.split.pool)})
    return tracker


_METRIC_OF_SUMMARY = {
    "pseudo_dice_initial": tracking.PSEUDO_DICE_INITIAL,
    "pseudo_dice_calibrated": tracking.PSEUDO_DICE_CALIBRATED,
    "calibration_gain": tracking.CALIBRATION_GAIN,
    "selected": tracking.SELECTED,
    "selected_fraction": tracking.SELECTED_FRACTION,
    "reliability_mean": tracking.RELIABILITY_MEAN,
    "reliability_p10": tracking.RELIABILITY_P10,
    "reliability_p50": tracking.RELIABILITY_P50,
    "reliability_spearman": tracking.RELIABILITY_SPEARMAN,
    "agreement_mean": tracking.AGREEMENT_MEAN,
    "accepted_fraction": tracking.ACCEPTED_FRACTION,
}
_METRIC_OF_PERF = {
    "cases_per_s": tracking.CASES_PER_S,
    "infer_s_per_case": tracking.INFER_S_PER_CASE,
    "ddim_s_per_case": tracking.DDIM_S_PER_CASE,
    "store_write_s_per_case": tracking.STORE_S_PER_CASE,
    "train_s": tracking.TRAIN_S,
}


def _log_round(tracker: tracking.Tracker, r: int, summary: dict, models: RoundModels) -> None:
    metrics = {name: summary[key] for key, name in _METRIC_OF_SUMMARY.items() if key in summary}
    metrics.update({name: summary["perf"][key] for key, name in _METRIC_OF_PERF.items() if key in summary["perf"]})
    if "dice" in models.val_metrics:
        metrics[tracking.VAL_DICE] = models.val_metrics["dice"]
        metrics[tracking.VAL_HD95] = models.val_metrics["hd95"]
    tracker.log_metrics(metrics, step=r)
    tracker.log_dict(summary, f"rounds/round_{r}/summary.json")


def _log_overlays(tracker: tracking.Tracker, store: PseudoLabelStore, r: int, k: int) -> None:
    """Initial vs calibrated label overlays for a fixed sample of cases (the same cases every round)."""
    if k <= 0:
        return
    usable = np.flatnonzero(store.usable_mask())
    sample = usable[np.linspace(0, len(usable) - 1, num=min(k, len(usable))).astype(int)] if len(usable) else usable
    if not len(sample):
        return
    images = store.read_images(sample)
    labels = store.read_round(r, sample)
    for j, i in enumerate(sample):
        panel = tracking.overlay_panel(images[j], labels["initial"][j], labels["calibrated"][j])
        tracker.log_image(panel, f"overlays/round_{r}/{store.case_ids[int(i)]}.png")


def attach_file_log(path: Path) -> None:
    """Send the ``caudo_ray`` logger's lines of this process to ``path`` too (once per path)."""
    root = logging.getLogger("caudo_ray")
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve() for h in root.handlers):
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.INFO)


def calibrate_dataset(
    run_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    executor_factory=None,
    fmt: str = "source",
    progress: bool = True,
) -> dict:
    """Label and calibrate every image of a dataset folder with a finished run's last round of models.

    Writes ``<out_dir>/store.zarr`` (one round, resumable like a run's round) and exports the calibrated labels
    at each image's original geometry to ``<out_dir>/labels``; reliability and annotation queries come with it.

    Returns:
        The round summary, plus ``labels_dir``, ``written`` and ``skipped``.
    """
    from caudo_ray import data as D
    from caudo_ray.config import load_config
    from caudo_ray.workspace import Workspace, load_pool

    run = Workspace(Path(run_dir))
    cfg = load_config(run.config_path, {"work_dir": str(out_dir), "runtime.store_url": None})
    rounds = sorted(int(p.stem.split("_")[1]) for p in run.models_dir.glob("round_*.pt"))
    if not rounds:
        raise FileNotFoundError(f"{run.models_dir}: no round models; is {run_dir} the work dir of a run?")
    models = RoundModels.load(run.model_path(rounds[-1]))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = D.index_dataset(data_dir, group_column=None, nifti_axis=cfg.data.nifti_axis)
    refs = index.labelled + index.unlabelled
    store = PseudoLabelStore.open_or_create(
        str(out / "store.zarr"),
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
        if not owner.is_committed(0):
            perf, _ = stream_round(cfg, owner, executor, 0, models, progress)
            pipeline.select_and_commit(cfg, owner, 0, {"perf": perf})
        summary = owner.round_summary(0)
    finally:
        executor.close()
    written = store.export_round(0, out / "labels", fmt=fmt)
    return {**summary, "labels_dir": str(out / "labels"), "written": len(written), "skipped": skipped}
