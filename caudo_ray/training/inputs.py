"""What a round's networks train on: the labelled exemplars and the pseudo-labelled pool cases kept so far."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RoundInputs:
    """The training set of one round, at the working size.

    Attributes:
        exemplar_images: (K, H, W) float32 in [0, 1], the labelled exemplars (and answered queries).
        exemplar_labels: (K, H, W) uint8 their label maps.
        pseudo_images: (P, H, W) float32 pool images with selected pseudo labels, or None (round 0).
        pseudo_labels: (P, H, W) uint8 their calibrated labels.
        pseudo_weights: (P,) float32 their reliabilities, the loss weight of each; None means all 1.
        pool_images: (N, H, W) float32 every usable pool image, for online consistency training; None without it.
        pool_labels: (N, H, W) uint8 the previous round's calibrated label of each of ``pool_images``, which
            anchored consistency training teaches within; None in round 0 or without the pool.
        answered: how many of the exemplars, the last ones, are answered queries; the drift guard reads every
            round on views of the others alone, the labelled set the run started from, so its readings compare.
    """

    exemplar_images: np.ndarray
    exemplar_labels: np.ndarray
    pseudo_images: np.ndarray | None = None
    pseudo_labels: np.ndarray | None = None
    pseudo_weights: np.ndarray | None = None
    pool_images: np.ndarray | None = None
    pool_labels: np.ndarray | None = None
    answered: int = 0

    @property
    def has_pseudo(self) -> bool:
        return self.pseudo_images is not None and len(self.pseudo_images) > 0

    def exemplars_only(self) -> RoundInputs:
        """The labelled set alone (what the calibrator trains on)."""
        return RoundInputs(self.exemplar_images, self.exemplar_labels, answered=self.answered)

    def first_exemplars(self) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of the labelled set the run started from (the exemplars without the answers)."""
        k = len(self.exemplar_images) - self.answered
        return self.exemplar_images[:k], self.exemplar_labels[:k]
