"""Curriculum selection of the most reliable pseudo labels, stratified by target size, and annotation queries."""

from __future__ import annotations

import math

import numpy as np

from caudo_ray.errors import DataError


def select_top(reliability: np.ndarray, fraction: float, *, strata: np.ndarray | None = None) -> np.ndarray:
    """Indices (sorted ascending) of the most reliable cases.

    Without strata: the ``ceil(fraction * N)`` most reliable. With strata: the ``ceil(fraction * n_s)`` most
    reliable of each stratum s (so every non-empty stratum contributes at least one case and the total can
    exceed ``ceil(fraction * N)`` by fewer than the number of strata). Ties go to the lower index; NaN
    reliabilities rank last.

    Args:
        reliability: (N,) scores, higher is better.
        fraction: in (0, 1].
        strata: optional (N,) integer stratum per case, e.g. from :func:`area_strata`.
    """
    rel = _check_vector("reliability", reliability)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if strata is None:
        return np.sort(_ranked(rel)[: math.ceil(fraction * len(rel))])
    strata = np.asarray(strata)
    if strata.shape != rel.shape:
        raise DataError("strata", f"shape {strata.shape} does not match reliability's {rel.shape}")
    chosen = []
    for s in np.unique(strata):
        members = np.flatnonzero(strata == s)
        chosen.append(members[_ranked(rel[members])[: math.ceil(fraction * len(members))]])
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, np.int64)


def area_strata(area: np.ndarray, n_bins: int = 4) -> np.ndarray:
    """Quantile bins of target area: (N,) int64 in [0, n_bins), by rank so the bins have equal counts.

    Ties are broken by index, so equal areas can fall into neighbouring bins; that keeps the bins balanced.
    """
    area = _check_vector("area", area)
    if n_bins <= 0:
        raise ValueError(f"n_bins must be > 0, got {n_bins}")
    ranks = np.empty(len(area), np.int64)
    ranks[np.argsort(area, kind="stable")] = np.arange(len(area))
    return (ranks * n_bins // max(len(area), 1)).astype(np.int64)


def annotation_queries(case_ids: list[str] | np.ndarray, reliability: np.ndarray, k: int) -> list[tuple[str, float]]:
    """The ``k`` least reliable cases, least reliable first, as ``(case_id, reliability)``; ties by index."""
    rel = _check_vector("reliability", reliability)
    if len(case_ids) != len(rel):
        raise DataError("case_ids", f"{len(case_ids)} ids for {len(rel)} reliabilities")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    order = _ranked_ascending(rel)
    return [(str(case_ids[i]), float(rel[i])) for i in order[:k]]


def _nan_low(rel: np.ndarray) -> np.ndarray:
    """NaN mapped to -inf so it ranks as least reliable."""
    return np.where(np.isnan(rel), -np.inf, rel)


def _ranked(rel: np.ndarray) -> np.ndarray:
    """Indices by descending reliability, ties by ascending index, NaN last."""
    return np.lexsort((np.arange(len(rel)), -_nan_low(rel)))


def _ranked_ascending(rel: np.ndarray) -> np.ndarray:
    """Indices by ascending reliability, ties by ascending index, NaN first (least trustworthy)."""
    return np.lexsort((np.arange(len(rel)), _nan_low(rel)))


def _check_vector(name: str, values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise DataError(name, f"expected a (N,) vector, got shape {values.shape}")
    return values
