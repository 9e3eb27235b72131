"""Store-backed steps of a round, shared verbatim by the local loop and the Ray actors.

- ``training_inputs``: what round r trains on (exemplars + round r-1's selected calibrated labels), read from
  the store by whoever trains (the trainer actor reads it itself; the driver never holds the pool).
- ``label_cases``: a calibration worker's whole job for one batch: read images, label, write results.
- ``select_and_commit``: the owner's step once a round's ``done`` mask is full.
- ``annotation_queries``: a committed round's cases to annotate next, by the configured strategy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from caudo_ray.arrays import IGNORE, finite_mean
from caudo_ray.config import RunConfig
from caudo_ray.labelling import selection
from caudo_ray.labelling.engine import LabelingEngine
from caudo_ray.metrics import spearman
from caudo_ray.store import PseudoLabelStore
from caudo_ray.training.inputs import RoundInputs


def training_inputs(store: PseudoLabelStore, r: int, *, with_pool: bool = False, veto: bool = False) -> RoundInputs:
    """Exemplars (answered queries included) plus, from round 1, the selected calibrated labels of round r-1
    weighted by reliability; with ``with_pool``, every usable pool image too (online consistency training) and,
    from round 1, round r-1's calibrated label of each. With ``veto``, a label's pixels where the calibrator's proposal differs from the
    kept label are :data:`~caudo_ray.arrays.IGNORE`: a pixel the calibration disputes teaches nothing."""
    ids, ex_images, ex_labels = store.exemplars()
    answers = store.annotations
    # take_in stores the answers after the split's exemplars.
    answered = sum(cid in answers for cid in ids)
    usable_mask = store.usable_mask()
    usable = np.flatnonzero(usable_mask)
    pool = store.read_images(usable) if with_pool else None
    if r == 0:
        return RoundInputs(ex_images, ex_labels, pool_images=pool, answered=answered)
    prev = r - 1
    pool_labels = _taught(store.rounds.read(prev, usable), veto) if with_pool else None
    # A case answered since round r-1 was committed trains as an exemplar, no longer as a pseudo label.
    selected = np.flatnonzero(store.rounds.selected(prev) & usable_mask)
    if not len(selected):
        return RoundInputs(ex_images, ex_labels, pool_images=pool, pool_labels=pool_labels, answered=answered)
    labels = store.rounds.read(prev, selected)
    return RoundInputs(
        ex_images,
        ex_labels,
        store.read_images(selected),
        _taught(labels, veto),
        labels["scores"]["reliability"].astype(np.float32),
        pool,
        pool_labels,
        answered,
    )


def _taught(labels: dict, veto: bool) -> np.ndarray:
    """The calibrated labels a round trains on, IGNORE where the calibrator's proposal disputes them (``veto``)."""
    kept = labels["calibrated"]
    return np.where(labels["proposed"] != kept, IGNORE, kept).astype(np.uint8) if veto else kept


@dataclass
class BatchStats:
    """What a worker sends back for a batch: indices and timings; the labels went to the store."""

    indices: np.ndarray
    infer_s: float  # the segmenter, on the image and its mirror
    ddim_s: float  # calibration: DDIM inversion and sampling, gate, arbitration
    score_s: float  # reliability scores and label maps, on the CPU
    store_s: float  # writing labels, scores and done
    read_s: float = 0.0  # reading images and truth


def label_cases(engine: LabelingEngine, store: PseudoLabelStore, r: int, indices: np.ndarray) -> BatchStats:
    """Label one batch and write it to the store (one writer per chunk: batches are aligned to the round's chunks)."""
    t0 = time.perf_counter()
    images, truth = store.read_batch(indices)
    t1 = time.perf_counter()
    result = engine.label_batch(images, truth)
    t2 = time.perf_counter()
    store.rounds.write(r, indices, result.initial, result.calibrated, result.scores, result.proposed)
    timings = result.timings
    return BatchStats(
        indices, timings["infer_s"], timings["ddim_s"], timings["score_s"], time.perf_counter() - t2, t1 - t0
    )


def select_and_commit(cfg: RunConfig, store: PseudoLabelStore, r: int, extra_summary: dict | None = None) -> dict:
    """Select the round's most reliable fraction (stratified by target size) and commit the round.

    Returns the round summary (also stored in the round's attributes): counts, reliability quantiles and, where
    the pool has hidden truth, pseudo-label Dice before and after calibration.
    """
    scores = store.rounds.scores(r)
    usable = store.usable_mask()
    reliability = np.where(usable, scores["reliability"], -np.inf)
    n_usable = int(usable.sum())
    fraction = cfg.fraction_for_round(r)
    strata = selection.area_strata(np.where(usable, scores["area"], 0.0))
    chosen = selection.select_top(reliability, fraction * n_usable / max(len(reliability), 1), strata=strata)
    chosen = chosen[usable[chosen]]
    selected = np.zeros(len(reliability), dtype=bool)
    selected[chosen] = True

    rel = scores["reliability"][usable]
    summary: dict = {
        "round": r,
        "cases": n_usable,
        "selected": int(selected.sum()),
        "selected_fraction": float(selected.sum() / max(n_usable, 1)),
        "reliability_mean": finite_mean(rel),
        "reliability_p10": float(np.quantile(rel, 0.1)) if len(rel) else math.nan,
        "reliability_p50": float(np.quantile(rel, 0.5)) if len(rel) else math.nan,
        "agreement_mean": finite_mean(scores["agreement"][usable]),
        "accepted_fraction": finite_mean(scores["accepted"][usable]) if "accepted" in scores else math.nan,
    }
    if "initial_dice" in scores:
        init, calib = scores["initial_dice"][usable], scores["calibrated_dice"][usable]
        has = np.isfinite(init)
        if has.any():
            summary["pseudo_dice_initial"] = float(init[has].mean())
            summary["pseudo_dice_calibrated"] = float(calib[has].mean())
            summary["calibration_gain"] = summary["pseudo_dice_calibrated"] - summary["pseudo_dice_initial"]
            summary["selected_pseudo_dice"] = finite_mean(calib[has & selected[usable]])
            summary["reliability_spearman"] = spearman(rel[has], calib[has]) if has.sum() > 2 else math.nan
    summary.update(extra_summary or {})
    store.rounds.commit(r, selected, summary)
    return summary


def annotation_queries(
    store: PseudoLabelStore,
    r: int,
    k: int,
    *,
    strategy: str = "reliability",
    groups: Mapping[str, str] | None = None,
    answered: Iterable[str] = (),
    seed: int = 0,
) -> list[selection.Query]:
    """What a person should label next: ``k`` usable cases of round ``r`` chosen by ``strategy``.

    No case of the starting labelled set's groups is asked for, and no case answered already
    (:func:`~caudo_ray.labelling.selection.annotation_queries` says why).

    Args:
        store: the run's store.
        r: a committed round.
        k: how many.
        strategy: one of :data:`~caudo_ray.config.QUERY_STRATEGIES`.
        groups: case id -> group (exam, patient) from the data set's index; None or a missing id: its own group.
        answered: case ids answered but not yet taken into the store (masks waiting for the run's next round).
        seed: the run's seed; the ``random`` strategy draws from (seed, r), so each round asks anew, reproducibly.
    """
    scores = store.rounds.scores(r)
    taken_in = store.annotations
    waiting = set(answered) - taken_in.keys()
    usable = np.array([i for i in np.flatnonzero(store.usable_mask()) if store.case_ids[i] not in waiting], dtype=np.int64)
    ids = [store.case_ids[i] for i in usable]
    group = (lambda c: c) if groups is None else (lambda c: groups.get(c, c))
    return selection.annotation_queries(
        ids,
        {name: scores[name][usable] for name in ("reliability", "entropy") if name in scores},
        k,
        strategy=strategy,
        groups=[group(c) for c in ids],
        labelled_groups={group(c) for c in store.exemplars()[0] if c not in taken_in},
        answered_groups=[group(c) for c in [*taken_in, *sorted(waiting)]],
        seed=(seed, r),
    )
