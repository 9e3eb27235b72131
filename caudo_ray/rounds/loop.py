"""Running a round's labelling through an executor: stream the missing cases, repair corrupt ones, resume.

Batches are the round's store chunks (``chunk_batches``): each chunk goes to one worker, which writes it whole,
and a resumed chunk's batch holds only its cases not done. The driver holds indices and per-stage timings only;
labels go from the workers straight into the store.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from caudo_ray.config import RunConfig
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.rounds.executor import Executor
from caudo_ray.store import chunk_batches

log = logging.getLogger(__name__)


def stream_round(cfg: RunConfig, owner, executor: Executor, r: int, models: RoundModels, progress: bool) -> tuple[dict, int]:
    """Begin round ``r`` and stream its missing cases through ``executor``; returns (per-stage times, cases labelled)."""
    c = cfg.calibrator
    params = {
        "guidance_strength": c.guidance_strength,
        "calibration_strength": c.calibration_strength,
        "inference_steps": c.inference_steps,
        "calibrated": c.enabled,
        "model_version": models.version,
    }
    # A round resumed with another runtime.batch_size keeps the chunks (and so the batches) it was begun with.
    chunk = owner.rounds.begin(r, params, cfg.runtime.batch_size)
    if chunk != cfg.runtime.batch_size:
        log.warning(
            "round %d was begun with batch size %d and keeps it (runtime.batch_size = %d applies to new rounds)",
            r, chunk, cfg.runtime.batch_size,
        )  # fmt: skip
    _drop_corrupt(owner, r)
    todo = owner.rounds.missing(r)
    log.info("round %d: labelling %d cases, keeping %d already done", r, len(todo), int(owner.usable_mask().sum()) - len(todo))
    t0 = time.perf_counter()
    sums = {"infer_s": 0.0, "ddim_s": 0.0, "score_s": 0.0, "store_s": 0.0}
    bar = tqdm(total=len(todo), desc=f"round {r}: labelling", unit="case", disable=not progress)
    for stats in executor.label(r, models, chunk_batches(todo, chunk)):
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
        "score_s_per_case": sums["score_s"] / n,
        "store_write_s_per_case": sums["store_s"] / n,
    }
    return perf, len(todo)


def repair_round(cfg: RunConfig, owner, executor: Executor, r: int, models: RoundModels) -> int:
    """Recompute the cases of committed round ``r`` whose chunks are corrupt; returns how many were relabelled.

    The round's saved models label them again, which gives the same labels, so the committed selection and
    summary stay valid. Cases an interrupted repair left not done are picked up the same way.
    """
    _drop_corrupt(owner, r)
    todo = owner.rounds.missing(r)
    if todo.size:  # a Ray executor would start its worker pool even for nothing
        log.info("round %d (committed): relabelling %d cases", r, todo.size)
        for _ in executor.label(r, models, chunk_batches(todo, owner.rounds.chunk_size(r))):
            pass
    return int(todo.size)


def _drop_corrupt(owner, r: int) -> None:
    """Resume keeps the cases an earlier invocation finished only once their chunks read back intact."""
    corrupt = owner.rounds.verify(r)
    if corrupt:
        ids = owner.case_ids
        relabelled = owner.rounds.invalidate(r, corrupt)
        log.warning(
            "round %d: %d stored cases are corrupt and will be recomputed with the rest of their chunks (%d cases): %s",
            r, len(corrupt), len(relabelled), [ids[i] for i in corrupt],
        )  # fmt: skip


def load_or_train(path: Path, train: Callable[[], RoundModels], checkpoint: Path) -> RoundModels:
    """The saved models at ``path``, or newly trained ones saved there; their training checkpoint goes once saved."""
    if path.exists():
        return RoundModels.load(path)
    models = train()
    models.save(path)
    checkpoint.unlink(missing_ok=True)
    return models
