"""Reading images and masks from PNG, JPEG, NIfTI and DICOM, and writing masks back at the input's geometry.

Every reader returns 2D arrays as (rows, cols). For PNG and JPEG that is the orientation PIL gives (row 0 is the
top of the picture); for NIfTI it is the stored voxel order of the slice (no reorientation); for DICOM it is
pydicom's (Rows, Columns). Masks written back with :func:`write_mask` / :func:`write_volume` use the same
convention in reverse, so they line up voxel for voxel with the file they came from.

A 3D NIfTI volume is cut into 2D slices along ``nifti_axis``; each slice carries a :class:`Geometry` recording
the volume shape, the slice index, the axis and the affine, which is all that is needed to write a label volume
back with the input's affine.

Mask formats: JPEG is lossy and would smear class indices, so masks of JPEG (and DICOM) images are written as PNG
next to the requested path (``case.jpg`` -> ``case.png``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import NibabelReader, PILReader, PydicomReader
from PIL import Image

from caudo_ray.data.dicom_series import read_dicom_series_cached
from caudo_ray.errors import DataError

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".nii", ".nii.gz", ".dcm")
MIN_SIDE = 8  # smaller images carry no usable structure and break the U-Net's downsampling
COLOR_SPREAD = 4.0  # mean max-min channel difference (0..255 levels) above which an RGB image is a colour picture

_FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".nii": "nifti", ".nii.gz": "nifti", ".dcm": "dicom"}
# ITU-R BT.601 luma, the weights PIL uses for RGB -> L, so RGB and grayscale copies of a picture read alike.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Geometry:
    """Where a 2D array came from, enough to write a mask back that lines up with the source file.

    Attributes:
        shape: (rows, cols) of the 2D array as read.
        format: "png", "jpeg", "nifti" or "dicom".
        source: path of the file read.
        slice_index: index of the slice within a 3D volume; None for a 2D file.
        axis: axis along which the volume was sliced; None for a 2D file.
        volume_shape: shape of the NIfTI data array (a 2D NIfTI may be stored as (H, W, 1)); None otherwise.
        affine: 4x4 NIfTI affine (voxel index -> RAS mm) as nested tuples, of a NIfTI file or a DICOM series
            folder (whose slices stack along axis 0); None for other files.
    """

    shape: tuple[int, int]
    format: str
    source: str
    slice_index: int | None = None
    axis: int | None = None
    volume_shape: tuple[int, ...] | None = None
    affine: tuple[tuple[float, ...], ...] | None = None

    @property
    def is_volume_slice(self) -> bool:
        return self.slice_index is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form (lists instead of tuples)."""
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        if self.volume_shape is not None:
            d["volume_shape"] = list(self.volume_shape)
        if self.affine is not None:
            d["affine"] = [list(row) for row in self.affine]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Geometry:
        """Inverse of :meth:`to_dict`."""
        return cls(
            shape=(int(d["shape"][0]), int(d["shape"][1])),
            format=str(d["format"]),
            source=str(d["source"]),
            slice_index=None if d.get("slice_index") is None else int(d["slice_index"]),
            axis=None if d.get("axis") is None else int(d["axis"]),
            volume_shape=None if d.get("volume_shape") is None else tuple(int(v) for v in d["volume_shape"]),
            affine=None if d.get("affine") is None else tuple(tuple(float(v) for v in row) for row in d["affine"]),
        )


def file_extension(path: str | Path) -> str:
    """Lower-case extension, treating ``.nii.gz`` as one extension."""
    name = Path(path).name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def file_stem(path: str | Path) -> str:
    """File name without its (possibly double, ``.nii.gz``) extension."""
    name = Path(path).name
    ext = file_extension(path)
    return name[: len(name) - len(ext)] if ext else name


def file_format(path: str | Path) -> str:
    """Format name for a supported file.

    Raises:
        DataError: the extension is not one of :data:`SUPPORTED_EXTENSIONS`.
    """
    ext = file_extension(path)
    if ext not in _FORMATS:
        raise DataError(str(path), f"unsupported extension {ext or '(none)'!r}; supported: {', '.join(SUPPORTED_EXTENSIONS)}")
    return _FORMATS[ext]


def nifti_slice_count(path: str | Path, nifti_axis: int = 2) -> int | None:
    """Number of slices along ``nifti_axis`` from the NIfTI header only, or None for a 2D image.

    Raises:
        DataError: unreadable header or more than three non-singleton dimensions.
    """
    try:
        shape = tuple(nib.load(str(path)).shape)
    except Exception as exc:  # noqa: BLE001 (nibabel raises several unrelated types for a bad header)
        raise DataError(str(path), f"cannot read NIfTI header ({exc})") from None
    spatial = _spatial_shape(shape, path)
    return None if _is_2d(spatial) else spatial[nifti_axis]


def read_image(
    path: str | Path,
    nifti_axis: int = 2,
    slice_index: int | None = None,
    *,
    max_pixels: int | None = None,
    grayscale: bool = False,
) -> list[tuple[np.ndarray, Geometry]]:
    """Read an image file as float32 2D arrays with their geometry.

    Args:
        path: a PNG, JPEG, NIfTI (2D or 3D) or DICOM file, or a folder holding one DICOM series (a volume sliced
            along its slice normal, in position order; see :mod:`caudo_ray.data.dicom_series`).
        nifti_axis: axis along which a 3D NIfTI volume is sliced.
        slice_index: for a 3D volume, read only this slice (the rest of the volume is not decoded where the
            file allows it).
        max_pixels: refuse a 2D image (or slice) with more pixels; PNG/JPEG are checked from the header,
            before decoding.
        grayscale: the data set is a grayscale modality: refuse a colour picture (channels that differ) as the
            wrong modality instead of reading its luminance.

    Returns:
        One (array, geometry) per 2D image: one for a 2D file, one per slice (or the one asked) for a volume.
        RGB(A) images are converted to luminance.

    Raises:
        DataError: naming the file, for an unreadable, truncated or non-image file, an unsupported extension,
            NaN/inf intensities, an image smaller than 8 pixels a side or larger than ``max_pixels``, or a colour
            picture where ``grayscale`` is asked.
    """
    if Path(path).is_dir():
        items = _read_series(Path(path), slice_index, max_pixels)
    else:
        items = _read(path, nifti_axis, slice_index, is_mask=False, max_pixels=max_pixels, grayscale=grayscale)
    out = []
    for arr, geom in items:
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            bad = int(np.size(arr) - np.isfinite(arr).sum())
            where = f" (slice {geom.slice_index})" if geom.is_volume_slice else ""
            raise DataError(str(path), f"{bad} NaN or infinite intensities{where}")
        out.append((arr, geom))
    return out


def read_mask(path: str | Path, nifti_axis: int = 2, slice_index: int | None = None) -> list[tuple[np.ndarray, Geometry]]:
    """Read a label file as uint8 class maps with their geometry.

    Args:
        path: a PNG, NIfTI or DICOM label file (JPEG is accepted but lossy compression usually breaks it).
        nifti_axis: axis along which a 3D NIfTI volume is sliced.
        slice_index: for a 3D volume, read only this slice.

    Raises:
        DataError: naming the file, as :func:`read_image`, and for non-integer, negative or > 255 values or a
            colour (non-gray RGB) mask.
    """
    out = []
    for arr, geom in _read(path, nifti_axis, slice_index, is_mask=True):
        if not np.isfinite(arr).all():
            raise DataError(str(path), "mask holds NaN or infinite values; expected integer class indices")
        if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
            raise DataError(str(path), "mask holds non-integer values; expected integer class indices")
        lo, hi = (arr.min(), arr.max()) if arr.size else (0, 0)
        if lo < 0 or hi > 255:
            raise DataError(str(path), f"mask values span [{lo:g}, {hi:g}]; expected class indices in 0..255")
        out.append((arr.astype(np.uint8), geom))
    return out


def write_mask(mask_original: np.ndarray, geometry: Geometry, out_path: str | Path) -> Path:
    """Write a class map at the original geometry of its source image.

    The format follows ``out_path``'s extension where it names a mask format: ``.png`` (uint8 class indices) or
    ``.nii``/``.nii.gz``. Any other extension gets the source's own mask format: PNG for PNG, JPEG and DICOM
    sources (JPEG would corrupt class indices), NIfTI for NIfTI sources. A NIfTI written for a 2D NIfTI source
    keeps the source's affine and array shape; a slice of a 3D volume (NIfTI or DICOM series) gets a 2D NIfTI
    whose affine places it where the slice was (use :func:`write_volume` for the whole label volume); a raster
    source gets an identity affine.

    Args:
        mask_original: (rows, cols) integer class map, shape ``geometry.shape``.
        geometry: the geometry of the source image.
        out_path: requested output path.

    Returns:
        The path actually written.

    Raises:
        DataError: the mask does not have the source's shape or holds values outside 0..255.
    """
    mask = _as_label_map(mask_original, geometry)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ext = file_extension(out_path)
    if ext not in (".png", ".nii", ".nii.gz"):
        ext = ".nii.gz" if geometry.format == "nifti" else ".png"
        out_path = out_path.with_name(file_stem(out_path) + ext)
    if ext == ".png":
        Image.fromarray(mask, mode="L").save(out_path)
        return out_path
    if geometry.affine is None:  # a raster source: no placement in space to keep
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(out_path))
        return out_path
    data = mask[:, :, None] if geometry.is_volume_slice else mask.reshape(geometry.volume_shape or geometry.shape)
    nib.save(nib.Nifti1Image(data, _slice_affine(geometry)), str(out_path))
    return out_path


def _slice_affine(geometry: Geometry) -> np.ndarray:
    """The affine of a 2D NIfTI holding the array of ``geometry`` (which has an affine) where the source has it."""
    affine = np.asarray(geometry.affine, dtype=np.float64)
    if not geometry.is_volume_slice:
        return affine
    assert geometry.axis is not None and geometry.slice_index is not None
    # Shift the origin to the slice, then drop its axis: world coordinates of every pixel are preserved.
    shift = np.zeros(3)
    shift[geometry.axis] = geometry.slice_index
    origin = affine[:3, :3] @ shift + affine[:3, 3]
    affine = affine.copy()
    affine[:3, 3] = origin
    cols = [i for i in range(3) if i != geometry.axis] + [geometry.axis]
    affine[:3, :3] = affine[:3, :3][:, cols]
    return affine


def check_mask_placement(path: str | Path, geometry: Geometry, tolerance_mm: float = 1e-3) -> None:
    """Refuse a NIfTI mask that would not lie on the image it labels; other formats carry no placement to check.

    A 3D mask must have the image volume's shape and affine; a 2D one the affine :func:`write_mask` gives the
    image (its slice's, for a slice of a volume). Shapes of the labelled slice itself are checked when the mask is
    read (:func:`caudo_ray.data.dataset.load_case`).

    Raises:
        DataError: naming the file: another volume shape, or an affine further than ``tolerance_mm`` from the image's.
    """
    if file_extension(path) not in (".nii", ".nii.gz") or geometry.affine is None:
        return
    try:
        header = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 (nibabel raises several unrelated types for a bad header)
        raise DataError(str(path), f"cannot read NIfTI header ({exc})") from None
    spatial = _spatial_shape(tuple(header.shape), path)
    if _is_2d(spatial):
        expected = _slice_affine(geometry)
    else:
        if geometry.volume_shape is None or spatial != tuple(geometry.volume_shape):
            raise DataError(str(path), f"volume shape {spatial} does not match the image's {geometry.volume_shape} ({geometry.source})")
        expected = np.asarray(geometry.affine, dtype=np.float64)
    gap = float(np.max(np.abs(np.asarray(header.affine, dtype=np.float64) - expected)))
    if gap > tolerance_mm:
        raise DataError(str(path), f"affine differs from the image's ({geometry.source}) by up to {gap:.3g}: it would not lie on the image")


def write_volume(slices: Sequence[np.ndarray] | Mapping[int, np.ndarray], geometry: Geometry, out_path: str | Path) -> Path:
    """Write the label volume of a sliced 3D NIfTI with the input's shape and affine.

    Args:
        slices: one (rows, cols) class map per slice in slice order, or a mapping slice_index -> class map that
            covers every slice.
        geometry: the geometry of any slice of the volume.
        out_path: ``.nii`` or ``.nii.gz`` path.

    Raises:
        DataError: the geometry is not a volume slice, or slices are missing or of the wrong shape.
    """
    if not geometry.is_volume_slice or geometry.volume_shape is None or geometry.axis is None:
        raise DataError(geometry.source, "write_volume needs the geometry of a slice of a 3D NIfTI volume")
    n = geometry.volume_shape[geometry.axis]
    by_index = dict(slices) if isinstance(slices, Mapping) else dict(enumerate(slices))
    missing = sorted(set(range(n)) - set(by_index))
    if missing or len(by_index) != n:
        raise DataError(geometry.source, f"write_volume needs exactly {n} slices; missing {missing[:10]}")
    stack = [_as_label_map(by_index[i], geometry) for i in range(n)]
    data = np.stack(stack, axis=geometry.axis)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.asarray(geometry.affine, dtype=np.float64)), str(out_path))
    return out_path


def _as_label_map(mask: np.ndarray, geometry: Geometry) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(geometry.shape):
        raise DataError(geometry.source, f"mask shape {mask.shape} does not match the image shape {tuple(geometry.shape)}")
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise DataError(geometry.source, f"mask values span [{mask.min()}, {mask.max()}]; class indices must be 0..255")
    return np.ascontiguousarray(mask.astype(np.uint8))


def _read(
    path: str | Path,
    nifti_axis: int,
    slice_index: int | None,
    *,
    is_mask: bool,
    max_pixels: int | None = None,
    grayscale: bool = False,
) -> list[tuple[np.ndarray, Geometry]]:
    path = Path(path)
    fmt = file_format(path)
    if not path.is_file():
        raise DataError(str(path), "file does not exist")
    try:
        if fmt in ("png", "jpeg"):
            items = [_read_pil(path, fmt, is_mask, max_pixels, grayscale)]
        elif fmt == "dicom":
            items = [_read_dicom(path)]
        else:
            items = _read_nifti(path, nifti_axis, slice_index)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 (PIL, nibabel and pydicom each raise their own types for corrupt files)
        raise DataError(str(path), f"cannot read as {fmt} ({type(exc).__name__}: {exc})") from None
    for arr, _ in items:
        if arr.ndim != 2 or min(arr.shape) < MIN_SIDE:
            raise DataError(str(path), f"image is {'x'.join(map(str, arr.shape))} pixels; need 2D with at least {MIN_SIDE} a side")
        _check_pixels(path, arr.shape, max_pixels)
    return items


def _check_pixels(path: Path, shape: tuple[int, ...], max_pixels: int | None) -> None:
    if max_pixels is not None and int(np.prod(shape)) > max_pixels:
        raise DataError(str(path), f"image is {'x'.join(map(str, shape))} = {int(np.prod(shape)):,} pixels, more than data.max_pixels = {max_pixels:,}")


def _pil_converter(is_mask: bool):
    def convert(img: Image.Image) -> Image.Image:
        # Palette images: for masks the palette indices are the classes; for images the colours are what counts.
        if img.mode in ("P", "PA") and not is_mask:
            return img.convert("RGBA" if img.mode == "PA" else "RGB")
        if img.mode in ("LA", "PA"):
            return img.convert("L" if img.mode == "LA" else "P")
        if img.mode == "1":
            # Bilevel files hold 0/255 once converted; as a mask the foreground is class 1.
            gray = img.convert("L")
            return gray.point(lambda v: 1 if v else 0) if is_mask else gray
        return img

    return convert


def _read_pil(path: Path, fmt: str, is_mask: bool, max_pixels: int | None = None, grayscale: bool = False) -> tuple[np.ndarray, Geometry]:
    reader = PILReader(converter=_pil_converter(is_mask), reverse_indexing=False)
    with warnings.catch_warnings():
        # PIL warns about large headers; the size is checked here against data.max_pixels instead.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        probe = Image.open(path)
    with probe:
        _check_pixels(path, (probe.height, probe.width), max_pixels)  # from the header: nothing decoded yet
        probe.verify()  # catches truncated / corrupt PNG data before decoding
    img = reader.read(str(path))
    try:
        arr, _ = reader.get_data(img)
    finally:
        img.close()
    arr = np.asarray(arr)
    if arr.ndim == 3:
        if arr.shape[2] in (3, 4):
            rgb = arr[..., :3]
            if is_mask:
                if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
                    raise DataError(str(path), "mask is a colour image; expected one channel of class indices")
                arr = rgb[..., 0]
            else:
                rgb = rgb.astype(np.float32)
                # JPEG chroma noise leaves a grey picture's channels ~1 level apart; a colour picture differs by far more.
                spread = float(np.mean(rgb.max(axis=2) - rgb.min(axis=2)))
                if grayscale and spread > COLOR_SPREAD:
                    raise DataError(str(path), f"colour image (mean channel spread {spread:.1f} levels) in a grayscale data set; wrong modality? (set data.color: true for colour data)")
                arr = rgb @ _LUMA
        elif arr.shape[2] == 1:
            arr = arr[..., 0]
    return arr, Geometry(shape=(int(arr.shape[0]), int(arr.shape[1])), format=fmt, source=str(path))


def _read_dicom(path: Path) -> tuple[np.ndarray, Geometry]:
    reader = PydicomReader(swap_ij=False, affine_lps_to_ras=False)
    with warnings.catch_warnings():
        # Plain 2D DICOM often lacks the orientation tags MONAI wants for an affine; we do not use the affine.
        warnings.filterwarnings("ignore", message=".*affine matrix cannot be derived.*")
        arr, _ = reader.get_data(reader.read(str(path)))
    arr = np.squeeze(np.asarray(arr))
    if arr.ndim != 2:
        raise DataError(str(path), f"DICOM holds a {arr.ndim}D array {arr.shape}; only single-frame 2D DICOM is supported")
    return arr, Geometry(shape=(int(arr.shape[0]), int(arr.shape[1])), format="dicom", source=str(path))


def _read_series(folder: Path, slice_index: int | None, max_pixels: int | None) -> list[tuple[np.ndarray, Geometry]]:
    series = read_dicom_series_cached(folder)
    n = len(series.volume)
    if slice_index is not None and not 0 <= slice_index < n:
        raise DataError(str(folder), f"slice {slice_index} out of range: the series has {n} slices")
    affine = tuple(tuple(float(v) for v in row) for row in series.affine)
    out = []
    for k in range(n) if slice_index is None else [slice_index]:
        arr = series.volume[k].copy()  # the cached series stays as read, whatever callers do with the slice
        if min(arr.shape) < MIN_SIDE:
            raise DataError(str(folder), f"slices are {'x'.join(map(str, arr.shape))} pixels; need at least {MIN_SIDE} a side")
        _check_pixels(folder, arr.shape, max_pixels)
        out.append((arr, Geometry(shape=(int(arr.shape[0]), int(arr.shape[1])), format="dicom", source=str(folder),
                                  slice_index=k, axis=0, volume_shape=tuple(int(s) for s in series.volume.shape), affine=affine)))
    return out


def _spatial_shape(shape: tuple[int, ...], path: str | Path) -> tuple[int, ...]:
    # Trailing singleton dims (time, channel) are common in NIfTI; anything else beyond 3D is not an image here.
    spatial = tuple(shape)
    while len(spatial) > 3 and spatial[-1] == 1:
        spatial = spatial[:-1]
    if len(spatial) not in (2, 3):
        raise DataError(str(path), f"NIfTI data shape {tuple(shape)} is not a 2D image or 3D volume")
    return spatial


def _is_2d(spatial: tuple[int, ...]) -> bool:
    # A 2D image is often stored as (H, W, 1); any singleton axis makes a 3D array a single image.
    return len(spatial) == 2 or 1 in spatial


def _read_nifti(path: Path, nifti_axis: int, slice_index: int | None) -> list[tuple[np.ndarray, Geometry]]:
    img = NibabelReader().read(str(path))
    affine = tuple(tuple(float(v) for v in row) for row in np.asarray(img.affine))
    spatial = _spatial_shape(tuple(img.shape), path)
    if _is_2d(spatial):
        squeezed = [s for s in spatial if s != 1]
        arr = np.asarray(img.dataobj, dtype=np.float32).reshape(squeezed if len(squeezed) == 2 else spatial[:2])
        return [(arr, Geometry(shape=(int(arr.shape[0]), int(arr.shape[1])), format="nifti", source=str(path),
                               volume_shape=tuple(int(s) for s in img.shape), affine=affine))]
    n = spatial[nifti_axis]
    indices = range(n) if slice_index is None else [slice_index]
    if slice_index is not None and not 0 <= slice_index < n:
        raise DataError(str(path), f"slice {slice_index} out of range: the volume has {n} slices along axis {nifti_axis}")
    dataobj = img.dataobj
    out = []
    for k in indices:
        sl: list[Any] = [slice(None)] * len(img.shape)
        sl[nifti_axis] = k
        arr = np.asarray(dataobj[tuple(sl)], dtype=np.float32).reshape([s for i, s in enumerate(spatial) if i != nifti_axis])
        out.append((arr, Geometry(shape=(int(arr.shape[0]), int(arr.shape[1])), format="nifti", source=str(path),
                                  slice_index=k, axis=nifti_axis, volume_shape=tuple(int(s) for s in spatial), affine=affine)))
    return out
