"""Baselines at caudo-ray's budget: one segmenter, trained for the iterations a whole caudo-ray run gets.

``caudo-ray baseline --method M`` prepares the work dir as a run does (config, split, pool in the store), trains
one segmenter on the same labelled set, working size and seed for ``segmenter.iterations + rounds *
segmenter.finetune_iterations`` iterations, scores it on the validation split and saves it as the work dir's
final model, so ``caudo-ray predict --work-dir`` serves it like a run's. The methods:

* ``consistency``: online weak-to-strong consistency on the pool (UniMatch; :mod:`caudo_ray.training.consistency`),
  the semi-supervised peer caudo-ray must beat;
* ``exemplar_only``: the exemplar views alone, the floor (caudo-ray's round 0, trained for the whole budget);
* ``supervised``: the exemplars plus every pool case with a hidden label, the ceiling of a benchmark pool.

A work dir holds one baseline: ``baseline.json`` records which, and a work dir of a caudo-ray run, or of another
baseline, is refused rather than having its final model overwritten. A rerun of the same baseline reuses the
saved model; an interrupted one resumes from its checkpoint (``checkpoints/baseline_<method>.pt``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import numpy as np

from caudo_ray.config import ConfigError, RunConfig
from caudo_ray.data import LabelledCases
from caudo_ray.errors import DataError, StoreError
from caudo_ray.networks.bundle import RoundModels, build_models
from caudo_ray.networks.device import resolve_device
from caudo_ray.rounds.train import evaluate, train_round_models
from caudo_ray.run.logs import attach_file_log
from caudo_ray.run.prepare import PreparedRun, load_labelled, prepare_run
from caudo_ray.store import NO_TRUTH
from caudo_ray.training.checkpoint import TrainingCheckpoint
from caudo_ray.training.hooks import TrainingHooks
from caudo_ray.training.inputs import RoundInputs
from caudo_ray.workspace import Workspace

log = logging.getLogger(__name__)

METHODS = ("consistency", "exemplar_only", "supervised")
_RECORD = "baseline.json"


def budget(cfg: RunConfig) -> int:
    """Segmenter iterations of a whole caudo-ray run: round 0, then every later round and the final model."""
    return cfg.segmenter.iterations + cfg.rounds * cfg.segmenter.finetune_iterations


def plain_config(cfg: RunConfig, iterations: int, *, pool: bool) -> RunConfig:
    """The config of one baseline segmenter: caudo-ray's round 0 for ``iterations``, without the calibrator (the
    same seed, initial weights and views), trained on the pool by the consistency peer's settings
    (:meth:`~caudo_ray.config.ConsistencyConfig.peer`) when ``pool``, else on the labelled cases alone."""
    return dataclasses.replace(
        cfg,
        segmenter=dataclasses.replace(cfg.segmenter, iterations=iterations),
        calibrator=dataclasses.replace(cfg.calibrator, enabled=False),
        consistency=cfg.consistency.peer() if pool else dataclasses.replace(cfg.consistency, enabled=False),
    )


def train_baseline(cfg: RunConfig, method: str, *, progress: bool = True) -> dict[str, Any]:
    """Train, score and save one baseline segmenter in ``cfg.work_dir``.

    Args:
        cfg: the run config, exactly as ``caudo-ray run`` would take it.
        method: ``consistency``, ``exemplar_only`` or ``supervised``.
        progress: show progress bars.

    Returns:
        ``{"method", "iterations", "val_metrics" (scalars), "model_path", "train_s", "reused", "skipped"}``; ``skipped``
        maps each input file or case left out (pool or validation) to the reason.

    Raises:
        ConfigError: an unknown method.
        StoreError: the work dir holds a caudo-ray run or another baseline, or its store another config.
        DataError: an unusable exemplar, or ``supervised`` on a pool without hidden labels.
    """
    if method not in METHODS:
        raise ConfigError("method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    ws = Workspace.of(cfg)
    _check_work_dir(ws, method)
    ws.root.mkdir(parents=True, exist_ok=True)
    attach_file_log(ws.log_path)
    prepared = prepare_run(cfg, progress=progress)
    try:
        val = load_labelled(prepared, prepared.split.val, skip_bad=True)
        device = resolve_device(cfg.device)
        reused = ws.final_model_path.exists()
        if reused:
            # The same baseline finished before (baseline.json says so): score its model again, train nothing.
            models = RoundModels.load(ws.final_model_path)
            net, _ = build_models(cfg, models, device)
            if len(val):
                models.val_metrics = evaluate(net, val, prepared.num_classes, device=device)
        else:
            checkpoint = TrainingCheckpoint(ws.root / "checkpoints" / f"baseline_{method}.pt", key=f"baseline-{method}-{cfg.method_hash()}")
            hooks = TrainingHooks(checkpoint=checkpoint, every=cfg.runtime.checkpoint_every, progress=progress)
            models = _train(cfg, method, prepared, val, device, hooks)
            models.save(ws.final_model_path)
            checkpoint.delete()
        scalars = {k: float(v) for k, v in models.val_metrics.items() if isinstance(v, (int, float))}
        result = {
            "method": method,
            "iterations": budget(cfg),
            "val_metrics": scalars,
            "model_path": str(ws.final_model_path),
            "train_s": models.train_s,
            "reused": reused,
            "skipped": dict(prepared.skipped),
        }
        (ws.root / _RECORD).write_text(json.dumps({k: v for k, v in result.items() if k != "skipped"}, indent=2))
        log.info("baseline %s: %d iterations, validation %s", method, budget(cfg), scalars)
        return result
    finally:
        prepared.lock.release()


def _check_work_dir(ws: Workspace, method: str) -> None:
    record = ws.root / _RECORD
    if ws.saved_rounds():
        raise StoreError(f"{ws.root} holds a caudo-ray run (models/round_*.pt): use a new work_dir for a baseline")
    if record.exists():
        done = json.loads(record.read_text()).get("method")
        if done != method:
            raise StoreError(f"{ws.root} holds the {done!r} baseline: use a new work_dir for {method!r}")
    elif ws.final_model_path.exists():
        raise StoreError(f"{ws.root} holds a final model that no baseline made: use a new work_dir")


def _train(
    cfg: RunConfig,
    method: str,
    prepared: PreparedRun,
    val: LabelledCases,
    device,
    hooks: TrainingHooks,
) -> RoundModels:
    store, num_classes = prepared.store, prepared.num_classes
    _, ex_images, ex_labels = store.exemplars()
    usable = np.flatnonzero(store.usable_mask())
    inputs = RoundInputs(ex_images, ex_labels)
    consistency = method == "consistency"
    if consistency:
        inputs = RoundInputs(ex_images, ex_labels, pool_images=store.read_images(usable))
    elif method == "supervised":
        truth = store.read_truth(usable)
        known = ~(truth == NO_TRUTH).all(axis=(1, 2))
        if not known.any():
            raise DataError("pool", "no pool case has a hidden label: the supervised baseline needs a labelled pool")
        log.info("supervised baseline: %d exemplars + %d labelled pool cases", len(ex_images), int(known.sum()))
        # Every labelled case is a view source like an exemplar: the same strong augmentation, drawn evenly.
        inputs = RoundInputs(
            np.concatenate([ex_images, store.read_images(usable[known])]),
            np.concatenate([ex_labels, truth[known]]),
        )
    run_cfg = plain_config(cfg, budget(cfg), pool=consistency)
    models = train_round_models(run_cfg, 0, inputs, num_classes=num_classes, val=val, device=device, hooks=hooks)
    models.round = cfg.rounds  # the final model of the work dir, as a run's final segmenter is
    return models
