"""Data layer: reading and writing images and masks, dataset folders, splits, phantoms and inspection."""

from caudo_ray.data.dataset import (
    SPLIT_SETS,
    Case,
    CaseRef,
    DatasetIndex,
    check_exemplar_set,
    discover_num_classes,
    index_dataset,
    load_case,
    normalize_intensity,
    read_datalist,
    resize_image,
    resize_mask,
    restore_mask,
    validate_case_id,
    volumes_of,
)
from caudo_ray.data.inspect import format_report, inspect_dataset
from caudo_ray.data.phantom import phantom_case, write_phantom_dataset
from caudo_ray.data.readers import (
    SUPPORTED_EXTENSIONS,
    Geometry,
    file_extension,
    file_stem,
    read_image,
    read_mask,
    write_mask,
    write_volume,
)
from caudo_ray.data.splits import Split, make_split

__all__ = [
    "SPLIT_SETS",
    "SUPPORTED_EXTENSIONS",
    "Case",
    "CaseRef",
    "DatasetIndex",
    "Geometry",
    "Split",
    "check_exemplar_set",
    "discover_num_classes",
    "file_extension",
    "file_stem",
    "format_report",
    "index_dataset",
    "inspect_dataset",
    "load_case",
    "make_split",
    "normalize_intensity",
    "phantom_case",
    "read_datalist",
    "read_image",
    "read_mask",
    "resize_image",
    "resize_mask",
    "restore_mask",
    "validate_case_id",
    "volumes_of",
    "write_mask",
    "write_phantom_dataset",
    "write_volume",
]
