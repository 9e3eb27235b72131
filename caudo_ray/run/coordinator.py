"""The coordinator: a whole self-training run, rounds of train -> label (streamed) -> select -> commit, resumable.

The coordinator owns the store's group attributes, round commits and the MLflow run. Before each round's training
from round 1 on (and the final segmenter's) it takes in the answers to annotation queries given since
(``run.annotations.take_in``), so a person answering while the run goes is heard at its next round. Where the work runs is an
:class:`~caudo_ray.rounds.executor.Executor` (in this process, or on Ray actors), which changes speed, never
results.

Memory: the pool is streamed as index batches; the driver holds indices, per-round (N,) score vectors at commit
and nothing per-pixel, so its footprint does not grow with the images in the pool.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from caudo_ray.config import RunConfig
from caudo_ray.deploy.mlflow_model import LoggedSegmenter, log_final_model
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.rounds import guard
from caudo_ray.rounds.executor import Executor, LocalExecutor, TrainContext
from caudo_ray.rounds.loop import load_or_train, repair_round, stream_round
from caudo_ray.rounds.steps import select_and_commit
from caudo_ray.run.annotations import take_in
from caudo_ray.run.prepare import PreparedRun, load_labelled, prepare_run
from caudo_ray.store import PseudoLabelStore
from caudo_ray.tracking import names
from caudo_ray.tracking.figures import round_curves_png
from caudo_ray.tracking.report import build_and_link
from caudo_ray.tracking.run_log import log_answers, log_overlays, log_round, log_round_views
from caudo_ray.tracking.tracker import Tracker, sqlite_tracking_uri
from caudo_ray.workspace import Workspace

log = logging.getLogger(__name__)

ExecutorFactory = Callable[[TrainContext], Executor]
RoundHook = Callable[[int, PseudoLabelStore], None]


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
    # The drift guard: each segmenter's exemplar-view reading, the one kept (index in training order; rounds, then
    # the final one), and where the rounds stopped (None: they did not).
    guard: dict = field(default_factory=dict)
    model: LoggedSegmenter | None = None  # the served segmenter's MLflow Model and registered version


class Coordinator:
    """Runs (or resumes) a self-training run described by ``cfg``.

    Args:
        cfg: validated run config.
        executor_factory: builds the executor from the prepared run's :class:`TrainContext`; defaults to local.
        progress: show progress bars.
        on_round_committed: called with ``r`` and a read-only handle of the store once this invocation has
            committed and logged round ``r`` (not for rounds an earlier invocation committed). Answers it writes
            into ``annotations/`` join round ``r + 1`` (the final segmenter after the last round).
    """

    def __init__(
        self,
        cfg: RunConfig,
        executor_factory: ExecutorFactory | None = None,
        progress: bool = True,
        on_round_committed: RoundHook | None = None,
    ):
        self.cfg = cfg
        self.executor_factory = executor_factory or (lambda ctx: LocalExecutor(ctx, progress))
        self.progress = progress
        self.on_round_committed = on_round_committed

    def run(self) -> RunResult:
        cfg = self.cfg
        ws = Workspace.of(cfg)
        # Logged to run.log from the moment the lock is held, so files skipped while the pool loads are there too.
        prepared = prepare_run(cfg, progress=self.progress, log_to_work_dir=True)
        store = prepared.store
        try:
            tracker = open_tracker(cfg, prepared)
            # A bad validation case is skipped and reported like a bad pool file; a bad exemplar stops the run.
            ctx = TrainContext(cfg, ws.store_url, prepared.num_classes, load_labelled(prepared, prepared.split.val, skip_bad=True))
            if prepared.skipped:
                tracker.log_dict(prepared.skipped, names.SKIPPED_FILES)
                tracker.log_metrics({names.SKIPPED: len(prepared.skipped)}, step=0)
            result = RunResult(ws.root, ws.store_url, tracker.run_id, tracker.tracking_uri, skipped=dict(prepared.skipped))
            executor = self.executor_factory(ctx)
            try:
                owner = executor.owner(store)
                trained: list[RoundModels] = []  # every segmenter trained so far, in order; the guard keeps one
                for r in range(cfg.rounds):
                    if r > 0:
                        self._take_in_answers(r, owner, prepared, result)
                    models = load_or_train(ws.model_path(r), lambda: executor.train(r, trained[-1] if trained else None), ws.checkpoint_path(r))  # noqa: B023
                    trained.append(models)
                    if self._regressed(trained, tracker, result):
                        break
                    self._round(r, models, executor, owner, prepared, tracker, result)
                result.final_metrics = self._final(trained, executor, owner, prepared, tracker, result)
                result.model = log_final_model(cfg, tracker, ws.final_model_path, store.exemplars()[0])
                tracker.finish("FINISHED")
            except KeyboardInterrupt:
                # Ctrl-C, or SIGTERM turned into an interrupt by the command line: stopped, not failed.
                tracker.finish("KILLED")
                raise
            except BaseException:
                tracker.finish("FAILED")
                raise
            finally:
                executor.close()
        finally:
            prepared.lock.release()
        result.dashboard = build_and_link(result.tracking_uri, result.run_id, ws.dashboard_path)
        return result

    def _regressed(self, trained: list[RoundModels], tracker: Tracker, result: RunResult) -> bool:
        """Judge the latest segmenter (``rounds.guard``); log its reading, and the stop when it regressed."""
        readings = [guard.reading(m) for m in trained]
        verdict = guard.judge(readings, self.cfg.guard)
        step = len(trained) - 1
        per_class = {f"{names.GUARD_EXEMPLAR_DICE}_{k.removeprefix('dice_')}": v for k, v in readings[-1].items()}
        tracker.log_metrics({names.GUARD_EXEMPLAR_DICE: guard.mean_reading(readings[-1]), **per_class}, step=step)
        result.guard = {"readings": readings, "kept": verdict.best, "regressed_at": step if verdict.regressed else None}
        if verdict.regressed:
            what = "the final segmenter" if step == self.cfg.rounds else f"round {step}"
            g = self.cfg.guard
            log.warning(
                "%s does worse on the exemplars' views than round %d (by %.3f Dice on the mean, tolerance %.3f; "
                "%.3f on its worst class, tolerance %.3f): the rounds stop and the run keeps round %d's segmenter",
                what, verdict.best, verdict.drop, g.tolerance, verdict.class_drop, g.class_tolerance, verdict.best,
            )  # fmt: skip
            tracker.set_tags({names.TAG_GUARD_STOPPED: str(step)})
        tracker.set_tags({names.TAG_GUARD_KEPT: str(verdict.best)})
        return verdict.regressed

    def _round(self, r: int, models: RoundModels, executor: Executor, owner, prepared: PreparedRun, tracker: Tracker, result: RunResult) -> None:
        cfg, ws = self.cfg, prepared.workspace
        if owner.rounds.is_committed(r):
            result.recomputed += repair_round(cfg, owner, executor, r, models)
            result.rounds.append(owner.rounds.summary(r))
            return
        perf, labelled = stream_round(cfg, owner, executor, r, models, self.progress)
        perf["train_s"] = models.train_s
        perf["calibrator_train_s"] = models.calibrator_train_s
        result.recomputed += labelled
        prepared.lock.check()  # a run that lost its lock to another must not commit over it
        # Answers taken in by round r's training (earlier rounds' and round r's own), what the round's figures bought.
        in_use = sum(1 for record in owner.annotations.values() if record["round"] <= r)
        summary = select_and_commit(cfg, owner, r, {"perf": perf, "val": _scalars(models.val_metrics), "annotations": in_use})
        result.rounds.append(summary)
        # A read-only handle of our own: under Ray ``owner`` is the owner actor's proxy, which would ship every label.
        reader = PseudoLabelStore.open(ws.store_url, mode="r")
        log_round(tracker, r, summary, models.val_metrics)
        log_overlays(tracker, reader, r, cfg.tracking.num_overlays)
        log_round_views(tracker, reader, r, cfg.tracking.num_overlays)
        log_answers(tracker, reader)
        tracker.log_artifact(round_curves_png(tracker, ws.root / "round_curves.png"), names.CURVES_DIR)
        log.info("round %d committed: %s", r, {k: v for k, v in summary.items() if not isinstance(v, dict)})
        if cfg.tracking.dashboard_every_round:  # a failed build is a warning, never the run's failure
            result.dashboard = build_and_link(tracker.tracking_uri, tracker.run_id, ws.dashboard_path)
        if self.on_round_committed is not None:
            self.on_round_committed(r, reader)

    def _take_in_answers(self, r: int, owner, prepared: PreparedRun, result: RunResult) -> None:
        """Answers given since the last intake join round ``r``'s training, unless its models are trained already
        (a resume): then they wait for the next round's."""
        ws = prepared.workspace
        if ws.next_round(self.cfg.rounds) != r:
            return
        for source, problem in take_in(owner, prepared.answers, ws, r).refused.items():
            result.skipped[source] = f"annotation refused: {problem}"

    def _final(self, trained: list[RoundModels], executor: Executor, owner, prepared: PreparedRun, tracker: Tracker, result: RunResult) -> dict:
        """The segmenter the run serves: the final one, trained on the exemplars plus the last round's selection,
        unless the guard stopped the rounds or finds it worse; then the best segmenter before. Logged, with its
        validation metrics."""
        ws, rounds = prepared.workspace, self.cfg.rounds
        if result.guard.get("regressed_at") is None:
            self._take_in_answers(rounds, owner, prepared, result)
            # Step ``rounds`` is the final segmenter's, as for its final/val_* metrics.
            tracker.log_metrics({names.ANNOTATIONS: len(owner.annotations)}, step=rounds)
            log_answers(tracker, PseudoLabelStore.open(ws.store_url, mode="r"))
            trained.append(
                load_or_train(
                    ws.trained_final_path,
                    lambda: executor.train(rounds, trained[-1], with_calibrator=False),
                    ws.checkpoint_path(rounds),
                )
            )
            self._regressed(trained, tracker, result)
        # What predict and the MLflow model use is always models/final.pt: the kept segmenter, without calibrator.
        final = dataclasses.replace(trained[result.guard["kept"]], calibrator=None)
        final.save(ws.final_model_path)
        tracker.log_artifact(ws.final_model_path, names.MODEL_DIR)
        tracker.log_artifact(ws.config_path)
        tracker.log_artifact(ws.split_path)
        metrics = _scalars(final.val_metrics)
        if metrics:
            tracker.log_metrics({f"{names.FINAL_VAL_PREFIX}{k}": v for k, v in metrics.items()}, step=rounds)
        return metrics


def open_tracker(cfg: RunConfig, prepared: PreparedRun) -> Tracker:
    """The run's MLflow run: the one ``run.json`` names (a resume), or a new one with the config as params."""
    ws = prepared.workspace
    uri = cfg.tracking.tracking_uri or sqlite_tracking_uri(ws.mlflow_db)
    info = ws.read_run_info()
    if info.get("run_id") and info.get("tracking_uri") == uri:
        return Tracker(uri, cfg.tracking.experiment, run_id=info["run_id"])
    tracker = Tracker(
        uri,
        cfg.tracking.experiment,
        run_name=cfg.tracking.run_name or ws.root.name,
        artifact_root=ws.artifacts_dir,
        tags={names.TAG_WORK_DIR: str(ws.root.resolve()), names.TAG_METHOD_HASH: cfg.method_hash()},
    )
    ws.write_run_info({"run_id": tracker.run_id, "tracking_uri": uri, "experiment": cfg.tracking.experiment})
    tracker.log_params(cfg.to_dict())
    tracker.log_params({"data.num_classes_used": prepared.num_classes, "split.pool_size": len(prepared.split.pool)})
    return tracker


def _scalars(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float))}
