"""Indexing dataset folders, loading cases at the working size, and the errors bad folders give."""

from __future__ import annotations

import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from caudo_ray.data import (
    CaseRef,
    check_exemplar_set,
    discover_num_classes,
    format_report,
    index_dataset,
    inspect_dataset,
    load_case,
    normalize_intensity,
    restore_mask,
    validate_case_id,
)
from caudo_ray.errors import DataError

HC18 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "hc18"


def _image(seed: int, shape=(40, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _mask(shape=(40, 48), value: int = 1) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[10:25, 12:30] = value
    return m


def _dataset(root: Path, n: int = 4, meta: bool = True) -> Path:
    for sub in ("images", "masks", "unlabeled"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rows = ["filename,patient"]
    for i in range(n):
        Image.fromarray(_image(i)).save(root / "images" / f"c{i}.png")
        Image.fromarray(_mask()).save(root / "masks" / f"c{i}.png")
        rows.append(f"c{i}.png,p{i // 2}")
    for i in range(2):
        Image.fromarray(_image(100 + i)).save(root / "unlabeled" / f"u{i}.png")
    if meta:
        (root / "meta.csv").write_text("\n".join(rows) + "\n")
    return root


def test_index_groups_from_meta_column(tmp_path):
    index = index_dataset(_dataset(tmp_path), group_column="patient")
    assert [r.case_id for r in index.labelled] == ["c0", "c1", "c2", "c3"]
    assert [r.case_id for r in index.unlabelled] == ["u0", "u1"]
    assert index.groups["p0"] == ["c0", "c1"] and index.groups["p1"] == ["c2", "c3"]
    assert index.groups["u0"] == ["u0"]  # not in meta.csv: its own group
    assert index.problems == []


def test_without_group_column_each_file_is_its_own_group(tmp_path):
    index = index_dataset(_dataset(tmp_path, meta=False), group_column="patient")
    assert len(index.groups) == 6 and index.group_column is None
    index = index_dataset(_dataset(tmp_path / "b"), group_column="site")
    assert len(index.groups) == 6
    assert any("no column 'site'" in p for _, p in index.problems)


def test_problems_are_reported_not_fatal(tmp_path):
    root = _dataset(tmp_path)
    Image.fromarray(_image(9)).save(root / "images" / "nomask.png")
    Image.fromarray(_mask()).save(root / "masks" / "orphan.png")
    (root / "images" / "notes.txt").write_text("x")
    index = index_dataset(root, group_column="patient")
    problems = {(f, p.split(";")[0]) for f, p in index.problems}
    assert (str(root / "images" / "nomask.png"), "no mask with this stem in masks/") in problems
    assert (str(root / "images" / "nomask.png"), "not listed in meta.csv") in problems
    assert (str(root / "masks" / "orphan.png"), "mask without an image in images/") in problems
    assert any(f == str(root / "images" / "notes.txt") and "unsupported extension" in p for f, p in problems)
    assert "nomask" in [r.case_id for r in index.unlabelled]


def test_mask_extension_may_differ(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(_image(0)).save(tmp_path / "images" / "a.jpg", quality=95)
    Image.fromarray(_mask()).save(tmp_path / "masks" / "a.png")
    [ref] = index_dataset(tmp_path).labelled
    case = load_case(ref, (32, 32), num_classes=2)
    assert case.mask is not None and case.mask.shape == (32, 32)


def test_load_case_normalises_resizes_and_restores(tmp_path):
    index = index_dataset(_dataset(tmp_path), group_column="patient")
    case = load_case(index.labelled[0], (32, 16), num_classes=2)
    assert case.image.shape == (32, 16) and case.image.dtype == np.float32
    assert 0.0 <= case.image.min() and case.image.max() <= 1.0
    assert case.mask.dtype == np.uint8 and set(np.unique(case.mask)) == {0, 1}
    restored = restore_mask(case.mask, case.geometry)
    assert restored.shape == (40, 48)
    assert (restored == _mask()).mean() > 0.95
    assert case.group == "p0"


def test_normalisation_of_constant_image_is_zeros():
    out = normalize_intensity(np.full((16, 16), 7.0))
    assert np.all(out == 0) and not np.isnan(out).any()
    spot = np.zeros((32, 32))
    spot[3, 3] = 5.0  # fewer than 1% of pixels: percentiles would erase it
    assert normalize_intensity(spot).max() == 1.0


def test_mask_shape_mismatch(tmp_path):
    root = _dataset(tmp_path)
    Image.fromarray(_mask((30, 48))).save(root / "masks" / "c1.png")
    ref = next(r for r in index_dataset(root).labelled if r.case_id == "c1")
    with pytest.raises(DataError, match=r"masks/c1.png.*does not match"):
        load_case(ref, (32, 32))


def test_mask_value_out_of_classes(tmp_path):
    root = _dataset(tmp_path)
    Image.fromarray(_mask(value=3)).save(root / "masks" / "c2.png")
    ref = next(r for r in index_dataset(root).labelled if r.case_id == "c2")
    with pytest.raises(DataError, match=r"masks/c2.png.*value 3 out of range for 2 classes"):
        load_case(ref, (32, 32), num_classes=2)
    assert discover_num_classes(index_dataset(root)) == 4


def test_empty_exemplar_mask(tmp_path):
    root = _dataset(tmp_path)
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(root / "masks" / "c0.png")
    case = load_case(index_dataset(root).labelled[0], (32, 32))
    with pytest.raises(DataError, match="every mask of the labelled set .1 cases. is empty") as err:
        check_exemplar_set([case])
    assert err.value.source == "c0"


def _problem(index, name: str) -> str:
    reasons = [reason for source, reason in index.problems if Path(source).name == name]
    assert len(reasons) == 1, index.problems
    return reasons[0]


def test_duplicate_case_ids_name_both_files_and_keep_the_first(tmp_path):
    root = _dataset(tmp_path)
    Image.fromarray(_image(5)).save(root / "images" / "c0.jpg")
    index = index_dataset(root)
    assert re.search(r"duplicate case id 'c0': also \S*c0\.jpg; skipped", _problem(index, "c0.png"))
    assert [r.image_path.name for r in index.labelled if r.case_id == "c0"] == ["c0.jpg"]
    # A labelled case's id reused in unlabeled/: the unlabelled file is the one left out.
    root2 = _dataset(tmp_path / "two")
    Image.fromarray(_image(5)).save(root2 / "unlabeled" / "c1.png")
    index2 = index_dataset(root2)
    assert "duplicate case id 'c1'" in _problem(index2, "c1.png")
    assert [r.case_id for r in index2.cases if r.case_id == "c1"] == ["c1"] and "c1" not in {r.case_id for r in index2.unlabelled}


@pytest.mark.parametrize("name", ["..evil.png", "has space.png", ".hidden.png", "a..b.png"])
def test_unsafe_file_names_are_reported_and_left_out(tmp_path, name):
    root = _dataset(tmp_path)
    before = {r.case_id for r in index_dataset(root).cases}
    Image.fromarray(_image(7)).save(root / "unlabeled" / name)
    index = index_dataset(root)
    assert "not safe" in _problem(index, name) and "skipped" in _problem(index, name)
    assert {r.case_id for r in index.cases} == before


@pytest.mark.parametrize("case_id", ["../x", "a/b", "..evil", "", "x y", "a\\b"])
def test_unsafe_case_ids(case_id):
    with pytest.raises(DataError, match="not safe"):
        validate_case_id(case_id)
    with pytest.raises(DataError):
        CaseRef(case_id, Path("img.png"), None, "g")


def test_a_truncated_file_fails_alone_naming_itself(tmp_path):
    root = _dataset(tmp_path)
    (root / "unlabeled" / "u0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    index = index_dataset(root)
    by_id = index.by_id()
    with pytest.raises(DataError, match="u0.png") as err:
        load_case(by_id["u0"], (32, 32))
    assert err.value.source == str(root / "unlabeled" / "u0.png")
    assert [load_case(by_id[c], (32, 32)).case_id for c in ("u1", "c0", "c1", "c2", "c3")] == ["u1", "c0", "c1", "c2", "c3"]


def test_nifti_volume_cases_share_the_file_group(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    vol = np.random.default_rng(0).random((20, 24, 9)).astype(np.float32)
    lab = np.zeros((20, 24, 9), np.uint8)
    lab[5:15, 6:18, :] = 1
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "images" / "vol.nii.gz"))
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(tmp_path / "masks" / "vol.nii.gz"))
    index = index_dataset(tmp_path)
    assert [r.case_id for r in index.labelled] == [f"vol__s{k:04d}" for k in range(9)]
    assert {r.group for r in index.labelled} == {"vol"}
    case = load_case(index.labelled[1], (16, 16), num_classes=2)
    assert case.geometry.slice_index == 1 and case.mask.any()
    across = index_dataset(tmp_path, nifti_axis=0)
    assert len(across.labelled) == 20
    case = load_case(across.labelled[7], (16, 16), num_classes=2)
    assert case.geometry.axis == 0 and case.geometry.shape == (24, 9) and case.case_id == "vol__s0007"


def test_inspect_reports_counts_classes_groups(tmp_path):
    report = inspect_dataset(_dataset(tmp_path), group_column="patient", progress=False)
    assert report["labelled"] == 4 and report["unlabelled"] == 2
    assert report["num_classes"] == 2 and set(report["classes"]) == {"0", "1"}
    assert report["image_sizes"] == [[[40, 48], 6]]
    assert report["groups"]["count"] == 4 and report["groups"]["labelled_count"] == 2
    text = format_report(report)
    assert "4 labelled, 2 unlabelled" in text and "'patient'" in text


@pytest.mark.skipif(not HC18.is_dir(), reason="shared HC18 data not present")
def test_hc18_smoke():
    start = time.perf_counter()
    index = index_dataset(HC18, group_column="exam_id")
    # Indexing reads headers, not pixels: about a second here. The bound catches reading every image, not speed.
    assert time.perf_counter() - start < 30.0
    assert len(index.labelled) == 999 and len(index.unlabelled) == 335
    assert index.group_column == "exam_id" and index.problems == []
    by_id = index.by_id()
    assert by_id["010_HC"].group == by_id["010_2HC"].group
    assert len({r.group for r in index.labelled}) < 999
    assert discover_num_classes(index, sample=20) == 2
    [case] = check_exemplar_set([load_case(by_id["010_HC"], (64, 64), num_classes=2)])
    assert case.geometry.shape == (270, 400)
