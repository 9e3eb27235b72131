"""Lifecycle hooks of a training loop: checkpoints, progress and data-parallel wrapping."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from caudo_ray.training.checkpoint import TrainingCheckpoint


@dataclass(frozen=True)
class TrainingHooks:
    """What a training loop reports to besides its result.

    Attributes:
        checkpoint: where the loop's full state (phase, iterations done, state dicts, RNG states) is saved every
            ``every`` iterations of each phase, and resumed from; None disables checkpoints.
        every: checkpoint interval in iterations; 0 disables checkpoints.
        progress: show progress bars.
        progress_lines: print this many lines per phase, ``<phase> <done>/<total> iterations``, each on its own line:
            a progress bar redraws one line, which a Ray actor's output (forwarded to the driver line by line) shows
            only once the phase ends; 0 prints none.
        wrap_model: wraps the segmenter for data-parallel training (``ray.train.torch.prepare_model``); None
            trains it as it is.
        rank: this process's rank in data-parallel training; only rank 0 trains the calibrator.
        carry: saved with every state, e.g. the trained segmenter while the calibrator trains.
    """

    checkpoint: TrainingCheckpoint | None = None
    every: int = 0
    progress: bool = False
    progress_lines: int = 0
    wrap_model: Callable[[nn.Module], nn.Module] | None = None
    rank: int = 0
    carry: Mapping[str, Any] = field(default_factory=dict)

    @property
    def checkpoints(self) -> bool:
        return self.checkpoint is not None and self.every > 0

    def resume(self) -> dict[str, Any] | None:
        """The state to resume from, or None to start afresh."""
        return self.checkpoint.load() if self.checkpoints else None

    def after(self, done: int, state: Callable[[], dict[str, Any]], *, phase: str = "", total: int = 0) -> None:
        """Checkpoint ``state()`` if ``done`` iterations complete an interval (the state is built only then), and
        print a progress line if ``done`` of the phase's ``total`` iterations complete one of its ``progress_lines``."""
        if self.checkpoints and done % self.every == 0:
            self.checkpoint.save({**self.carry, **state()})
        if self.progress_lines and total and (done % max(1, total // self.progress_lines) == 0 or done == total):
            print(f"{phase} {done}/{total} iterations", flush=True)


NO_HOOKS = TrainingHooks()
"""No checkpoints, no progress bars, no wrapping: the default of every training loop (immutable, so shared)."""
