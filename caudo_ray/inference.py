"""Segment a folder of images with a finished run's final model, writing masks in each input's format and size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from caudo_ray import data as D
from caudo_ray.data.dicom_seg import write_dicom_seg
from caudo_ray.data.dicom_series import is_dicom_series_folder, read_dicom_series_cached
from caudo_ray.data.readers import file_format
from caudo_ray.deploy.from_run import final_segmenter
from caudo_ray.errors import DataError


def predict_folder(
    work_dir: Path, inputs: Path, output: Path, *, progress: bool = True, dicom_seg: bool = False
) -> tuple[list[Path], dict[str, str]]:
    """Write one mask per input file under ``output`` with the input's name, format and geometry.

    A 3D NIfTI volume is segmented slice by slice and written back as one volume with the input's affine. A
    subfolder holding one DICOM series is segmented as one volume and written as ``<folder>.nii.gz`` with the
    series' spacing and orientation and, with ``dicom_seg``, also as ``<folder>.seg.dcm``, a DICOM Segmentation
    object referencing the series. Unreadable files are skipped and reported, the rest proceed.

    Returns:
        (paths written, {file: reason} of the skipped inputs).
    """
    segmenter, cfg = final_segmenter(Path(work_dir))
    files = sorted(
        p for p in Path(inputs).iterdir() if not p.name.startswith(".") and (p.is_file() or is_dicom_series_folder(p))
    )
    written: list[Path] = []
    skipped: dict[str, str] = {}
    for path in tqdm(files, desc="predicting", unit="file", disable=not progress):
        try:
            if path.is_file():
                file_format(path)
            slices = D.read_image(path, nifti_axis=cfg.data.nifti_axis)
        except DataError as err:
            skipped[str(path)] = err.problem
            continue
        restored = segmenter.segment([img for img, _ in slices])
        out = output / path.name
        if path.is_dir():
            written.append(D.write_volume(restored, slices[0][1], output / f"{path.name}.nii.gz"))
            if dicom_seg:
                # The datasets highdicom copies patient, study and frame of reference from (the series just read).
                series = read_dicom_series_cached(path)
                written.append(write_dicom_seg(series, np.stack(restored), segmenter.spec.label_names, output / f"{path.name}.seg.dcm"))
        elif slices[0][1].is_volume_slice:
            written.append(D.write_volume(restored, slices[0][1], out))
        else:
            written.append(D.write_mask(restored[0], slices[0][1], out))
    return written, skipped
