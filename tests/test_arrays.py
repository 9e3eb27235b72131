"""caudo_ray.arrays: the class map of probability maps."""

import numpy as np
import pytest

from caudo_ray.arrays import class_map


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_class_map_is_the_argmax_with_the_first_class_winning_ties(num_classes):
    rng = np.random.default_rng(num_classes)
    probs = rng.random((4, num_classes, 9, 11), dtype=np.float32)
    probs[:, -1, :3] = probs[:, 0, :3]  # exact ties between the first and the last class
    probs[:, 1, 3:5] = probs[:, :, 3:5].max(axis=1) + 1.0  # class 1 clearly wins a band
    labels = class_map(probs)
    assert labels.dtype == np.uint8 and labels.shape == (4, 9, 11)
    np.testing.assert_array_equal(labels, probs.argmax(1))
    assert (labels[:, 3:5] == 1).all()
