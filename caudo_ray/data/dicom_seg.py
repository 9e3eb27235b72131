"""A label volume of a DICOM series written as a DICOM Segmentation object (highdicom) referencing that series.

One segment per foreground class, named by the run's label names; frame ``k`` of a segment refers to the
series' ``k``-th slice in position order, so a viewer overlays it on the slice it was predicted from.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import version as package_version
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from caudo_ray.data.dicom_series import DicomSeries
from caudo_ray.errors import DataError

SOFTWARE = "caudo-ray"


def write_dicom_seg(series: DicomSeries, labels: np.ndarray, label_names: Sequence[str], out_path: Path) -> Path:
    """Write ``labels`` as a binary DICOM SEG of ``series``.

    Args:
        series: the source series, slices in position order.
        labels: (slices, rows, cols) class indices of the series' slices, in the same order.
        label_names: one name per class, background first; class ``c`` becomes segment ``c``.
        out_path: the file to write.

    Returns:
        ``out_path``.

    Raises:
        DataError: naming the series' folder, when the labels do not have the series' shape or hold classes
            the label names do not name.
    """
    labels = np.asarray(labels)
    if labels.shape != series.volume.shape:
        raise DataError(str(series.folder), f"labels of shape {labels.shape} for a series of shape {series.volume.shape}")
    if labels.size and int(labels.max()) >= len(label_names):
        raise DataError(str(series.folder), f"class {int(labels.max())} has no label name ({len(label_names)} names)")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=SOFTWARE, family=codes.cid7162.ArtificialIntelligence, version=package_version("caudo-ray")
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=c,
            segment_label=name,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for c, name in enumerate(label_names)
        if c > 0
    ]
    seg = hd.seg.Segmentation(
        source_images=series.datasets,
        pixel_array=labels.astype(np.uint8),  # a label map: value c marks segment c's pixels
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=int(series.datasets[0].get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=SOFTWARE,
        manufacturer_model_name=SOFTWARE,
        software_versions=package_version("caudo-ray"),
        device_serial_number="0",
        omit_empty_frames=False,  # every slice keeps its frame, so frame k of a segment is slice k
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out_path)
    return out_path
