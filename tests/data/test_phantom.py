"""Phantom frames and phantom dataset folders."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from caudo_ray.config import ConfigError, PhantomConfig
from caudo_ray.data import index_dataset, load_case, make_split, phantom_case, write_phantom_dataset
from caudo_ray.errors import DataError


def test_deterministic_and_seed_dependent():
    a_img, a_mask = phantom_case(7, (48, 64), 2)
    b_img, b_mask = phantom_case(7, (48, 64), 2)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_mask, b_mask)
    c_img, _ = phantom_case(8, (48, 64), 2)
    assert not np.array_equal(a_img, c_img)
    assert a_img.shape == (48, 64) and a_img.dtype == np.float32 and a_mask.dtype == np.uint8
    assert 0.0 <= a_img.min() and a_img.max() <= 1.0
    assert set(np.unique(a_mask)) == {0, 1}


def test_multiclass_and_target_looks_like_a_head():
    _, mask = phantom_case(3, (64, 64), 3)
    assert set(np.unique(mask)) == {0, 1, 2}
    # Class 2 sits inside the head: every class-2 pixel's eight neighbours are head (class 1 or 2), never background.
    for seed in range(20):
        _, mask = phantom_case(seed, (64, 64), 3)
        inner = mask == 2
        assert inner.any(), seed
        around = ndimage.binary_dilation(inner, structure=np.ones((3, 3), bool))
        assert not (around & (mask == 0)).any(), seed


def test_target_sizes_vary_widely():
    fractions = [(phantom_case(s, (48, 48), 2)[1] > 0).mean() for s in range(30)]
    assert min(fractions) < 0.05 and max(fractions) > 0.15


def test_speckle_and_target_width_knobs():
    """Less speckle gives a smoother tissue texture; a narrower width range bounds the head's size."""
    raw, mask = phantom_case(4, (96, 96), 2)
    soft, soft_mask = phantom_case(4, (96, 96), 2, speckle=0.3)
    np.testing.assert_array_equal(mask, soft_mask)  # the same anatomy and placement
    tissue = (mask == 0) & (raw > 0) & (soft > 0)
    assert np.std(np.diff(soft, axis=1)[tissue[:, 1:]]) < 0.7 * np.std(np.diff(raw, axis=1)[tissue[:, 1:]])
    fractions = [(phantom_case(s, (64, 64), 2, target_width=(0.3, 0.4))[1] > 0).mean() for s in range(20)]
    wide = [(phantom_case(s, (64, 64), 2)[1] > 0).mean() for s in range(20)]
    assert np.ptp(fractions) < np.ptp(wide) and min(fractions) > min(wide)


def test_dataset_folder_is_deterministic_and_grouped(tmp_path):
    cfg = PhantomConfig(num_labelled=8, num_unlabelled=4, size=(32, 32), num_classes=3, num_groups=4, seed=5)
    root = write_phantom_dataset(tmp_path / "ph", cfg)
    again = write_phantom_dataset(tmp_path / "ph2", cfg)
    for sub in ("images", "masks", "unlabeled"):
        names = sorted(p.name for p in (root / sub).iterdir())
        assert names == sorted(p.name for p in (again / sub).iterdir())
        for name in names:
            assert (root / sub / name).read_bytes() == (again / sub / name).read_bytes()
    assert (root / "meta.csv").read_text() == (again / "meta.csv").read_text()
    assert (root / "meta.csv").read_text().startswith("filename,group\n")

    index = index_dataset(root, group_column="group")
    assert len(index.labelled) == 8 and len(index.unlabelled) == 4
    assert len({r.group for r in index.labelled}) == 4
    assert not {r.group for r in index.labelled} & {r.group for r in index.unlabelled}
    case = load_case(index.labelled[0], (32, 32), num_classes=3)
    assert case.mask.max() == 2
    split = make_split(index, seed=0, val_fraction=0.25, test_fraction=0.25)
    assert split.val and split.test

    assert write_phantom_dataset(root, cfg) == root  # same settings: reused
    with pytest.raises(DataError, match="not empty"):
        write_phantom_dataset(root, PhantomConfig(num_labelled=9, size=(32, 32)))


def test_decoys_are_bright_unlabelled_rings_off_the_target():
    """Decoys change the image only: the label is the target's, and the decoys' bright rims lie off it."""
    bright_with, bright_without = 0, 0
    for seed in range(10, 20):
        plain_img, plain_mask = phantom_case(seed, (96, 96), 2, speckle=0.0)
        img, mask = phantom_case(seed, (96, 96), 2, speckle=0.0, decoys=(2, 2), decoy_contrast=1.5)
        np.testing.assert_array_equal(mask, plain_mask)
        # Without speckle, near-white pixels off the target are rims (the frame is scaled to [0, 1]).
        bright_with += int((img[mask == 0] >= 0.95).sum())
        bright_without += int((plain_img[plain_mask == 0] >= 0.95).sum())
    assert bright_with > 4 * bright_without  # 989 against 159 when written


def test_ring_labels_only_the_rim():
    _, filled = phantom_case(5, (96, 96), 2)
    _, ring = phantom_case(5, (96, 96), 2, target_label="ring")
    assert ring.any() and not (ring & (filled == 0)).any()  # the rim lies within the filled target
    assert ring.sum() < 0.5 * filled.sum()
    _, ring3 = phantom_case(5, (96, 96), 3, target_label="ring")
    assert set(np.unique(ring3)) == {0, 1, 2}


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [("decoys", (3, 1), "low <= high"), ("decoy_size", (0.0, 1.0), "0 < low"), ("target_label", "hollow", "one of filled, ring")],
)
def test_decoy_and_target_label_config_is_validated(field, value, problem):
    with pytest.raises(ConfigError, match=f"phantom.{field}.*{problem}"):
        PhantomConfig(**{field: value}).validate("phantom")
