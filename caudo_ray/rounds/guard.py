"""The drift guard: a label-free reading of every trained segmenter, and the rule that keeps the better one.

Self-training can teach a segmenter its own mistakes: a round trained on pseudo labels that share an error learns
it more firmly and labels the pool worse than the round before. No pool label says so. What a run does have is its
labelled exemplars, and every round trains on their augmented views; a round that has started to contradict them
has drifted. Each segmenter is therefore scored on the same augmented exemplar views, drawn once for the whole run
(:func:`caudo_ray.rounds.train.exemplar_view_dice`). A segmenter is a regression when its mean over the classes is
lower than the best one's before it by more than ``guard.tolerance``, or when one class has collapsed, lower by more
than ``guard.class_tolerance``: the run stops training rounds and keeps the best segmenter so far.

Why two bounds: a round that learns the pool trades a little of one class's fit to the exemplar for the others'. On
ACDC (fast profile, the loop without calibration) round 1 read 11 points lower on the left ventricle's exemplar
views (paired over the 64 views: standard error 1.7 points, so no noise) and 0.9 point lower on the mean, while its
test Dice rose by 4.9 points on the mean and fell by 4.0 on that class; a bound on each class at the mean's
tolerance stopped it there. A class that is lost, not traded, still stops the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from caudo_ray.config import GuardConfig
from caudo_ray.networks.bundle import RoundModels


@dataclass(frozen=True)
class Verdict:
    """What the guard concludes after the latest segmenter.

    Attributes:
        regressed: the latest segmenter is below ``best`` by more than a tolerance, on the mean or on a class.
        best: index (into the history) of the segmenter the run keeps.
        drop: how far the latest's mean is below ``best``'s (negative: above it).
        class_drop: how far the latest is below ``best`` on its worst class.
    """

    regressed: bool
    best: int
    drop: float
    class_drop: float


def reading(models: RoundModels) -> dict[str, float]:
    """The per-class exemplar-view Dice of a round's segmenter (``dice_class<c>``), what the guard compares."""
    return {k: v for k, v in models.exemplar_metrics.items() if k.startswith("dice_class")}


def judge(history: list[dict[str, float]], cfg: GuardConfig) -> Verdict:
    """Judge the last of ``history`` (one :func:`reading` per segmenter, in training order) against the best before.

    The best segmenter is the one with the highest mean reading; the latest regresses when its mean is below the
    best's by more than ``cfg.tolerance``, or one of its classes by more than ``cfg.class_tolerance``. Later
    segmenters win ties, since they have seen more of the pool.
    """
    if not history:
        raise ValueError("judge needs at least one reading")
    if len(history) == 1:
        return Verdict(False, 0, -math.inf, -math.inf)
    best = best_before(history)
    latest = history[-1]
    drop = mean_reading(history[best]) - mean_reading(latest)
    class_drop = max(history[best][k] - latest.get(k, 0.0) for k in history[best])
    if cfg.enabled and (drop > cfg.tolerance or class_drop > cfg.class_tolerance):
        return Verdict(True, best, drop, class_drop)
    return Verdict(False, len(history) - 1, drop, class_drop)


def best_before(history: list[dict[str, float]]) -> int:
    """Index of the segmenter the last of ``history`` is judged against: the highest mean reading before it, the
    later one on a tie."""
    return max(range(len(history) - 1), key=lambda i: (mean_reading(history[i]), i))


def mean_reading(reading: dict[str, float]) -> float:
    """A reading's mean over its classes, what ranks the segmenters."""
    return sum(reading.values()) / max(len(reading), 1)
