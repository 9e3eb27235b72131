"""Dataset folders: indexing cases, loading them at the working size, and mapping masks back.

A dataset is a folder::

    root/
      images/      labelled images (PNG, JPEG, NIfTI, DICOM)
      masks/       one mask per image, same file stem (the extension may differ: a.jpg <-> a.png)
      unlabeled/   optional further images without masks
      meta.csv     optional; a ``filename`` column (image file name) and a group column (patient, exam...)

Cases of one group never end up on both sides of a split. Without a group column each file is its own group;
the slices of a 3D volume always share their file's group.
"""

from __future__ import annotations

import csv
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from caudo_ray.data.readers import (
    SUPPORTED_EXTENSIONS,
    Geometry,
    file_extension,
    file_stem,
    nifti_slice_count,
    read_image,
    read_mask,
)
from caudo_ray.errors import DataError

_SAFE_ID = re.compile(r"[A-Za-z0-9._-]+")
UNLABELLED_DIRS = ("unlabeled", "unlabelled")


def validate_case_id(case_id: str, source: str | None = None) -> str:
    """Refuse case ids that could escape a folder or break a store key.

    Allowed: letters, digits, ``.``, ``_``, ``-``; not starting with ``.``; no ``..``.

    Raises:
        DataError: naming ``source`` (the file) or the id itself.
    """
    if not isinstance(case_id, str) or not _SAFE_ID.fullmatch(case_id) or case_id.startswith(".") or ".." in case_id:
        raise DataError(
            source or repr(case_id),
            f"case id {case_id!r} is not safe: use only letters, digits, '.', '_', '-', not starting with '.' and without '..'",
        )
    return case_id


@dataclass(frozen=True)
class CaseRef:
    """A case as found on disk (nothing read yet).

    Attributes:
        case_id: file stem, plus ``__sNNNN`` for a slice of a 3D volume.
        image_path: the image file.
        mask_path: the mask file, or None for an unlabelled case.
        group: patient/exam group; cases of one group stay on one side of a split.
        slice_index: slice within a 3D volume, or None.
        labelled: whether a mask exists.
        nifti_axis: the axis a 3D volume was sliced along (meaningful with ``slice_index``).
    """

    case_id: str
    image_path: Path
    mask_path: Path | None
    group: str
    slice_index: int | None = None
    labelled: bool = False
    nifti_axis: int = 2

    def __post_init__(self) -> None:
        validate_case_id(self.case_id, str(self.image_path))


@dataclass
class DatasetIndex:
    """All cases of a dataset folder.

    Attributes:
        root: the dataset folder.
        labelled: cases with a mask, sorted by id.
        unlabelled: cases without a mask, sorted by id.
        problems: (file, problem) pairs found while indexing; those files are left out (or, for an image
            without a mask, used as unlabelled).
        group_column: the meta.csv column the groups came from, or None if each file is its own group.
        nifti_axis: the axis volumes were sliced along.
    """

    root: Path
    labelled: list[CaseRef]
    unlabelled: list[CaseRef]
    problems: list[tuple[str, str]] = field(default_factory=list)
    group_column: str | None = None
    nifti_axis: int = 2

    @property
    def cases(self) -> list[CaseRef]:
        return self.labelled + self.unlabelled

    @property
    def groups(self) -> dict[str, list[str]]:
        """Group -> case ids (labelled and unlabelled), groups and ids sorted."""
        out: dict[str, list[str]] = defaultdict(list)
        for ref in self.cases:
            out[ref.group].append(ref.case_id)
        return {g: sorted(ids) for g, ids in sorted(out.items())}

    def by_id(self) -> dict[str, CaseRef]:
        return {ref.case_id: ref for ref in self.cases}


@dataclass
class Case:
    """A case loaded at the working size.

    Attributes:
        case_id: as in :class:`CaseRef`.
        image: (H, W) float32 in [0, 1] at the working size.
        mask: (H, W) uint8 class indices at the working size, or None.
        group: the case's group.
        geometry: the source image's geometry, for :func:`restore_mask` and write-back.
    """

    case_id: str
    image: np.ndarray
    mask: np.ndarray | None
    group: str
    geometry: Geometry


def index_dataset(root: str | Path, group_column: str | None = "group", nifti_axis: int = 2) -> DatasetIndex:
    """Find the cases of a dataset folder without reading pixel data (NIfTI volumes: header only).

    Args:
        root: the dataset folder.
        group_column: meta.csv column holding the group; None or absent: each file is its own group.
        nifti_axis: axis along which 3D NIfTI volumes are cut into slices.

    Raises:
        DataError: missing ``images/`` folder, an unreadable meta.csv, or an unreadable NIfTI header. A file
            with an unsafe name, or a second file of a case id, is left out and reported in ``problems``.
    """
    root = Path(root)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DataError(str(root), "no images/ folder; a dataset folder holds images/, masks/ and optionally unlabeled/ and meta.csv")
    problems: list[tuple[str, str]] = []
    groups, used_column = _read_groups(root, group_column, problems)

    images = _list_files(images_dir, problems)
    masks = _list_files(root / "masks", problems) if (root / "masks").is_dir() else {}
    unlabelled_files: dict[str, Path] = {}
    for name in UNLABELLED_DIRS:
        if (root / name).is_dir():
            for stem, path in _list_files(root / name, problems).items():
                if _is_unique(stem, path, unlabelled_files.get(stem) or images.get(stem), problems):
                    unlabelled_files[stem] = path

    labelled: list[CaseRef] = []
    unlabelled: list[CaseRef] = []
    for stem, image_path in sorted(images.items()):
        mask_path = masks.get(stem)
        if mask_path is None:
            problems.append((str(image_path), "no mask with this stem in masks/; used as an unlabelled case"))
        if used_column is not None and stem not in groups:
            problems.append((str(image_path), "not listed in meta.csv; it is its own group"))
        group = groups.get(stem, stem)
        refs = _refs_for_file(stem, image_path, mask_path, group, nifti_axis)
        (labelled if mask_path is not None else unlabelled).extend(refs)
    for stem, mask_path in sorted(masks.items()):
        if stem not in images:
            problems.append((str(mask_path), "mask without an image in images/; ignored"))
    for stem, image_path in sorted(unlabelled_files.items()):
        group = groups.get(stem, stem)
        unlabelled.extend(_refs_for_file(stem, image_path, None, group, nifti_axis))

    return DatasetIndex(
        root=root,
        labelled=sorted(labelled, key=lambda r: r.case_id),
        unlabelled=sorted(unlabelled, key=lambda r: r.case_id),
        problems=problems,
        group_column=used_column,
        nifti_axis=nifti_axis,
    )


def load_case(
    ref: CaseRef,
    working_size: Sequence[int],
    num_classes: int | None = None,
    *,
    max_pixels: int | None = None,
    grayscale: bool = False,
) -> Case:
    """Read a case, check its mask and bring it to the working size.

    Intensities are normalised per image: clipped to the 1st-99th percentile and scaled to [0, 1] (a constant
    image gives zeros). The image is resized with antialiased bilinear filtering, the mask with nearest
    neighbour; aspect ratio is not kept (``restore_mask`` undoes the stretch exactly).

    Args:
        ref: the case.
        working_size: (H, W).
        num_classes: when given, mask values must lie in [0, num_classes).
        max_pixels: refuse larger images (``data.max_pixels``).
        grayscale: refuse colour pictures (``data.color: false``).

    Raises:
        DataError: naming the file, for unreadable files, a mask of another shape, or mask values out of range.
    """
    [(image, geometry)] = read_image(ref.image_path, nifti_axis=ref.nifti_axis, slice_index=ref.slice_index, max_pixels=max_pixels, grayscale=grayscale)
    mask = None
    if ref.mask_path is not None:
        [(mask_orig, _)] = read_mask(ref.mask_path, nifti_axis=ref.nifti_axis, slice_index=ref.slice_index)
        if mask_orig.shape != image.shape:
            raise DataError(str(ref.mask_path), f"mask shape {mask_orig.shape} does not match image shape {image.shape} ({ref.image_path.name})")
        if num_classes is not None and mask_orig.size and int(mask_orig.max()) >= num_classes:
            raise DataError(str(ref.mask_path), f"mask value {int(mask_orig.max())} out of range for {num_classes} classes (0..{num_classes - 1})")
        mask = resize_mask(mask_orig, working_size)
    image = resize_image(normalize_intensity(image), working_size)
    return Case(case_id=ref.case_id, image=image, mask=mask, group=ref.group, geometry=geometry)


def iter_cases(
    refs: Iterable[CaseRef],
    working_size: Sequence[int],
    num_classes: int | None = None,
    on_error: Callable[[CaseRef, DataError], None] | None = None,
) -> Iterator[Case]:
    """Load cases one after another.

    Args:
        refs: the cases.
        working_size: (H, W).
        num_classes: passed to :func:`load_case`.
        on_error: called with (ref, error) for each case that cannot be loaded, which is then skipped; None
            raises the first error instead.
    """
    for ref in refs:
        try:
            case = load_case(ref, working_size, num_classes)
        except DataError as exc:
            if on_error is None:
                raise
            on_error(ref, exc)
            continue
        yield case


def normalize_intensity(image: np.ndarray) -> np.ndarray:
    """Clip to the 1st-99th percentile and scale to [0, 1]; a constant image gives zeros."""
    image = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(image, [1.0, 99.0])
    if hi <= lo:
        # A mostly-constant image (tiny bright target) would be erased by the percentiles; use the full range.
        lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return ((np.clip(image, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Antialiased bilinear resize of a float image to (H, W)."""
    h, w = int(size[0]), int(size[1])
    if image.shape == (h, w):
        return image.astype(np.float32, copy=False)
    # PIL's bilinear widens its kernel when shrinking (area-like, no aliasing) and never overshoots the input range.
    out = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F").resize((w, h), Image.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def resize_mask(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a class map to (H, W)."""
    h, w = int(size[0]), int(size[1])
    if mask.shape == (h, w):
        return mask.astype(np.uint8, copy=False)
    out = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8), mode="L").resize((w, h), Image.NEAREST)
    return np.asarray(out, dtype=np.uint8)


def restore_mask(mask_working: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Bring a working-size class map back to the source image's shape (nearest neighbour)."""
    return resize_mask(np.asarray(mask_working), geometry.shape)


def check_exemplar(case: Case) -> Case:
    """Refuse an exemplar without foreground.

    Raises:
        DataError: the case has no mask, or its mask is empty at the working size.
    """
    if case.mask is None:
        raise DataError(case.case_id, "exemplar has no mask")
    if not case.mask.any():
        raise DataError(case.case_id, f"mask is empty (no foreground at the working size {case.mask.shape[0]}x{case.mask.shape[1]})")
    return case


def discover_num_classes(index: DatasetIndex, sample: int | None = None, nifti_axis: int | None = None) -> int:
    """Number of classes: the largest label over the masks + 1 (at least 2).

    Args:
        index: the dataset index.
        sample: read only this many mask files, evenly spread over the sorted list; None reads all.
        nifti_axis: axis for volume masks; defaults to the index's.

    Raises:
        DataError: no labelled cases, or an unreadable mask.
    """
    paths = sorted({ref.mask_path for ref in index.labelled if ref.mask_path is not None})
    if not paths:
        raise DataError(str(index.root), "no labelled cases (images with masks) to discover the classes from")
    if sample is not None and sample < len(paths):
        picks = np.linspace(0, len(paths) - 1, max(sample, 1)).round().astype(int)
        paths = [paths[i] for i in sorted(set(picks.tolist()))]
    axis = index.nifti_axis if nifti_axis is None else nifti_axis
    top = 0
    for path in paths:
        for mask, _ in read_mask(path, nifti_axis=axis):
            top = max(top, int(mask.max()))
    return max(top + 1, 2)


def _list_files(folder: Path, problems: list[tuple[str, str]]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_dir():
            problems.append((str(path), "sub-folder; nested folders are not read"))
            continue
        ext = file_extension(path)
        if ext not in SUPPORTED_EXTENSIONS:
            problems.append((str(path), f"unsupported extension {ext or '(none)'!r}; ignored (supported: {', '.join(SUPPORTED_EXTENSIONS)})"))
            continue
        stem = file_stem(path)
        try:
            validate_case_id(stem, str(path))
        except DataError as err:
            problems.append((err.source, f"{err.problem}; skipped"))
            continue
        if _is_unique(stem, path, found.get(stem), problems):
            found[stem] = path
    return found


def _is_unique(stem: str, path: Path, other: Path | None, problems: list[tuple[str, str]]) -> bool:
    """Whether ``path`` is the first file of its case id; a second one is reported and left out."""
    if other is None:
        return True
    problems.append((str(path), f"duplicate case id {stem!r}: also {other}; skipped, rename one of them"))
    return False


def _refs_for_file(stem: str, image_path: Path, mask_path: Path | None, group: str, nifti_axis: int) -> list[CaseRef]:
    labelled = mask_path is not None
    if file_extension(image_path) in (".nii", ".nii.gz"):
        n = nifti_slice_count(image_path, nifti_axis)
        if n is not None:
            return [CaseRef(f"{stem}__s{k:04d}", image_path, mask_path, group, k, labelled, nifti_axis) for k in range(n)]
    return [CaseRef(stem, image_path, mask_path, group, None, labelled)]


def _read_groups(root: Path, group_column: str | None, problems: list[tuple[str, str]]) -> tuple[dict[str, str], str | None]:
    meta = root / "meta.csv"
    if group_column is None or not meta.is_file():
        return {}, None
    try:
        with meta.open(newline="") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            if group_column not in columns:
                problems.append((str(meta), f"no column {group_column!r} (columns: {', '.join(columns)}); each file is its own group"))
                return {}, None
            if "filename" not in columns:
                raise DataError(str(meta), f"needs a 'filename' column naming each image file (columns: {', '.join(columns)})")
            groups: dict[str, str] = {}
            for line, row in enumerate(reader, start=2):
                name, group = (row.get("filename") or "").strip(), (row.get(group_column) or "").strip()
                if not name or not group:
                    problems.append((str(meta), f"line {line}: empty filename or {group_column}; row ignored"))
                    continue
                groups[file_stem(name)] = group
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(str(meta), f"cannot read meta.csv ({exc})") from None
    return groups, group_column
