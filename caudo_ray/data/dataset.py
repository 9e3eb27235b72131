"""Dataset folders: indexing cases, loading them at the working size, and mapping masks back.

A dataset is a folder::

    root/
      images/      labelled images (PNG, JPEG, NIfTI, DICOM)
      masks/       one mask per image, same file stem (the extension may differ: a.jpg <-> a.png)
      unlabeled/   optional further images without masks
      meta.csv     optional; a ``filename`` column (image file name) and a group column (patient, exam...);
                   optionally a split column (train / val / test) and volume + slice-order columns

Cases of one group never end up on both sides of a split. Without a group column each file is its own group;
the slices of a 3D volume always share their file's group.

A predefined split (the one a benchmark's published tables use) comes from meta.csv's split column or from a
Medical Segmentation Decathlon datalist JSON (:func:`read_datalist`); it is checked entry by entry while
indexing, so a split naming a file the folder lacks is refused before any work.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from caudo_ray.data.dicom_series import is_dicom_series_folder, series_slice_count
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
from caudo_ray.transforms.preprocess import normalize_intensity, resize_image, resize_mask

_SAFE_ID = re.compile(r"[A-Za-z0-9._-]+")
UNLABELLED_DIRS = ("unlabeled", "unlabelled")
SPLIT_SETS = ("train", "val", "test")
# Values a meta.csv split column may hold (compared lower-cased); the MSD datalist spells its sets the long way.
_SPLIT_VALUES = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "test", "testing": "test"}
DATALIST_KEYS = {"train": "training", "val": "validation", "test": "test"}


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
        volume: the 3D volume this 2D slice belongs to (a NIfTI file's stem, or meta.csv's volume column), or
            None when unknown.
        slice_order: the slice's position within ``volume`` (stacking order), or None.
        spacing: millimetres per pixel of the image file from meta.csv's spacing column, or None; used where the
            file itself carries no spacing (PNG, JPEG).
    """

    case_id: str
    image_path: Path
    mask_path: Path | None
    group: str
    slice_index: int | None = None
    labelled: bool = False
    nifti_axis: int = 2
    volume: str | None = None
    slice_order: int | None = None
    spacing: float | None = None

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
        predefined: case id -> ``'train'``, ``'val'`` or ``'test'`` from a predefined split (meta.csv's split
            column or a datalist); None when the split is to be drawn by seed. Cases it does not name are
            either unlabelled (they join the pool) or left out of every set (reported in ``problems``).
        split_source: the file the predefined split came from (meta.csv or the datalist), or None.
    """

    root: Path
    labelled: list[CaseRef]
    unlabelled: list[CaseRef]
    problems: list[tuple[str, str]] = field(default_factory=list)
    group_column: str | None = None
    nifti_axis: int = 2
    predefined: dict[str, str] | None = None
    split_source: str | None = None

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

    def predefined_counts(self) -> dict[str, int] | None:
        """Labelled cases per predefined set (``train``, ``val``, ``test``, ``none`` for those left out); None without one."""
        if self.predefined is None:
            return None
        counts = dict.fromkeys((*SPLIT_SETS, "none"), 0)
        for ref in self.labelled:
            counts[self.predefined.get(ref.case_id, "none")] += 1
        return counts


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


@dataclass(frozen=True)
class LabelledCases:
    """Labelled cases at the working size, stacked: what validation and test scoring take.

    Attributes:
        images: (N, H, W) float32 in [0, 1].
        labels: (N, H, W) uint8 class indices.
        spacing: (N, 2) millimetres per working-size pixel (rows, cols), each case's source spacing stretched by
            its resize (:meth:`Geometry.spacing_at`); None unless every case has a spacing, so that HD95 over the
            set is in one unit (millimetres, or pixels of the working size).
    """

    images: np.ndarray
    labels: np.ndarray
    spacing: np.ndarray | None = None

    @classmethod
    def of(cls, cases: Sequence[Case], working_size: Sequence[int]) -> LabelledCases:
        """Stack loaded cases (each with a mask); an empty sequence gives empty (0, H, W) arrays."""
        h, w = working_size
        if not cases:
            return cls(np.zeros((0, h, w), np.float32), np.zeros((0, h, w), np.uint8))
        spacings = [case.geometry.spacing_at((h, w)) for case in cases]
        spacing = None if any(s is None for s in spacings) else np.array(spacings, dtype=np.float64)
        return cls(np.stack([c.image for c in cases]), np.stack([c.mask for c in cases]), spacing)

    def __len__(self) -> int:
        return len(self.images)


def index_dataset(
    root: str | Path,
    group_column: str | None = "group",
    nifti_axis: int = 2,
    *,
    split_column: str | None = None,
    datalist: str | Path | None = None,
    volume_column: str | None = "volume",
    slice_column: str | None = "slice",
    spacing_column: str | None = None,
    spacing_scale: float = 1.0,
) -> DatasetIndex:
    """Find the cases of a dataset folder without reading pixel data (NIfTI volumes: header only).

    A predefined split is taken from ``datalist`` when given, else from meta.csv's ``split_column`` when meta.csv
    has that column; otherwise ``predefined`` stays None and :func:`~caudo_ray.data.splits.make_split` draws the
    split by seed. Every entry of a predefined split must name a case of the folder, no case may be named in two
    sets, and validation and test cases must have a mask; labelled cases it does not name are left out of every
    set (reported in ``problems``), unlabelled ones join the pool as always.

    Args:
        root: the dataset folder.
        group_column: meta.csv column holding the group; None or absent: each file is its own group.
        nifti_axis: axis along which 3D NIfTI volumes are cut into slices.
        split_column: meta.csv column naming each file's set (``train``/``training``, ``val``/``validation``,
            ``test``, any case; an empty cell names no set); None (the default, so that callers indexing a folder
            for prediction never meet a split) or absent: no predefined split from meta.csv. Runs pass
            ``split.column`` (``"split"`` by default).
        datalist: a Decathlon-style datalist JSON (relative paths are resolved against ``root``); its
            ``training``, ``validation`` and ``test`` lists define the split, in place of the split column.
            Entries are matched to cases by the image file's stem (the folder they name does not matter).
        volume_column: meta.csv column naming the 3D volume a 2D slice file belongs to.
        slice_column: meta.csv column holding the slice's (integer) position in its volume. Volume information
            is read only when both columns are present; NIfTI volumes get it from the file (stem, slice index).
        spacing_column: meta.csv column holding each file's pixel size in millimetres (square pixels), for
            files that carry none themselves (PNG, JPEG); HD95 is then reported in millimetres.
        spacing_scale: factor applied to ``spacing_column``'s values, for a column that gives the pixel size of
            another resolution than the files' (HC18's is at full resolution, its files at half: 2).

    Raises:
        DataError: missing ``images/`` folder, an unreadable meta.csv, an unreadable NIfTI header, or a
            predefined split entry that is malformed or names no case of the folder (naming meta.csv and its
            line, or the datalist and its entry). A file with an unsafe name, or a second file of a case id, is
            left out and reported in ``problems``.
    """
    root = Path(root)
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DataError(str(root), "no images/ folder; a dataset folder holds images/, masks/ and optionally unlabeled/ and meta.csv")
    problems: list[tuple[str, str]] = []
    # A datalist replaces the split column, so the column is not even read (nor its values checked).
    meta = _read_meta(root, group_column, None if datalist is not None else split_column, volume_column, slice_column, problems, spacing_column)
    groups, used_column = meta.groups, meta.group_column

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
    by_stem: dict[str, list[CaseRef]] = {}
    for stem, image_path in sorted(images.items()):
        mask_path = masks.get(stem)
        if mask_path is None:
            problems.append((str(image_path), "no mask with this stem in masks/; used as an unlabelled case"))
        if used_column is not None and stem not in groups:
            problems.append((str(image_path), "not listed in meta.csv; it is its own group"))
        group = groups.get(stem, stem)
        refs = _refs_for_file(stem, image_path, mask_path, group, nifti_axis, meta.volumes.get(stem), _scaled(meta.spacings.get(stem), spacing_scale))
        by_stem[stem] = refs
        (labelled if mask_path is not None else unlabelled).extend(refs)
    for stem, mask_path in sorted(masks.items()):
        if stem not in images:
            problems.append((str(mask_path), "mask without an image in images/; ignored"))
    for stem, image_path in sorted(unlabelled_files.items()):
        group = groups.get(stem, stem)
        refs = _refs_for_file(stem, image_path, None, group, nifti_axis, meta.volumes.get(stem), _scaled(meta.spacings.get(stem), spacing_scale))
        by_stem[stem] = refs
        unlabelled.extend(refs)
    _check_volumes(labelled + unlabelled, problems)

    predefined: dict[str, str] | None = None
    split_source: str | None = None
    if datalist is not None:
        path = Path(datalist) if Path(datalist).is_absolute() else root / datalist
        sets = read_datalist(path)
        entries = [
            (f"{DATALIST_KEYS[role]}[{i}] ({image})", file_stem(image), role) for role in SPLIT_SETS for i, image in enumerate(sets[role])
        ]
        split_source = str(path)
        predefined = _assign_predefined(entries, by_stem, split_source, problems)
    elif meta.split_column is not None:
        entries = [(f"line {line}: {name}", file_stem(name), role) for name, line, role in meta.splits]
        split_source = str(root / "meta.csv")
        predefined = _assign_predefined(entries, by_stem, split_source, problems, f"meta.csv column {meta.split_column!r}")

    return DatasetIndex(
        root=root,
        labelled=sorted(labelled, key=lambda r: r.case_id),
        unlabelled=sorted(unlabelled, key=lambda r: r.case_id),
        problems=problems,
        group_column=used_column,
        nifti_axis=nifti_axis,
        predefined=predefined,
        split_source=split_source,
    )


def read_datalist(path: str | Path) -> dict[str, list[str]]:
    """Read a Medical Segmentation Decathlon datalist JSON with MONAI's ``load_decathlon_datalist``.

    The file holds ``training`` and ``validation`` lists of ``{"image": ..., "label": ...}`` entries and a
    ``test`` list of entries or plain image paths; other keys (name, labels, numTraining...) are ignored, and a
    list may be absent.

    Args:
        path: the JSON file.

    Returns:
        ``{'train': [...], 'val': [...], 'test': [...]}``: each set's image paths, resolved against the
        datalist's folder as MONAI does; an absent list gives an empty one.

    Raises:
        DataError: naming the file: missing, not JSON, none of the three lists, or an entry without a single
            image path (naming the entry, e.g. ``training[3]``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "datalist file does not exist")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(str(path), f"not a readable JSON datalist ({exc})") from None
    if not isinstance(raw, dict) or not any(key in raw for key in DATALIST_KEYS.values()):
        raise DataError(str(path), "a datalist is a JSON object with 'training', 'validation' and/or 'test' lists")
    # MONAI (and torch under it) is imported only when a datalist is used: indexing stays light otherwise.
    from monai.data import load_decathlon_datalist

    out: dict[str, list[str]] = {role: [] for role in SPLIT_SETS}
    for role, key in DATALIST_KEYS.items():
        if key not in raw:
            continue
        if not isinstance(raw[key], list):
            raise DataError(str(path), f"{key!r} must be a list of entries, got {type(raw[key]).__name__}")
        if not raw[key]:
            continue  # MONAI's loader looks at the first test entry, which an empty list lacks
        try:
            items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key)
        except (TypeError, ValueError, KeyError) as exc:
            raise DataError(str(path), f"{key!r}: not a Decathlon datalist list ({exc})") from None
        for i, item in enumerate(items):
            image = item.get("image")
            if not isinstance(image, str) or not image:
                raise DataError(str(path), f"{key}[{i}]: needs one 'image' path, got {image!r} (multi-file images are not supported)")
            out[role].append(image)
    return out


def volumes_of(refs: Iterable[CaseRef]) -> dict[str, list[CaseRef]]:
    """Group 2D slices into their 3D volumes, for metrics computed per volume.

    Args:
        refs: cases; those without a ``volume`` are left out.

    Returns:
        Volume id -> its slices sorted by ``slice_order`` (numerically), volumes sorted by id.

    Raises:
        DataError: naming the volume, when two of its slices share a slice order or one has none (the stack
            would be ambiguous).
    """
    out: dict[str, list[CaseRef]] = defaultdict(list)
    for ref in refs:
        if ref.volume is not None:
            out[ref.volume].append(ref)
    for volume, slices in out.items():
        if any(ref.slice_order is None for ref in slices):
            missing = [ref.case_id for ref in slices if ref.slice_order is None]
            raise DataError(volume, f"slices without a slice order: {', '.join(missing)}")
        slices.sort(key=lambda ref: ref.slice_order)
        for a, b in itertools.pairwise(slices):
            if a.slice_order == b.slice_order:
                raise DataError(volume, f"slice order {a.slice_order} is shared by {a.case_id} and {b.case_id}")
    return {volume: out[volume] for volume in sorted(out)}


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
    if geometry.pixel_spacing is None and ref.spacing is not None:
        geometry = dataclasses.replace(geometry, pixel_spacing=(ref.spacing, ref.spacing))
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


def restore_mask(mask_working: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Bring a working-size class map back to the source image's shape (nearest neighbour)."""
    return resize_mask(np.asarray(mask_working), geometry.shape)


def check_exemplar_set(cases: Sequence[Case]) -> list[Case]:
    """Refuse a labelled set that holds no foreground at all.

    A labelled set given by group (every slice of a patient) holds slices whose mask is empty (the apex or base
    of a heart): these are valid labelled negatives and are kept. Only a set in which every mask is empty is
    refused, since it cannot show the segmenter the target. A single exemplar (K = 1 slice) must therefore hold
    foreground.

    Raises:
        DataError: the set is empty, a case has no mask (naming it), or every mask is empty at the working size
            (naming the case ids).
    """
    cases = list(cases)
    if not cases:
        raise DataError("split.exemplars", "the labelled set is empty")
    for case in cases:
        if case.mask is None:
            raise DataError(case.case_id, "exemplar has no mask")
    if not any(case.mask.any() for case in cases):
        ids = [case.case_id for case in cases]
        named = ", ".join(ids[:8]) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
        shape = cases[0].mask.shape
        raise DataError(named, f"every mask of the labelled set ({len(ids)} cases) is empty (no foreground at the working size {shape[0]}x{shape[1]})")
    return cases


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
        if path.is_dir() and not path.name.startswith(".") and is_dicom_series_folder(path):
            # A DICOM series: the folder is one volume, its name the case id's stem.
            try:
                validate_case_id(path.name, str(path))
            except DataError as err:
                problems.append((err.source, f"{err.problem}; skipped"))
                continue
            if _is_unique(path.name, path, found.get(path.name), problems):
                found[path.name] = path
            continue
        if path.is_dir():
            problems.append((str(path), "sub-folder that is not a DICOM series; not read"))
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


def _scaled(spacing: float | None, scale: float) -> float | None:
    return None if spacing is None else spacing * scale


def _refs_for_file(
    stem: str,
    image_path: Path,
    mask_path: Path | None,
    group: str,
    nifti_axis: int,
    volume: tuple[str, int] | None = None,
    spacing: float | None = None,
) -> list[CaseRef]:
    labelled = mask_path is not None
    if image_path.is_dir():
        # Slices in position order along axis 0; a series' mask is a NIfTI volume in the same (slice, row, col)
        # order, what `caudo-ray predict` writes for the series.
        n = series_slice_count(image_path)
        return [CaseRef(f"{stem}__s{k:04d}", image_path, mask_path, group, k, labelled, 0, stem, k) for k in range(n)]
    if file_extension(image_path) in (".nii", ".nii.gz"):
        n = nifti_slice_count(image_path, nifti_axis)
        if n is not None:
            # The file is the volume: meta.csv volume columns describe 2D slice files and do not apply here.
            return [CaseRef(f"{stem}__s{k:04d}", image_path, mask_path, group, k, labelled, nifti_axis, stem, k) for k in range(n)]
    vol, order = volume if volume is not None else (None, None)
    return [CaseRef(stem, image_path, mask_path, group, None, labelled, volume=vol, slice_order=order, spacing=spacing)]


def _check_volumes(refs: list[CaseRef], problems: list[tuple[str, str]]) -> None:
    """Report slices that share a (volume, slice order): :func:`volumes_of` will refuse to stack that volume."""
    seen: dict[tuple[str, int], CaseRef] = {}
    for ref in sorted(refs, key=lambda r: r.case_id):
        if ref.volume is None or ref.slice_order is None:
            continue
        other = seen.setdefault((ref.volume, ref.slice_order), ref)
        if other is not ref:
            problems.append((str(ref.image_path), f"volume {ref.volume!r} slice {ref.slice_order} is also {other.image_path.name}; the volume cannot be stacked"))


def _assign_predefined(
    entries: list[tuple[str, str, str]],
    by_stem: dict[str, list[CaseRef]],
    source: str,
    problems: list[tuple[str, str]],
    what: str | None = None,
) -> dict[str, str]:
    """Case id -> set from (where, stem, set) entries; refuses an entry the folder cannot honour, naming it."""
    assigned: dict[str, tuple[str, str]] = {}
    for where, stem, role in entries:
        refs = by_stem.get(stem)
        if refs is None:
            raise DataError(source, f"{where}: no case with stem {stem!r} in images/ or unlabeled/ (missing, or left out while indexing)")
        previous = assigned.get(stem)
        if previous is not None and previous[1] != role:
            raise DataError(source, f"{where}: in the {role} set, but already in the {previous[1]} set ({previous[0]}); a case belongs to one set")
        if role != "train" and not refs[0].labelled:
            raise DataError(source, f"{where}: in the {role} set but has no mask in masks/; validation and test cases are scored against their masks")
        assigned[stem] = (where, role)
    predefined = {ref.case_id: role for stem, (_, role) in assigned.items() for ref in by_stem[stem]}
    by = what or source
    for stem, refs in sorted(by_stem.items()):
        if stem not in assigned and refs[0].labelled:
            problems.append((str(refs[0].image_path), f"not in the predefined split ({by}); left out of train, val and test"))
    return predefined


@dataclass
class _Meta:
    """What meta.csv says about each file (keys: file stems)."""

    groups: dict[str, str] = field(default_factory=dict)
    group_column: str | None = None
    splits: list[tuple[str, int, str]] = field(default_factory=list)  # (file name, line, set)
    split_column: str | None = None
    volumes: dict[str, tuple[str, int]] = field(default_factory=dict)  # stem -> (volume, slice order)
    spacings: dict[str, float] = field(default_factory=dict)  # stem -> mm per pixel


def _read_meta(
    root: Path,
    group_column: str | None,
    split_column: str | None,
    volume_column: str | None,
    slice_column: str | None,
    problems: list[tuple[str, str]],
    spacing_column: str | None = None,
) -> _Meta:
    meta = root / "meta.csv"
    out = _Meta()
    if not any((group_column, split_column, volume_column, slice_column, spacing_column)) or not meta.is_file():
        return out
    try:
        with meta.open(newline="") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            use_group = group_column is not None and group_column in columns
            if group_column is not None and not use_group:
                problems.append((str(meta), f"no column {group_column!r} (columns: {', '.join(columns)}); each file is its own group"))
            use_split = split_column is not None and split_column in columns
            has_volume = volume_column is not None and volume_column in columns
            has_slice = slice_column is not None and slice_column in columns
            use_volume = has_volume and has_slice
            if has_volume != has_slice:
                present, absent = (volume_column, slice_column) if has_volume else (slice_column, volume_column)
                problems.append((str(meta), f"column {present!r} without a {absent!r} column; no volume information"))
            use_spacing = spacing_column is not None and spacing_column in columns
            if spacing_column is not None and not use_spacing:
                problems.append((str(meta), f"no column {spacing_column!r}; HD95 is measured in pixels"))
            if not (use_group or use_split or use_volume or use_spacing):
                return out
            if "filename" not in columns:
                raise DataError(str(meta), f"needs a 'filename' column naming each image file (columns: {', '.join(columns)})")
            for line, row in enumerate(reader, start=2):
                name = (row.get("filename") or "").strip()
                if use_group:
                    group = (row.get(group_column) or "").strip()
                    if not name or not group:
                        problems.append((str(meta), f"line {line}: empty filename or {group_column}; row ignored"))
                        continue
                    out.groups[file_stem(name)] = group
                elif not name:
                    problems.append((str(meta), f"line {line}: empty filename; row ignored"))
                    continue
                if use_split:
                    _read_split_cell(meta, line, name, (row.get(split_column) or "").strip(), split_column, out)
                if use_volume:
                    _read_volume_cells(meta, line, name, row, volume_column, slice_column, out, problems)
                if use_spacing:
                    _read_spacing_cell(meta, line, name, (row.get(spacing_column) or "").strip(), spacing_column, out, problems)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(str(meta), f"cannot read meta.csv ({exc})") from None
    out.group_column = group_column if use_group else None
    out.split_column = split_column if use_split else None
    return out


def _read_split_cell(meta: Path, line: int, name: str, value: str, column: str, out: _Meta) -> None:
    if not value:
        return  # an empty cell names no set: the file is outside the predefined split
    role = _SPLIT_VALUES.get(value.lower())
    if role is None:
        raise DataError(str(meta), f"line {line}: unknown {column} value {value!r} for {name}; use train, val or test (or training, validation)")
    out.splits.append((name, line, role))


def _read_volume_cells(
    meta: Path, line: int, name: str, row: dict[str, str], volume_column: str, slice_column: str, out: _Meta, problems: list[tuple[str, str]]
) -> None:
    volume, order = (row.get(volume_column) or "").strip(), (row.get(slice_column) or "").strip()
    if not volume and not order:
        return  # a file outside any volume
    if not volume or not order:
        problems.append((str(meta), f"line {line}: {volume_column} and {slice_column} must be given together; no volume information for {name}"))
        return
    try:
        out.volumes[file_stem(name)] = (volume, int(order))
    except ValueError:
        problems.append((str(meta), f"line {line}: {slice_column} {order!r} is not an integer; no volume information for {name}"))


def _read_spacing_cell(meta: Path, line: int, name: str, value: str, column: str, out: _Meta, problems: list[tuple[str, str]]) -> None:
    try:
        spacing = float(value)
    except ValueError:
        spacing = math.nan
    if not math.isfinite(spacing) or spacing <= 0:
        problems.append((str(meta), f"line {line}: {column} {value!r} is not a positive number of millimetres; {name} has no spacing"))
        return
    out.spacings[file_stem(name)] = spacing
