"""Reading each format from real files, writing masks back at the original geometry, and bad-file errors."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from caudo_ray.data import Geometry, read_image, read_mask, write_mask, write_volume
from caudo_ray.errors import DataError


def _gradient(h: int = 20, w: int = 30) -> np.ndarray:
    return ((np.arange(h)[:, None] * 7 + np.arange(w)[None, :] * 3) % 256).astype(np.uint8)


def _write_dicom(path, arr: np.ndarray) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_png_gray_keeps_pil_orientation(tmp_path):
    arr = _gradient()
    Image.fromarray(arr).save(tmp_path / "a.png")
    [(img, geom)] = read_image(tmp_path / "a.png")
    assert img.dtype == np.float32 and img.shape == (20, 30)
    np.testing.assert_array_equal(img, arr)
    assert geom.shape == (20, 30) and geom.format == "png"


def test_rgb_png_becomes_luminance(tmp_path):
    arr = _gradient()
    rgb = np.stack([arr, 255 - arr, arr // 2], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    [(img, _)] = read_image(tmp_path / "c.png")
    expected = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    assert img.shape == (20, 30)
    np.testing.assert_allclose(img, expected, atol=1e-3)


def test_jpeg_reads_and_mask_goes_to_png(tmp_path):
    arr = _gradient()
    Image.fromarray(arr).save(tmp_path / "j.jpg", quality=95)
    [(img, geom)] = read_image(tmp_path / "j.jpg")
    assert img.shape == (20, 30) and geom.format == "jpeg"
    assert np.abs(img - arr).mean() < 5  # lossy, but the same picture
    mask = (arr > 100).astype(np.uint8)
    out = write_mask(mask, geom, tmp_path / "out" / "j.jpg")
    assert out.name == "j.png"
    [(back, _)] = read_mask(out)
    np.testing.assert_array_equal(back, mask)


def test_png_mask_round_trip(tmp_path):
    mask = np.zeros((20, 30), np.uint8)
    mask[5:12, 8:20] = 1
    mask[7:9, 10:12] = 2
    Image.fromarray(mask).save(tmp_path / "m.png")
    [(read, geom)] = read_mask(tmp_path / "m.png")
    assert read.dtype == np.uint8
    out = write_mask(read, geom, tmp_path / "w.png")
    np.testing.assert_array_equal(np.asarray(Image.open(out)), mask)


def test_mask_of_a_png_source_written_as_nifti_when_asked(tmp_path):
    mask = np.zeros((20, 30), np.uint8)
    mask[5:12, 8:20] = 1
    Image.fromarray(mask).save(tmp_path / "m.png")
    [(read, geom)] = read_mask(tmp_path / "m.png")
    out = write_mask(read, geom, tmp_path / "w.nii.gz")
    assert out.name == "w.nii.gz"
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), mask)


def test_nifti_2d_round_trip_keeps_affine(tmp_path):
    data = np.random.default_rng(0).random((16, 24, 1)).astype(np.float32)
    affine = np.diag([0.5, 0.7, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "s.nii.gz"))
    [(img, geom)] = read_image(tmp_path / "s.nii.gz")
    assert img.shape == (16, 24) and not geom.is_volume_slice
    np.testing.assert_allclose(img, data[..., 0])
    mask = (img > 0.5).astype(np.uint8)
    out = write_mask(mask, geom, tmp_path / "s_mask.nii.gz")
    back = nib.load(str(out))
    assert back.shape == (16, 24, 1)
    np.testing.assert_allclose(back.affine, affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj)[..., 0], mask)


def test_nifti_3d_slices_and_volume_write_back(tmp_path):
    vol = np.random.default_rng(1).random((12, 10, 9)).astype(np.float32)
    affine = np.array([[0, -1.5, 0, 10], [2.0, 0, 0, -4], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(vol, affine), str(tmp_path / "v.nii.gz"))
    slices = read_image(tmp_path / "v.nii.gz", nifti_axis=2)
    assert len(slices) == 9
    for k, (img, geom) in enumerate(slices):
        np.testing.assert_allclose(img, vol[:, :, k])
        assert geom.slice_index == k and geom.axis == 2 and geom.volume_shape == (12, 10, 9)
    [(only, _)] = read_image(tmp_path / "v.nii.gz", slice_index=3)
    np.testing.assert_allclose(only, vol[:, :, 3])
    along0 = read_image(tmp_path / "v.nii.gz", nifti_axis=0)
    assert len(along0) == 12 and along0[0][0].shape == (10, 9)
    np.testing.assert_allclose(along0[4][0], vol[4])

    masks = [(img > 0.5).astype(np.uint8) for img, _ in slices]
    geom = Geometry.from_dict(json.loads(json.dumps(slices[0][1].to_dict())))  # as stored in the Zarr store
    out = write_volume(masks, geom, tmp_path / "v_mask.nii.gz")
    back = nib.load(str(out))
    np.testing.assert_allclose(back.affine, affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.stack(masks, axis=2))

    # A single slice written alone keeps its world position.
    single = write_mask(masks[3], slices[3][1], tmp_path / "v_s3.nii.gz")
    img3 = nib.load(str(single))
    np.testing.assert_allclose(img3.affine @ [2, 4, 0, 1], affine @ [2, 4, 3, 1])
    with pytest.raises(DataError, match="exactly 9 slices"):
        write_volume(masks[:4], geom, tmp_path / "short.nii.gz")


def test_dicom_reads_rows_cols_and_writes_png(tmp_path):
    arr = (np.arange(20 * 30).reshape(20, 30) * 3).astype(np.uint16)
    _write_dicom(tmp_path / "d.dcm", arr)
    [(img, geom)] = read_image(tmp_path / "d.dcm")
    np.testing.assert_array_equal(img, arr)
    assert geom.format == "dicom"
    out = write_mask((arr > 500).astype(np.uint8), geom, tmp_path / "d.dcm.out" / "d.dcm")
    assert out.suffix == ".png"


def test_geometry_json_round_trip():
    geom = Geometry((4, 5), "nifti", "/x/v.nii", 2, 1, (4, 3, 5), tuple(tuple(float(i == j) for j in range(4)) for i in range(4)))
    assert Geometry.from_dict(json.loads(json.dumps(geom.to_dict()))) == geom


def test_truncated_png(tmp_path):
    Image.fromarray(_gradient(64, 64)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t.png"):
        read_image(tmp_path / "t.png")


def test_text_file_named_png(tmp_path):
    (tmp_path / "note.png").write_text("not an image")
    with pytest.raises(DataError, match="note.png"):
        read_image(tmp_path / "note.png")


def test_unsupported_extension(tmp_path):
    (tmp_path / "scan.bmp").write_bytes(b"BM")
    with pytest.raises(DataError, match="scan.bmp.*unsupported extension"):
        read_image(tmp_path / "scan.bmp")


def test_nan_intensities_in_nifti(tmp_path):
    data = np.ones((16, 16), np.float32)
    data[3, 4] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "nan.nii"))
    with pytest.raises(DataError, match="nan.nii.*NaN"):
        read_image(tmp_path / "nan.nii")


def test_tiny_images_refused(tmp_path):
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(tmp_path / "dot.png")
    with pytest.raises(DataError, match="dot.png.*1x1"):
        read_image(tmp_path / "dot.png")
    Image.fromarray(np.zeros((4, 40), np.uint8)).save(tmp_path / "strip.png")
    with pytest.raises(DataError, match="strip.png"):
        read_image(tmp_path / "strip.png")


def test_mask_refuses_non_integer_values(tmp_path):
    data = np.zeros((16, 16), np.float32)
    data[2, 2] = 0.5
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "soft.nii.gz"))
    with pytest.raises(DataError, match="soft.nii.gz.*non-integer"):
        read_mask(tmp_path / "soft.nii.gz")


def test_write_mask_refuses_wrong_shape(tmp_path):
    geom = Geometry((20, 30), "png", "src.png")
    with pytest.raises(DataError, match="src.png.*does not match"):
        write_mask(np.zeros((30, 20), np.uint8), geom, tmp_path / "m.png")
