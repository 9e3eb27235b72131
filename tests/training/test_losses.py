"""The supervised loss: weighted Dice + CE, and the IGNORE pixels a calibration disputes."""

from __future__ import annotations

import pytest
import torch

from caudo_ray.arrays import IGNORE
from caudo_ray.training.losses import weighted_dice_ce


def _confident(target: torch.Tensor, classes: int, scale: float = 10.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(target.clamp_max(classes - 1), classes).permute(0, 3, 1, 2).float() * scale


def test_ignored_pixels_get_no_gradient_and_change_nothing():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8))
    ignored = torch.zeros(2, 8, 8, dtype=torch.bool)
    ignored[:, :3] = True
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    weights = torch.tensor([1.0, 0.5])
    loss = weighted_dice_ce(logits, torch.where(ignored, IGNORE, target), weights)
    loss.backward()
    assert float(logits.grad[:, :, :3].abs().max()) == 0.0  # an IGNORE pixel teaches nothing
    assert float(logits.grad[:, :, 3:].abs().max()) > 0.0
    # Whatever the logits say at IGNORE pixels, the loss is the same.
    other = logits.detach().clone()
    other[:, :, :3] = torch.randn(2, 3, 3, 8) * 5
    again = weighted_dice_ce(other, torch.where(ignored, IGNORE, target), weights)
    assert float(again) == pytest.approx(float(loss), rel=1e-6)


def test_a_label_that_agrees_scores_lower_than_one_that_does_not_outside_ignore():
    target = torch.randint(0, 2, (1, 8, 8))
    labelled = torch.where(torch.arange(8)[None, :, None].expand(1, 8, 8) < 4, target, torch.full_like(target, IGNORE))
    agree = _confident(target, 2)
    wrong_where_ignored = agree.clone()
    wrong_where_ignored[:, :, 4:] *= -1  # wrong only where the label is IGNORE
    w = torch.ones(1)
    assert float(weighted_dice_ce(wrong_where_ignored, labelled, w)) == pytest.approx(float(weighted_dice_ce(agree, labelled, w)), abs=1e-6)
    assert float(weighted_dice_ce(-agree, labelled, w)) > float(weighted_dice_ce(agree, labelled, w)) + 0.5
