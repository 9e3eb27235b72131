"""DICOM in, DICOM out (issue 31): a folder holding one series is one volume (position order, spacing and
orientation kept); ``predict`` writes its mask as NIfTI and as a DICOM SEG that references the series."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import assert_labels_close, tiny_config
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from caudo_ray.cli import EXIT_OK, main
from caudo_ray.data import read_image
from caudo_ray.data.dicom_series import read_dicom_series
from caudo_ray.deploy.from_run import final_segmenter
from caudo_ray.errors import DataError
from caudo_ray.run.coordinator import Coordinator
from caudo_ray.store import PseudoLabelStore
from caudo_ray.workspace import Workspace

SPACING = (0.7, 0.8)  # PixelSpacing: between rows, between columns (mm)
STEP = 2.5  # mm between slices along the normal
# An oblique stack: rows run along x, columns along y rotated 30 degrees about x; the normal leans towards -y.
ROW_DIR = np.array([1.0, 0.0, 0.0])
COL_DIR = np.array([0.0, np.cos(np.pi / 6), np.sin(np.pi / 6)])
ORIGIN = np.array([-20.0, 15.0, 40.0])
SLOPE, INTERCEPT = 2.0, -1000.0


def write_series(folder: Path, frames: np.ndarray, series_uid: str | None = None) -> list[str]:
    """Write (slices, rows, cols) stored values as one CT series, one file per slice, the files named in reverse
    position order so that a sort by name is wrong. Returns the SOP instance UIDs in position order."""
    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(ROW_DIR, COL_DIR)
    study, series, frame_of_reference = generate_uid(), series_uid or generate_uid(), generate_uid()
    uids = []
    for k, frame in enumerate(frames):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^One", "P1", "20000101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "1", "A1", ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "CT", 3, len(frames) - k, "test"
        ds.ImageOrientationPatient = [*ROW_DIR, *COL_DIR]
        ds.ImagePositionPatient = list(ORIGIN + k * STEP * normal)
        ds.PixelSpacing, ds.SliceThickness = list(SPACING), STEP
        ds.Rows, ds.Columns = frame.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
        ds.PixelData = frame.astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{len(frames) - k:04d}", enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    return uids


def _frames(clean_one_round, n: int = 4) -> np.ndarray:
    """Phantom frames as stored values (0..255 -> 500..1010), each slice a different frame."""
    cfg, _ = clean_one_round
    sources = sorted((Workspace.of(cfg).phantom_dir / "images").glob("*.png"))[:n]
    return np.stack([np.asarray(Image.open(p), dtype=np.int16) * 2 + 500 for p in sources])


def test_series_reads_as_one_volume_in_position_order_with_its_geometry(clean_one_round, tmp_path):
    frames = _frames(clean_one_round)
    write_series(tmp_path / "series", frames)
    series = read_dicom_series(tmp_path / "series")
    np.testing.assert_array_equal(series.volume, frames * SLOPE + INTERCEPT)  # position order, rescaled
    # The affine maps voxel (slice, row, col) to RAS: DICOM's LPS with x and y negated.
    lps = np.array([[-1, -1, 1]]).T * series.affine[:3]
    normal = np.cross(ROW_DIR, COL_DIR)
    for k, i, j in [(0, 0, 0), (3, 10, 20), (2, 47, 0)]:
        expected = ORIGIN + k * STEP * normal + i * SPACING[0] * COL_DIR + j * SPACING[1] * ROW_DIR
        np.testing.assert_allclose(lps @ [k, i, j, 1], expected, atol=1e-6)

    slices = read_image(tmp_path / "series")
    assert [g.slice_index for _, g in slices] == [0, 1, 2, 3] and slices[0][1].volume_shape == frames.shape
    np.testing.assert_array_equal(slices[2][0], series.volume[2])


def test_a_folder_of_two_series_is_refused_naming_it(clean_one_round, tmp_path):
    frames = _frames(clean_one_round, 2)
    write_series(tmp_path / "mixed", frames)
    write_series(tmp_path / "other", frames)
    (tmp_path / "other" / "IM0001").rename(tmp_path / "mixed" / "IMX")
    with pytest.raises(DataError, match="holds 2 series") as err:
        read_dicom_series(tmp_path / "mixed")
    assert err.value.source == str(tmp_path / "mixed")


def test_predict_writes_a_series_mask_as_nifti_and_as_dicom_seg_referencing_it(clean_one_round, tmp_path):
    cfg, _ = clean_one_round
    frames = _frames(clean_one_round)
    inputs = tmp_path / "inputs"
    uids = write_series(inputs / "ct_series", frames)
    out = tmp_path / "masks"
    assert main(["predict", "--work-dir", cfg.work_dir, "--dicom-seg", str(inputs), str(out)]) == EXIT_OK

    segmenter, _ = final_segmenter(Path(cfg.work_dir))
    expected = np.stack(segmenter.segment(list(frames * SLOPE + INTERCEPT)))
    assert expected.any(), "the phantoms' heads must be found for the frames to say anything"
    volume = nib.load(out / "ct_series.nii.gz")
    assert_labels_close(np.asarray(volume.dataobj), expected, "NIfTI volume")
    np.testing.assert_allclose(volume.affine, read_dicom_series(inputs / "ct_series").affine)

    seg = hd.seg.segread(out / "ct_series.seg.dcm")
    source_series = pydicom.dcmread(next((inputs / "ct_series").iterdir())).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source_series
    assert [s.segment_label for s in seg.SegmentSequence] == ["class_1"]
    # Each frame of segment 1 is the mask of the slice whose SOP instance it references.
    frames_by_uid = {}
    for frame, item in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        frames_by_uid[uid] = frame
    assert sorted(frames_by_uid) == sorted(uids)
    for k, uid in enumerate(uids):
        assert_labels_close(frames_by_uid[uid].astype(np.uint8), (expected[k] == 1).astype(np.uint8), f"SEG frame {k}")


def test_run_export_and_queries_take_a_series_folder_as_one_volume(clean_one_round, tmp_path, capsys):
    cfg, _ = clean_one_round
    phantoms = Workspace.of(cfg).phantom_dir
    data = tmp_path / "data"
    shutil.copytree(phantoms, data, ignore=shutil.ignore_patterns("unlabeled", "phantom.json"))
    write_series(data / "unlabeled" / "ct_series", _frames(clean_one_round))
    work = tmp_path / "run"
    run_cfg = tiny_config(work, **{"data.path": str(data), "rounds": 1, "tracking.num_overlays": 1, "tracking.model_name": None})
    result = Coordinator(run_cfg, progress=False).run()
    assert not result.skipped

    store = PseudoLabelStore.open(Workspace.of(run_cfg).store_url, mode="r")
    series_ids = [c for c in store.case_ids if c.startswith("ct_series__s")]
    assert series_ids == [f"ct_series__s{k:04d}" for k in range(4)]

    out = tmp_path / "labels"
    assert main(["export", "--work-dir", str(work), "--format", "nifti", str(out)]) == EXIT_OK
    series = read_dicom_series(data / "unlabeled" / "ct_series")
    for k in range(4):
        label = nib.load(out / f"ct_series__s{k:04d}.nii.gz")
        assert label.shape[:2] == series.volume.shape[1:]
        # The slice's label sits where the slice was: its voxel (0, 0) is slice k's first pixel.
        np.testing.assert_allclose(label.affine[:3, 3], series.affine[:3] @ [k, 0, 0, 1], atol=1e-6)

    capsys.readouterr()
    assert main(["queries", "--work-dir", str(work), "-k", "100", "--json"]) == EXIT_OK
    queried = {row["case_id"] for row in json.loads(capsys.readouterr().out)}
    assert set(series_ids) <= queried

