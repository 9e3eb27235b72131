"""The drift guard: a label-free reading of every trained segmenter, and the rule that keeps the better one.

Self-training can teach a segmenter its own mistakes: a round trained on pseudo labels that share an error learns
it more firmly and labels the pool worse than the round before. No pool label says so. What a run does have is its
labelled exemplars, and every round trains on their augmented views; a round that has started to contradict them
has drifted. Each segmenter is therefore scored on the same augmented exemplar views, drawn once for the whole run
(:func:`caudo_ray.rounds.train.exemplar_view_dice`), and a segmenter that scores lower than the best one before it
by more than ``guard.tolerance`` (on any class) is a regression: the run stops training rounds and keeps the best
segmenter so far.
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
        regressed: the latest segmenter scores lower than ``best``'s by more than the tolerance.
        best: index (into the history) of the segmenter the run keeps.
        drop: how far the latest is below ``best`` on its worst class (negative: above it).
    """

    regressed: bool
    best: int
    drop: float


def reading(models: RoundModels) -> dict[str, float]:
    """The per-class exemplar-view Dice of a round's segmenter (``dice_class<c>``), what the guard compares."""
    return {k: v for k, v in models.exemplar_metrics.items() if k.startswith("dice_class")}


def judge(history: list[dict[str, float]], cfg: GuardConfig) -> Verdict:
    """Judge the last of ``history`` (one :func:`reading` per segmenter, in training order) against the best before.

    The best segmenter is the one with the highest mean reading; the latest regresses when, on some class, it is
    below the best by more than ``cfg.tolerance``. Later segmenters win ties, since they have seen more of the pool.
    """
    if not history:
        raise ValueError("judge needs at least one reading")
    means = [sum(h.values()) / max(len(h), 1) for h in history]
    earlier = range(len(history) - 1)
    if not earlier:
        return Verdict(False, 0, -math.inf)
    best = max(earlier, key=lambda i: (means[i], i))
    latest = history[-1]
    drop = max(history[best][k] - latest.get(k, 0.0) for k in history[best])
    if cfg.enabled and drop > cfg.tolerance:
        return Verdict(True, best, drop)
    return Verdict(False, len(history) - 1, drop)
