"""Registration of the exemplars onto images (caudo_ray.registration): real phantoms, known transforms."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from caudo_ray.data.phantom import phantom_case
from caudo_ray.errors import DataError
from caudo_ray.metrics import dice_per_case
from caudo_ray.registration import register_exemplars

SIZE = (64, 64)


def _moved(image: np.ndarray, label: np.ndarray, degrees: float, zoom: float, shift: tuple[float, float]):
    """The image and label seen through a known rotation, zoom and shift (normalised units)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    theta = torch.tensor([[[c / zoom, -s / zoom, shift[0]], [s / zoom, c / zoom, shift[1]]]], dtype=torch.float32)
    grid = F.affine_grid(theta, [1, 1, *image.shape], align_corners=False)

    def sample(x: np.ndarray, mode: str) -> np.ndarray:
        return F.grid_sample(torch.from_numpy(x.astype(np.float32))[None, None], grid, mode=mode, padding_mode="border", align_corners=False)[0, 0].numpy()

    return sample(image, "bilinear"), np.rint(sample(label, "nearest")).astype(np.uint8)


@pytest.fixture(scope="module")
def exemplar():
    image, label = phantom_case(seed=3, size=SIZE, target_width=(0.4, 0.45))
    return image.astype(np.float32), label.astype(np.uint8)


def test_a_rotated_zoomed_shifted_image_gets_the_exemplar_label_where_its_target_moved(exemplar):
    image, label = exemplar
    fixed, truth = _moved(image, label, degrees=90.0, zoom=1.3, shift=(0.1, -0.1))
    unregistered = dice_per_case(label[None], truth[None], 2)[0]
    reg = register_exemplars(image[None], label[None], fixed[None], 2, affine_iterations=80, deformable_iterations=30)
    registered = dice_per_case(reg.labels, truth[None], 2)[0]
    # Measured 0.98, against 0.05 for the exemplar's label in place; the best start without optimisation gives
    # 0.76, the optimisation from the identity alone 0.03 (a gradient from one start finds the nearest optimum).
    assert registered >= 0.9 and unregistered <= 0.2, (registered, unregistered)
    assert reg.probs.shape == (1, 2, *SIZE)
    np.testing.assert_allclose(reg.probs.sum(1), 1.0, atol=1e-5)


def test_each_image_is_registered_from_the_exemplar_most_like_it(exemplar):
    image, label = exemplar
    other, other_label = phantom_case(seed=11, size=SIZE, target_width=(0.15, 0.2))
    fixed, _ = _moved(image, label, degrees=0.0, zoom=1.0, shift=(0.05, 0.0))
    reg = register_exemplars(
        np.stack([other, image]).astype(np.float32), np.stack([other_label, label]), fixed[None], 2,
        affine_iterations=5, deformable_iterations=0,
    )  # fmt: skip
    assert reg.exemplar.tolist() == [1]


def test_registration_is_deterministic(exemplar):
    image, label = exemplar
    fixed, _ = _moved(image, label, degrees=30.0, zoom=0.9, shift=(0.0, 0.1))
    a, b = (register_exemplars(image[None], label[None], fixed[None], 2, affine_iterations=10, deformable_iterations=5) for _ in range(2))
    np.testing.assert_array_equal(a.probs, b.probs)
    np.testing.assert_array_equal(a.similarity, b.similarity)


def test_bad_inputs_name_what_is_wrong(exemplar):
    image, label = exemplar
    with pytest.raises(DataError, match="images"):
        register_exemplars(image[None], label[None], np.zeros((1, 32, 32), np.float32), 2)
    with pytest.raises(DataError, match="exemplars"):
        register_exemplars(image[None], label[None, :32], image[None], 2)
    with pytest.raises(DataError, match="num_classes"):
        register_exemplars(image[None], label[None] * 2, image[None], 2)
