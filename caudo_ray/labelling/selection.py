"""Curriculum selection of the most reliable pseudo labels, stratified by target size, and annotation queries
by strategy (reliability, random, entropy, diverse)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from caudo_ray.config import QUERY_STRATEGIES
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


@dataclass(frozen=True)
class Query:
    """A case a person should annotate next, with the scores that ranked it."""

    case_id: str
    reliability: float
    entropy: float
    group: str


def annotation_queries(
    case_ids: Sequence[str],
    scores: Mapping[str, np.ndarray],
    k: int,
    *,
    strategy: str = "reliability",
    groups: Sequence[str] | None = None,
    labelled_groups: Iterable[str] = (),
    answered_groups: Sequence[str] = (),
    seed: int | Sequence[int] = 0,
) -> list[Query]:
    """The ``k`` cases to annotate next, in the order a person should answer them.

    No case of the starting labelled set's groups is asked for: that set labels its patients (or exams) whole on
    ACDC, and the slices of a labelled patient share its anatomy, scanner and contrast, so they are not new. A case
    already answered has left the candidates; its group's other cases stay, since an answer labels one slice and a
    data set of few patients would otherwise run out of queries after one answer each. The ``diverse`` strategy
    asks for the groups nobody answered before those somebody did.

    Args:
        case_ids: (N,) candidate ids (the usable pool).
        scores: the round's (N,) scores; ``reliability`` always, ``entropy`` for the ``entropy`` strategy.
        k: how many (fewer when fewer candidates are left).
        strategy: one of :data:`~caudo_ray.config.QUERY_STRATEGIES` (see :func:`query_order`).
        groups: (N,) group (exam, patient) of each candidate; None: each case is its own group.
        labelled_groups: groups of the starting labelled set (the split's exemplars): never asked.
        answered_groups: the group of each answer given so far (repeated per answer), for ``diverse``.
        seed: the ``random`` strategy's seed.

    Raises:
        DataError: the vectors disagree in length.
        ValueError: an unknown strategy or a negative ``k``.
    """
    rel = _check_vector("reliability", scores["reliability"])
    entropy = _check_vector("entropy", scores["entropy"]) if "entropy" in scores else None
    group_of = [str(c) for c in case_ids] if groups is None else [str(g) for g in groups]
    for name, values in (("case_ids", case_ids), ("groups", group_of), ("entropy", rel if entropy is None else entropy)):
        if len(values) != len(rel):
            raise DataError(name, f"{len(values)} values for {len(rel)} reliabilities")
    labelled = set(labelled_groups)
    candidates = np.array([i for i, g in enumerate(group_of) if g not in labelled], dtype=np.int64)
    order = query_order(
        strategy,
        k,
        reliability=rel[candidates],
        entropy=None if entropy is None else entropy[candidates],
        groups=[group_of[i] for i in candidates],
        asked=Counter(answered_groups),
        seed=seed,
    )
    return [
        Query(str(case_ids[i]), float(rel[i]), math.nan if entropy is None else float(entropy[i]), group_of[i])
        for i in candidates[order]
    ]


def query_order(
    strategy: str,
    k: int,
    *,
    reliability: np.ndarray,
    entropy: np.ndarray | None = None,
    groups: Sequence[str] | None = None,
    asked: Mapping[str, int] | None = None,
    seed: int | Sequence[int] = 0,
) -> np.ndarray:
    """Indices of the ``k`` cases a strategy asks for, first query first.

    - ``reliability``: :func:`least_reliable`;
    - ``random``: a seeded uniform draw without replacement (the baseline every strategy must beat);
    - ``entropy``: :func:`most_uncertain` (MONAI Label's kind of query);
    - ``diverse``: :func:`diverse_queries`.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    rel = _check_vector("reliability", reliability)
    if strategy == "reliability":
        return least_reliable(rel, k)
    if strategy == "random":
        return np.random.default_rng(seed).permutation(len(rel))[:k]
    if strategy == "entropy":
        if entropy is None:
            raise DataError("entropy", "the entropy strategy needs the round's entropy scores")
        return most_uncertain(entropy, k)
    if strategy == "diverse":
        return diverse_queries(rel, [str(i) for i in range(len(rel))] if groups is None else groups, k, asked=asked)
    raise ValueError(f"unknown query strategy {strategy!r}; expected one of {', '.join(QUERY_STRATEGIES)}")


def least_reliable(reliability: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` least reliable cases, least reliable first; ties by index, NaN first."""
    return _ranked_ascending(_check_vector("reliability", reliability))[:k]


def most_uncertain(entropy: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` cases of highest entropy, highest first; ties by index, NaN first.

    ``entropy`` is the stored score of that name: the mean over the image of the segmenter's normalised softmax
    entropy (0 certain, 1 uniform), taken before calibration, so it ranks what the segmenter alone is unsure of.
    """
    h = _check_vector("entropy", entropy)
    return _ranked_ascending(-h)[:k]


def diverse_queries(reliability: np.ndarray, groups: Sequence[str], k: int, *, asked: Mapping[str, int] | None = None) -> np.ndarray:
    """The least reliable cases, no two of one group while groups are left: indices, first query first.

    The first pass gives each group's least reliable case, least reliable first. When ``k`` exceeds the number of
    groups, the next pass gives each group's second least reliable case (least reliable first again), and so on:
    every group is asked once before any is asked twice, and ``min(k, N)`` cases always come back. A group answered
    ``n`` times in earlier rounds (``asked``) starts at pass ``n``, so the queries spread over the rounds too.

    Args:
        reliability: (N,) scores, higher is better.
        groups: (N,) group (exam, patient) of each case.
        k: how many.
        asked: group -> answers given there already.
    """
    rel = _check_vector("reliability", reliability)
    if len(groups) != len(rel):
        raise DataError("groups", f"{len(groups)} groups for {len(rel)} reliabilities")
    order = _ranked_ascending(rel)
    rank_in_group = np.empty(len(rel), np.int64)
    seen = dict(asked or {})
    for i in order:
        rank_in_group[i] = seen.get(groups[i], 0)
        seen[groups[i]] = rank_in_group[i] + 1
    position = np.empty(len(rel), np.int64)
    position[order] = np.arange(len(rel))
    return np.lexsort((position, rank_in_group))[:k]


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
