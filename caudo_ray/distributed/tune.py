"""Ray Tune search over the calibration's inference knobs: guidance strength w, calibration strength s, DDIM steps.

None of the three changes training, so the round-0 segmenter and calibrator are trained once (or loaded from the
work dir's ``models/round_0.pt`` when a self-training run already made them), ``ray.put`` once, and every trial
only calibrates. A trial streams a fixed evaluation set through :class:`caudo_ray.labelling.engine.LabelingEngine` batch
by batch and calls ``tune.report`` after each batch with the running objective, so ASHA's time axis is evaluation
steps and bad settings stop after a few batches.

Objective (``tune.objective``):

- ``val_dice``: mean Dice of the calibrated pseudo labels on the labelled validation split (used by ``auto``
  whenever the split has validation cases).
- ``proxy``: with no validation split (one-shot users), the mean reliability score
  (:func:`caudo_ray.labelling.reliability.reliability_scores`) of the labels the run would keep (behind the
  calibration gate, ``calibrator.gate``) over a fixed, seeded sample of the pool. Where the pool has hidden truth (benchmarks), the sample's pseudo-label Dice is reported beside it as
  ``tune/pool_dice``, never used to choose.

MLflow: one parent run (tag ``caudo_ray.kind=tune``) and one nested child run per trial, written from the driver
by a Tune callback (sqlite takes one writer at a time; trials never touch MLflow). See docs/tune.md.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from caudo_ray.config import ConfigError, RunConfig, TuneConfig
from caudo_ray.data import LabelledCases
from caudo_ray.distributed.cluster import init_ray
from caudo_ray.errors import DataError
from caudo_ray.labelling.engine import LabelingEngine
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.rounds.executor import TrainContext
from caudo_ray.run.prepare import PreparedRun, load_case, load_labelled, prepare_run
from caudo_ray.tracking import names
from caudo_ray.tracking.tracker import Tracker, sqlite_tracking_uri

log = logging.getLogger(__name__)

# Keys a trial reports to Tune (no "/": Tune reads "/" as nesting) -> child run metric names.
_REPORTED = {
    "objective": names.METRIC_OBJECTIVE,
    "proxy": names.METRIC_PROXY,
    "dice": None,
    "initial_dice": names.METRIC_INITIAL_DICE,
}


# --- pure parts (no Ray) -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dimension:
    """One parsed search dimension: ``kind`` is grid, choice or range; ``values`` its values or [low, high]."""

    kind: str
    values: tuple[float, ...]
    integer: bool = False


def parse_space(tcfg: TuneConfig) -> dict[str, Dimension]:
    """The search space of a validated ``tune:`` section, keyed by the run-config keys it sets."""
    space = {}
    for param, dim in (
        (names.PARAM_GUIDANCE, tcfg.guidance_strength),
        (names.PARAM_STRENGTH, tcfg.calibration_strength),
        (names.PARAM_STEPS, tcfg.inference_steps),
    ):
        kind = next(k for k in ("grid", "choice", "range") if getattr(dim, k) is not None)
        integer = param == names.PARAM_STEPS
        values = tuple(int(v) if integer else float(v) for v in getattr(dim, kind))
        space[param] = Dimension(kind, values, integer)
    return space


def count_trials(space: Mapping[str, Dimension], num_samples: int) -> int:
    """Trials a search runs: the grid's size times ``num_samples``."""
    return math.prod(len(d.values) for d in space.values() if d.kind == "grid") * num_samples


def resolve_objective(setting: str, num_val: int) -> str:
    """``val_dice`` or ``proxy``: ``auto`` takes val_dice whenever there are validation cases."""
    if setting == "auto":
        return names.OBJECTIVE_VAL_DICE if num_val else names.OBJECTIVE_PROXY
    if setting == names.OBJECTIVE_VAL_DICE and not num_val:
        raise ConfigError(
            "tune.objective",
            "val_dice needs a labelled validation split (split.val_fraction > 0), and this one is empty; use proxy or auto",
        )
    return setting


def num_steps(num_cases: int, batch_size: int, max_t: int | None) -> int:
    """Evaluation steps of a full trial: batches over the evaluation set, capped by ``max_t``."""
    steps = math.ceil(num_cases / batch_size)
    return min(steps, max_t) if max_t is not None else steps


def trial_config(cfg: RunConfig, params: Mapping[str, Any]) -> RunConfig:
    """``cfg`` with a trial's calibrator settings applied (the three :data:`names.SEARCH_PARAMS`)."""
    out = copy.deepcopy(cfg)
    out.calibrator.guidance_strength = float(params[names.PARAM_GUIDANCE])
    out.calibrator.calibration_strength = float(params[names.PARAM_STRENGTH])
    out.calibrator.inference_steps = int(params[names.PARAM_STEPS])
    out.calibrator.validate("calibrator")
    return out


@dataclass
class EvalTally:
    """Running sums over a trial's evaluation batches; :meth:`metrics` is what the trial reports after each."""

    objective: str
    cases: int = 0
    reliability: float = 0.0
    dice: float = 0.0
    initial_dice: float = 0.0
    with_truth: int = 0

    def add(self, scores: Mapping[str, np.ndarray]) -> None:
        """Add one batch's per-case scores (``LabelingEngine.label_batch``): reliability, and Dice where truth exists."""
        self.cases += len(scores["reliability"])
        self.reliability += float(np.sum(scores["reliability"]))
        if "calibrated_dice" in scores:
            has = np.isfinite(scores["calibrated_dice"])
            self.with_truth += int(has.sum())
            self.dice += float(np.sum(scores["calibrated_dice"][has]))
            self.initial_dice += float(np.sum(scores["initial_dice"][has]))

    def metrics(self) -> dict[str, float]:
        out = {"proxy": self.reliability / self.cases if self.cases else math.nan}
        if self.with_truth:
            out["dice"] = self.dice / self.with_truth
            out["initial_dice"] = self.initial_dice / self.with_truth
        out["objective"] = out["proxy"] if self.objective == names.OBJECTIVE_PROXY else out.get("dice", math.nan)
        return out


@dataclass
class TrialOutcome:
    """A finished trial: its settings, last reported metrics and how many evaluation steps it ran."""

    trial_id: str
    params: dict[str, float]
    metrics: dict[str, float]
    steps: int
    run_id: str | None = None


def pick_best(outcomes: list[TrialOutcome], full_steps: int) -> TrialOutcome:
    """The trial with the highest final objective among those that evaluated every step.

    A trial ASHA stopped reports a running mean over fewer cases, which is not comparable; such trials are
    considered only when no trial ran to the end. Ties go to the earlier trial.
    """
    complete = [o for o in outcomes if o.steps >= full_steps] or outcomes
    scored = [o for o in complete if math.isfinite(o.metrics.get("objective", math.nan))]
    if not scored:
        raise RuntimeError("no trial reported a finite objective")
    return max(scored, key=lambda o: o.metrics["objective"])


def format_trials(outcomes: list[TrialOutcome], objective: str, best: TrialOutcome | None = None) -> str:
    """A plain-text table of trials, best objective first."""
    dice_col = "val_dice" if objective == names.OBJECTIVE_VAL_DICE else "pool_dice"
    lines = [f"{'w':>6} {'s':>5} {'steps':>5} {'objective':>9} {'proxy':>7} {dice_col:>9} {'initial':>7} {'evals':>5}"]
    for o in sorted(
        outcomes,
        key=lambda o: -np.nan_to_num(o.metrics.get("objective", math.nan), nan=-np.inf),
    ):
        m = o.metrics
        lines.append(
            f"{o.params[names.PARAM_GUIDANCE]:6.2f} {o.params[names.PARAM_STRENGTH]:5.2f} {int(o.params[names.PARAM_STEPS]):5d} "
            f"{m.get('objective', math.nan):9.4f} {m.get('proxy', math.nan):7.4f} {m.get('dice', math.nan):9.4f} "
            f"{m.get('initial_dice', math.nan):7.4f} {o.steps:5d}" + ("  <- best" if o is best else "")
        )
    return "\n".join(lines)


# --- Ray part ------------------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """What every trial labels: images, truth where any (255 = none; reporting only) and where they came from."""

    images: np.ndarray
    truth: np.ndarray | None
    source: str  # "validation" or "pool sample"


@dataclass
class SharedInputs:
    """Object references every trial receives; the weights and images are in the object store once."""

    models_ref: Any
    eval_ref: Any
    cfg: RunConfig
    objective: str
    batch_size: int
    steps: int
    threads: int


def _trial(config: dict[str, Any], shared: SharedInputs) -> None:
    """One Tune trial: calibrate the evaluation set batch by batch with this trial's w, s and steps."""
    torch.set_num_threads(shared.threads)
    models, ev = ray.get([shared.models_ref, shared.eval_ref])
    engine = LabelingEngine(trial_config(shared.cfg, config), models)
    tally = EvalTally(shared.objective)
    for step in range(shared.steps):
        sl = slice(step * shared.batch_size, (step + 1) * shared.batch_size)
        # Copies: arrays from the object store are read-only, and torch wants writable memory.
        truth = np.array(ev.truth[sl]) if ev.truth is not None else None
        result = engine.label_batch(np.array(ev.images[sl]), truth)
        tally.add(result.scores)
        tune.report(tally.metrics())


def _tune_space(space: Mapping[str, Dimension]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, d in space.items():
        if d.kind == "grid":
            out[key] = tune.grid_search(list(d.values))
        elif d.kind == "choice":
            out[key] = tune.choice(list(d.values))
        elif d.integer:
            out[key] = tune.randint(int(d.values[0]), int(d.values[1]) + 1)  # randint's upper bound is exclusive
        else:
            out[key] = tune.uniform(*d.values)
    return out


class MlflowTrials(tune.Callback):
    """Writes each trial's nested child run from the driver: params at start, metrics per step, status at end."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        parent_run_id: str,
        objective: str,
        full_steps: int,
    ):
        self.uri, self.experiment, self.parent_run_id = (
            uri,
            experiment,
            parent_run_id,
        )
        self.objective, self.full_steps = objective, full_steps
        self.trackers: dict[str, Tracker] = {}
        self.outcomes: dict[str, TrialOutcome] = {}

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id in self.trackers:
            return
        params = {k: trial.config[k] for k in names.SEARCH_PARAMS}
        tracker = Tracker(
            self.uri,
            self.experiment,
            run_name=f"trial-{trial.trial_id}",
            parent_run_id=self.parent_run_id,
            tags={
                names.TAG_KIND: names.KIND_TRIAL,
                names.TAG_OBJECTIVE: self.objective,
                "caudo_ray.tune.trial_id": trial.trial_id,
            },
        )
        tracker.log_params(params)
        self.trackers[trial.trial_id] = tracker
        self.outcomes[trial.trial_id] = TrialOutcome(trial.trial_id, params, {}, 0, tracker.run_id)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        outcome = self.outcomes[trial.trial_id]
        outcome.steps = int(result["training_iteration"])
        outcome.metrics = {k: float(result[k]) for k in _REPORTED if k in result}
        dice_name = names.METRIC_VAL_DICE if self.objective == names.OBJECTIVE_VAL_DICE else names.METRIC_POOL_DICE
        metric_names = {**_REPORTED, "dice": dice_name}
        self.trackers[trial.trial_id].log_metrics(
            {metric_names[k]: v for k, v in outcome.metrics.items()}, step=outcome.steps
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED")

    def _end(self, trial, status: str) -> None:
        tracker = self.trackers.get(trial.trial_id)
        if tracker is None:
            return
        stopped = self.outcomes[trial.trial_id].steps < self.full_steps
        tracker.set_tags({names.TAG_STOPPED_EARLY: str(stopped).lower()})
        tracker.finish(status)


@dataclass
class TuneResult:
    """What a search found and what it cost."""

    objective: str
    best: TrialOutcome
    trials: list[TrialOutcome]
    full_steps: int
    eval_source: str
    eval_cases: int
    parent_run_id: str
    tracking_uri: str
    shared_train_s: float
    models_reused: bool
    train_saved_s: float
    search_s: float
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "best": {
                "params": self.best.params,
                "metrics": self.best.metrics,
                "trial_id": self.best.trial_id,
            },
            "trials": [
                {
                    "trial_id": o.trial_id,
                    "params": o.params,
                    "metrics": o.metrics,
                    "steps": o.steps,
                    "run_id": o.run_id,
                }
                for o in self.trials
            ],
            "full_steps": self.full_steps,
            "eval_source": self.eval_source,
            "eval_cases": self.eval_cases,
            "parent_run_id": self.parent_run_id,
            "tracking_uri": self.tracking_uri,
            "shared_train_s": self.shared_train_s,
            "models_reused": self.models_reused,
            "train_saved_s": self.train_saved_s,
            "search_s": self.search_s,
            "wall_s": self.wall_s,
        }


def _eval_set(prepared, objective: str, tcfg: TuneConfig) -> EvalSet:
    """The validation split's first ``eval_cases`` readable cases, or a seeded sample of the usable pool for the proxy."""
    if objective == names.OBJECTIVE_VAL_DICE:
        refs = {r.case_id: r for r in prepared.index.labelled}
        cases = []
        for case_id in prepared.split.val:
            if len(cases) == tcfg.eval_cases:
                break
            try:
                cases.append(load_case(refs[case_id], prepared.cfg, prepared.num_classes))
            except DataError:
                continue  # reported and skipped where run_tune loads the validation split
        return EvalSet(np.stack([c.image for c in cases]), np.stack([c.mask for c in cases]), "validation")
    store = prepared.store
    usable = np.flatnonzero(store.usable_mask())
    if not len(usable):
        raise RuntimeError(f"the pool in {prepared.workspace.store_url} has no usable case to score the proxy on")
    idx = np.sort(
        np.random.default_rng(tcfg.seed).choice(usable, size=min(tcfg.eval_cases, len(usable)), replace=False)
    )
    return EvalSet(store.read_images(idx), store.read_truth(idx), "pool sample")


def _shared_models(cfg: RunConfig, prepared, val: LabelledCases, progress: bool):
    """Round-0 models: the work dir's saved ones when a run already trained them, else trained once here and saved."""
    path = prepared.workspace.model_path(0)
    if path.exists():
        models = RoundModels.load(path)
        log.info(
            "tune: reusing %s (trained in %.1f s by an earlier run)",
            path,
            models.train_s,
        )
        return models, True
    ctx = TrainContext(cfg, prepared.workspace.store_url, prepared.num_classes, val)
    models = ctx.train(0, None, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    models.save(path)
    return models, False


def run_tune(cfg: RunConfig, *, progress: bool = True) -> TuneResult:
    """Run the search described by ``cfg.tune`` on the work dir of ``cfg``; see the module docstring.

    Joins ``runtime.address`` or starts a local Ray unless one is already initialised in this process.
    """
    if not cfg.calibrator.enabled:
        raise ConfigError(
            "calibrator.enabled",
            "tune searches calibration settings, so the calibrator must be enabled",
        )
    space = parse_space(cfg.tune)
    t_start = time.perf_counter()
    # The search holds the work dir's lock from start to end (taken before prepare_run writes anything), so no run
    # writes the models it shares meanwhile.
    prepared = prepare_run(cfg, progress=progress, purpose="tune")
    try:
        return _search(cfg, prepared, space, t_start, progress)
    finally:
        prepared.lock.release()


def _search(cfg: RunConfig, prepared: PreparedRun, space: Mapping[str, Dimension], t_start: float, progress: bool) -> TuneResult:
    tcfg, ws = cfg.tune, prepared.workspace
    val = load_labelled(prepared, prepared.split.val, skip_bad=True)
    objective = resolve_objective(tcfg.objective, len(val))
    ev = _eval_set(prepared, objective, tcfg)
    full_steps = num_steps(len(ev.images), tcfg.eval_batch_size, tcfg.max_t)
    models, reused = _shared_models(cfg, prepared, val, progress)

    uri = cfg.tracking.tracking_uri or sqlite_tracking_uri(ws.mlflow_db)
    parent = Tracker(
        uri,
        cfg.tracking.experiment,
        run_name=cfg.tracking.run_name or f"tune-{ws.root.name}",
        artifact_root=ws.artifacts_dir,
        tags={
            names.TAG_KIND: names.KIND_TUNE,
            names.TAG_OBJECTIVE: objective,
            names.TAG_WORK_DIR: str(ws.root.resolve()),
            names.TAG_METHOD_HASH: cfg.method_hash(),
        },
    )
    try:
        parent.log_params(cfg.to_dict())
        init_ray(cfg)
        shared = SharedInputs(
            models_ref=ray.put(models),
            eval_ref=ray.put(ev),
            cfg=cfg,
            objective=objective,
            batch_size=tcfg.eval_batch_size,
            steps=full_steps,
            threads=max(1, int(tcfg.cpus_per_trial)),
        )
        callback = MlflowTrials(uri, cfg.tracking.experiment, parent.run_id, objective, full_steps)
        tuner = tune.Tuner(
            tune.with_resources(
                tune.with_parameters(_trial, shared=shared),
                {"cpu": tcfg.cpus_per_trial, **({"gpu": tcfg.gpus_per_trial} if tcfg.gpus_per_trial else {})},
            ),
            param_space=_tune_space(space),
            tune_config=tune.TuneConfig(
                metric="objective",
                mode="max",
                scheduler=ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=full_steps,
                    grace_period=min(tcfg.grace_period, full_steps),
                    reduction_factor=tcfg.reduction_factor,
                ),
                # The generator itself caps concurrency (Tune ignores max_concurrent_trials next to a generator).
                search_alg=BasicVariantGenerator(random_state=tcfg.seed, max_concurrent=tcfg.max_concurrent_trials),
                num_samples=tcfg.num_samples,
                # A trial process imports torch, MONAI and diffusers once and then serves trial after trial.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}",
                storage_path=str((ws.root / "tune").resolve()),
                callbacks=[callback],
                verbose=1 if progress else 0,
            ),
        )
        t_fit = time.perf_counter()
        grid = tuner.fit()
        fit_s = time.perf_counter() - t_fit
        outcomes = [callback.outcomes[t] for t in sorted(callback.outcomes)]
        if grid.errors:
            log.warning("tune: %d trial(s) failed: %s", len(grid.errors), grid.errors[0])
        best = pick_best(outcomes, full_steps)
        # Without sharing, every trial would train the same round-0 models before calibrating.
        saved = models.train_s * (len(outcomes) if reused else len(outcomes) - 1)
        wall = time.perf_counter() - t_start
        parent.log_params({names.BEST_PREFIX + k: v for k, v in best.params.items()})
        parent.log_metrics(
            {
                names.METRIC_BEST: best.metrics["objective"],
                names.METRIC_TRIALS: len(outcomes),
                names.METRIC_STOPPED_EARLY: sum(o.steps < full_steps for o in outcomes),
                names.METRIC_SHARED_TRAIN_S: models.train_s,
                names.METRIC_TRAIN_SAVED_S: saved,
                names.METRIC_WALL_S: wall,
            },
            step=0,
        )
        result = TuneResult(
            objective=objective,
            best=best,
            trials=outcomes,
            full_steps=full_steps,
            eval_source=ev.source,
            eval_cases=len(ev.images),
            parent_run_id=parent.run_id,
            tracking_uri=uri,
            shared_train_s=models.train_s,
            models_reused=reused,
            train_saved_s=saved,
            search_s=fit_s,
            wall_s=wall,
        )
        parent.log_dict(result.to_dict(), "tune/results.json")
        parent.log_text(format_trials(outcomes, objective, best), "tune/trials.txt")
        log.info(
            "tune: %d trials, best %s = %.4f; shared training %.1f s once, saving %.1f s of per-trial training",
            len(outcomes), objective, best.metrics["objective"], models.train_s, saved,
        )  # fmt: skip
        parent.finish("FINISHED")
        return result
    except BaseException:
        parent.finish("FAILED")
        raise
