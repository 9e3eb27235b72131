"""A folder holding one DICOM series, read as one volume: slices ordered by position, spacing and orientation kept.

Scanners deliver a series as one file per slice, named in no useful order. The slices are ordered by their
ImagePositionPatient projected on the slice normal (the cross product of ImageOrientationPatient's row and
column directions), their stored values mapped through RescaleSlope and RescaleIntercept, and the volume's
affine (voxel index (slice, row, col) -> RAS millimetres, NIfTI's convention) built from the first slice's
position, the orientation, PixelSpacing and the step between slice positions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from caudo_ray.errors import DataError

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ORIENTATION_TOLERANCE = 1e-4  # slices whose direction cosines differ by more belong to different stacks


@dataclass(frozen=True)
class DicomSeries:
    """One series, its slices in position order.

    Attributes:
        folder: the series' folder.
        datasets: the slices' datasets, ordered along the slice normal (pixel data loaded).
        volume: (slices, rows, cols) float32, rescaled values.
        affine: 4x4 voxel index (slice, row, col) -> RAS millimetres.
    """

    folder: Path
    datasets: list[Dataset]
    volume: np.ndarray
    affine: np.ndarray

    @property
    def series_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)


def is_dicom_series_folder(path: Path) -> bool:
    """A folder whose visible entries are all files, at least one of them DICOM (checked from its preamble)."""
    path = Path(path)
    if not path.is_dir():
        return False
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    return bool(entries) and all(p.is_file() for p in entries) and any(_has_dicom_preamble(p) for p in entries)


def series_slice_count(folder: Path) -> int:
    """The slices of the series in ``folder`` without reading them: one per visible file."""
    return sum(1 for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))


def read_dicom_series_cached(folder: Path) -> DicomSeries:
    """:func:`read_dicom_series`, keeping the last series read: a run loads a series' slices one case at a time,
    and reading the whole series for each would cost its length squared in file reads."""
    folder = Path(folder).resolve()
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir() if p.is_file()))
    return _read_cached(folder, stamp)


@functools.lru_cache(maxsize=1)
def _read_cached(folder: Path, stamp: tuple) -> DicomSeries:
    # ``stamp`` (names, times, sizes) is part of the key only: a changed folder is read again.
    return read_dicom_series(folder)


def read_dicom_series(folder: Path) -> DicomSeries:
    """Read every file of ``folder`` as one series.

    Raises:
        DataError: naming the folder or file, for a file that is not DICOM or has no pixel data, slices of
            several series, of different sizes or orientations, without position or orientation, or two at the
            same position.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(str(folder), "empty folder: no DICOM series")
    datasets = []
    for path in files:
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError) as exc:
            raise DataError(str(path), f"not a DICOM file ({exc})") from None
        if "PixelData" not in ds:
            raise DataError(str(path), "DICOM file without pixel data")
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "SeriesInstanceUID"):
            if keyword not in ds:
                raise DataError(str(path), f"no {keyword}: cannot place the slice in a series")
        datasets.append(ds)
    series = {str(ds.SeriesInstanceUID) for ds in datasets}
    if len(series) != 1:
        raise DataError(str(folder), f"holds {len(series)} series ({', '.join(sorted(series))}); put each in its own folder")
    orientation = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64)
    shape = (int(datasets[0].Rows), int(datasets[0].Columns))
    for ds, path in zip(datasets, files):
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise DataError(str(path), f"slice of {ds.Rows}x{ds.Columns} in a series of {shape[0]}x{shape[1]}")
        if np.abs(np.asarray(ds.ImageOrientationPatient, dtype=np.float64) - orientation).max() > ORIENTATION_TOLERANCE:
            raise DataError(str(path), "slice orientation differs from the series'")
    row_dir, col_dir = orientation[:3], orientation[3:]  # along a row (columns increase), down a column
    normal = np.cross(row_dir, col_dir)
    positions = np.array([np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    depth = (positions @ normal)[order]
    if len(depth) > 1 and np.min(np.diff(depth)) <= 1e-6:
        raise DataError(str(folder), "two slices at the same position: not one series of distinct slices")
    datasets = [datasets[i] for i in order]
    positions = positions[order]
    volume = np.stack([_rescaled(ds, path) for ds, path in zip(datasets, [files[i] for i in order])])
    return DicomSeries(folder, datasets, volume, _affine(datasets[0], positions, normal))


def _rescaled(ds: Dataset, path: Path) -> np.ndarray:
    try:
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as exc:  # noqa: BLE001 (pydicom raises several types for undecodable pixel data)
        raise DataError(str(path), f"cannot decode pixel data ({type(exc).__name__}: {exc})") from None
    if pixels.ndim != 2:
        raise DataError(str(path), f"a series slice must be one 2D frame, got shape {pixels.shape}")
    return pixels * float(ds.get("RescaleSlope", 1.0)) + float(ds.get("RescaleIntercept", 0.0))


def _affine(first: Dataset, positions: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Voxel (slice, row, col) -> RAS: DICOM's LPS affine with its first two axes negated."""
    orientation = np.asarray(first.ImageOrientationPatient, dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in first.get("PixelSpacing", [1.0, 1.0]))
    if len(positions) > 1:
        step = (positions[-1] - positions[0]) / (len(positions) - 1)
    else:
        step = normal * float(first.get("SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = step
    lps[:3, 1] = orientation[3:] * row_spacing  # down a column: the row index grows, PixelSpacing[0] apart
    lps[:3, 2] = orientation[:3] * col_spacing  # along a row: the column index grows, PixelSpacing[1] apart
    lps[:3, 3] = positions[0]
    return _LPS_TO_RAS @ lps


def _has_dicom_preamble(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(128)
        return fh.read(4) == b"DICM"
