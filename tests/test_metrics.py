"""HD95 in millimetres where the cases carry a spacing, in pixels otherwise: analytic cases and the reading path."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from caudo_ray.data import LabelledCases, index_dataset, load_case
from caudo_ray.errors import DataError
from caudo_ray.metrics import hd95_of, segmentation_metrics, volume_metrics
from caudo_ray.transforms.preprocess import resize_mask

SPACING = (0.5, 1.0)  # mm per pixel along rows, cols: anisotropic, as a resized or non-square-pixel scan is
RADIUS_MM, GAP_MM = 20.0, 6.0


def _disc_mm(shape: tuple[int, int], spacing: tuple[float, float], radius_mm: float) -> np.ndarray:
    """A disc of ``radius_mm`` in millimetres (an ellipse in pixels), centred, as a uint8 mask."""
    rows, cols = np.indices(shape, dtype=np.float64)
    dr = (rows - (shape[0] - 1) / 2) * spacing[0]
    dc = (cols - (shape[1] - 1) / 2) * spacing[1]
    return (np.hypot(dr, dc) <= radius_mm).astype(np.uint8)


def test_single_pixels_are_their_distance_apart_in_mm_and_in_pixels():
    pred, truth = np.zeros((1, 32, 32), np.uint8), np.zeros((1, 32, 32), np.uint8)
    pred[0, 10, 10], truth[0, 13, 14] = 1, 1  # 3 rows and 4 columns apart
    px = segmentation_metrics(pred, truth, 2)
    mm = segmentation_metrics(pred, truth, 2, spacing=[SPACING])
    assert px["hd95_px"] == pytest.approx(5.0, abs=1e-6) and "hd95_mm" not in px
    assert mm["hd95_mm"] == pytest.approx(math.hypot(3 * 0.5, 4 * 1.0), abs=1e-6) and "hd95_px" not in mm
    assert mm["hd95_mm_class1"] == mm["hd95_mm"] and hd95_of(mm) == (mm["hd95_mm"], "mm")


def test_concentric_discs_in_mm_are_the_gap_apart_whatever_the_pixel_shape():
    # Discs round in millimetres are ellipses in these anisotropic pixels: every boundary point of one lies
    # GAP_MM from the other, so HD95 is GAP_MM up to the rasterisation, at most one pixel's longer side (1 mm).
    shape = (128, 64)
    truth = _disc_mm(shape, SPACING, RADIUS_MM)[None]
    pred = _disc_mm(shape, SPACING, RADIUS_MM + GAP_MM)[None]
    mm = segmentation_metrics(pred, truth, 2, spacing=[SPACING])["hd95_mm"]
    assert mm == pytest.approx(GAP_MM, abs=1.0)
    # In pixels the same discs are 12 pixels apart along rows and 6 along columns: not the gap in mm.
    px = segmentation_metrics(pred, truth, 2)["hd95_px"]
    assert px > GAP_MM + 3


def test_spacing_must_be_one_positive_pair_per_case():
    masks = np.zeros((2, 16, 16), np.uint8)
    with pytest.raises(DataError, match="spacing"):
        segmentation_metrics(masks, masks, 2, spacing=[SPACING])
    with pytest.raises(DataError, match="spacing"):
        segmentation_metrics(masks, masks, 2, spacing=[SPACING, (0.0, 1.0)])


def test_volume_hd95_uses_the_voxel_spacing_and_a_missing_class_the_diagonal_in_mm():
    pred, truth = np.zeros((4, 16, 16), np.uint8), np.zeros((4, 16, 16), np.uint8)
    pred[0, 2, 2], truth[2, 2, 5] = 1, 1  # 2 slices and 3 columns apart
    pred[1, 8, 8] = 2  # class 2 predicted, absent from the truth
    voxel = (5.0, 0.8, 1.2)
    mm = volume_metrics({"v": pred}, {"v": truth}, 3, spacing={"v": voxel})
    assert mm["hd95_mm_class1"] == pytest.approx(math.hypot(2 * 5.0, 3 * 1.2), abs=1e-6)
    assert mm["hd95_mm_class2"] == pytest.approx(math.sqrt((4 * 5.0) ** 2 + (16 * 0.8) ** 2 + (16 * 1.2) ** 2), abs=1e-6)
    px = volume_metrics({"v": pred}, {"v": truth}, 3)
    assert px["hd95_px_class1"] == pytest.approx(math.hypot(2, 3), abs=1e-6) and "hd95_mm" not in px
    with pytest.raises(DataError, match="every volume's spacing"):
        volume_metrics({"v": pred}, {"v": truth}, 3, spacing={})


def test_nifti_pixdim_reaches_hd95_at_the_working_size(tmp_path):
    """A NIfTI volume with pixdim (0.5, 1.0, 6.0): its slices' spacing, stretched to the working size, gives the
    discs' gap in millimetres, where pixels of the working size would not."""
    shape = (128, 64)
    truth = _disc_mm(shape, SPACING, RADIUS_MM)
    pred = _disc_mm(shape, SPACING, RADIUS_MM + GAP_MM)
    affine = np.diag([SPACING[0], SPACING[1], 6.0, 1.0])
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    image = np.stack([truth.astype(np.float32) * 100 + k for k in range(3)], axis=2)
    nib.save(nib.Nifti1Image(image, affine), str(tmp_path / "images" / "p0.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([truth] * 3, axis=2), affine), str(tmp_path / "masks" / "p0.nii.gz"))
    index = index_dataset(tmp_path, group_column=None)
    working = (64, 64)  # rows halved, columns kept: working pixels are 1.0 x 1.0 mm
    cases = [load_case(ref, working, num_classes=2) for ref in index.labelled]
    geometry = cases[0].geometry
    assert geometry.pixel_spacing == pytest.approx(SPACING) and geometry.slice_spacing == pytest.approx(6.0)
    val = LabelledCases.of(cases, working)
    np.testing.assert_allclose(val.spacing, [[1.0, 1.0]] * 3)
    pred_working = np.stack([resize_mask(pred, working)] * 3)
    mm = segmentation_metrics(pred_working, val.labels, 2, spacing=val.spacing)["hd95_mm"]
    assert mm == pytest.approx(GAP_MM, abs=1.0)  # one working pixel (1 mm)
    # The stored geometry round-trips its spacing (the store keeps geometries as JSON).
    assert type(geometry).from_dict(geometry.to_dict()) == geometry


def test_meta_csv_pixel_size_gives_png_cases_a_spacing_and_a_case_without_one_keeps_the_set_in_pixels(tmp_path):
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for stem in ("a", "b"):
        Image.fromarray(np.full((40, 80), 120, np.uint8)).save(tmp_path / "images" / f"{stem}.png")
        Image.fromarray(np.ones((40, 80), np.uint8)).save(tmp_path / "masks" / f"{stem}.png")
    (tmp_path / "meta.csv").write_text("filename,group,px_mm\na.png,g0,0.1\nb.png,g1,oops\n")
    index = index_dataset(tmp_path, spacing_column="px_mm", spacing_scale=2.0)
    by_id = index.by_id()
    assert by_id["a"].spacing == pytest.approx(0.2) and by_id["b"].spacing is None
    assert any("px_mm 'oops' is not a positive number" in problem for _, problem in index.problems)
    a, b = (load_case(by_id[c], (32, 32), num_classes=2) for c in ("a", "b"))
    assert a.geometry.pixel_spacing == pytest.approx((0.2, 0.2))
    np.testing.assert_allclose(LabelledCases.of([a], (32, 32)).spacing, [[0.2 * 40 / 32, 0.2 * 80 / 32]])
    assert LabelledCases.of([a, b], (32, 32)).spacing is None
