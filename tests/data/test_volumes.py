"""Volume membership of 2D slices (meta.csv volume / slice columns, NIfTI files) and stacking them in order."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from caudo_ray.data import CaseRef, index_dataset, volumes_of
from caudo_ray.errors import DataError


def _slices(root: Path, rows: list[tuple[str, str, str]], header: str = "filename,patient,volume,slice") -> Path:
    """One PNG slice (and mask) per (stem, volume, slice) row; meta.csv written with ``header``."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    lines = [header]
    for stem, volume, order in rows:
        Image.fromarray(img).save(root / "images" / f"{stem}.png")
        Image.fromarray(np.ones((16, 16), np.uint8)).save(root / "masks" / f"{stem}.png")
        cells = {"filename": f"{stem}.png", "patient": volume.split("_")[0], "volume": volume, "slice": order}
        lines.append(",".join(cells.get(column, "") for column in header.split(",")))
    (root / "meta.csv").write_text("\n".join(lines) + "\n")
    return root


def test_volume_columns_are_read_and_slices_ordered_numerically(tmp_path):
    rows = [(f"a_{k}", "pa_ed", str(k)) for k in (10, 2, 0, 1)] + [(f"b_{k}", "pa_es", str(k)) for k in (3, 1)]
    index = index_dataset(_slices(tmp_path, rows), group_column="patient")
    by_id = index.by_id()
    assert by_id["a_10"].volume == "pa_ed" and by_id["a_10"].slice_order == 10
    volumes = volumes_of(index.labelled)
    assert list(volumes) == ["pa_ed", "pa_es"]
    assert [r.case_id for r in volumes["pa_ed"]] == ["a_0", "a_1", "a_2", "a_10"]  # 10 after 2, not after 1
    assert [r.slice_order for r in volumes["pa_es"]] == [1, 3]
    assert index.problems == []


def test_non_integer_slice_is_a_problem_for_its_row(tmp_path):
    rows = [("a_0", "pa_ed", "0"), ("a_1", "pa_ed", "one"), ("a_2", "pa_ed", "2.0")]
    index = index_dataset(_slices(tmp_path, rows), group_column="patient")
    by_id = index.by_id()
    assert by_id["a_0"].slice_order == 0 and by_id["a_1"].volume is None and by_id["a_2"].volume is None
    problems = [p for f, p in index.problems if f == str(tmp_path / "meta.csv")]
    assert problems == [
        "line 3: slice 'one' is not an integer; no volume information for a_1.png",
        "line 4: slice '2.0' is not an integer; no volume information for a_2.png",
    ]


def test_without_volume_columns_there_is_no_volume_information(tmp_path):
    index = index_dataset(_slices(tmp_path, [("a_0", "pa_ed", "0"), ("a_1", "pa_ed", "1")], header="filename,patient"), group_column="patient")
    assert all(r.volume is None and r.slice_order is None for r in index.cases)
    assert volumes_of(index.cases) == {} and index.problems == []
    # Switched off by configuration where the columns exist.
    off = index_dataset(_slices(tmp_path / "b", [("a_0", "pa_ed", "0")]), group_column="patient", volume_column=None)
    assert off.labelled[0].volume is None
    # Only one of the two columns: said once, no volume information.
    half = index_dataset(_slices(tmp_path / "c", [("a_0", "pa_ed", "0")], header="filename,patient,volume"), group_column="patient")
    assert half.labelled[0].volume is None and any("'volume' without a 'slice' column" in p for _, p in half.problems)


def test_shared_slice_order_is_reported_and_refused_when_stacking(tmp_path):
    index = index_dataset(_slices(tmp_path, [("a_0", "pa_ed", "0"), ("a_x", "pa_ed", "0")]), group_column="patient")
    assert any("volume 'pa_ed' slice 0 is also a_0.png" in p for _, p in index.problems)
    with pytest.raises(DataError, match="pa_ed: slice order 0 is shared by a_0 and a_x"):
        volumes_of(index.labelled)


def test_nifti_volume_slices_know_their_volume(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    vol = np.random.default_rng(0).random((16, 16, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "images" / "heart.nii.gz"))
    nib.save(nib.Nifti1Image((vol > 0.5).astype(np.uint8), np.eye(4)), str(tmp_path / "masks" / "heart.nii.gz"))
    index = index_dataset(tmp_path)
    [(volume, refs)] = volumes_of(reversed(index.labelled)).items()
    assert volume == "heart" and [r.slice_order for r in refs] == list(range(12))
    assert [r.slice_index for r in refs] == list(range(12)) and refs[10].case_id == "heart__s0010"


def test_caseref_without_volume_fields_still_builds():
    ref = CaseRef("c0", Path("c0.png"), None, "g")
    assert ref.volume is None and ref.slice_order is None and volumes_of([ref]) == {}
