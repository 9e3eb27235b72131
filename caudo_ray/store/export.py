"""Export a round's label maps as files at each case's original geometry (the inverse of loading a case)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from caudo_ray.data import Geometry, restore_mask, write_mask, write_volume
from caudo_ray.errors import StoreError
from caudo_ray.store.layout import LABEL_KINDS, READ_BLOCK, chunk_batches
from caudo_ray.store.store import PseudoLabelStore

log = logging.getLogger(__name__)

# Label maps of JPEG and DICOM sources are written as PNG: JPEG's lossy coding would corrupt class indices.
_EXPORT_EXTENSIONS = {"png": ".png", "jpeg": ".png", "dicom": ".png", "nifti": ".nii.gz"}


def export_round(
    store: PseudoLabelStore,
    r: int,
    out_dir: str | os.PathLike,
    *,
    which: str = "calibrated",
    fmt: str = "png",
    selected_only: bool = False,
    cases: Sequence[int] | None = None,
) -> list[Path]:
    """Writes each done case's label map of round ``r`` at its original geometry.

    Args:
        store: the store to read.
        r: the round.
        out_dir: folder for the files, named ``<case_id><ext>``.
        which: ``"calibrated"`` or ``"initial"`` label maps.
        fmt: ``"png"``, ``"nifti"`` (``.nii.gz``) or ``"source"`` (the format the case came from; a JPEG or DICOM
            source gets a PNG mask).
        selected_only: export only the cases selected when the round was committed.
        cases: export only these case indices (those done).

    Returns:
        The written paths, in case order.

    Raises:
        StoreError: unknown ``which``/``fmt``, or a path that would leave ``out_dir`` (a tampered store).
    """
    if which not in LABEL_KINDS:
        raise StoreError(f"which must be one of {list(LABEL_KINDS)}, got {which!r}")
    if fmt not in ("png", "nifti", "source"):
        raise StoreError(f"fmt must be 'png', 'nifti' or 'source', got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root_dir = out.resolve()
    keep = store.rounds.done(r)
    if selected_only:
        keep &= store.rounds.selected(r)
    if cases is not None:
        keep &= np.isin(np.arange(store.num_cases), np.asarray(cases, dtype=np.int64))
    idx = np.flatnonzero(keep)
    ids = store.case_ids
    written: list[Path] = []
    # Whole chunks at a time: every chunk is decoded once.
    chunk = store.rounds.chunk_size(r)
    for block in chunk_batches(idx, chunk * max(1, READ_BLOCK // chunk)):
        masks = store.rounds.read(r, block)[which]
        for i, mask, geometry in zip(block, masks, store.geometries(block)):
            case_id = ids[i]
            path = out / f"{case_id}{_extension(fmt, geometry, case_id)}"
            if not path.resolve().is_relative_to(root_dir):
                raise StoreError(f"{case_id}: export path {path} would leave {out}")
            geo = Geometry.from_dict(geometry)
            written.append(Path(write_mask(restore_mask(mask, geo), geo, path)))
    log.debug("exported %d %s label maps of round %d to %s", len(written), which, r, out)
    return written


def export_volume(store: PseudoLabelStore, r: int, i: int, out_path: str | os.PathLike, *, which: str = "calibrated") -> Path:
    """Writes the whole label volume that case ``i`` (a slice of a 3D volume) is a slice of, with the volume's shape
    and affine: round ``r``'s labels on the volume's slices that are done in the store, background elsewhere.

    Raises:
        StoreError: unknown ``which``, or case ``i`` is not a slice of a volume.
    """
    if which not in LABEL_KINDS:
        raise StoreError(f"which must be one of {list(LABEL_KINDS)}, got {which!r}")
    geometries = store.geometries()
    geo = Geometry.from_dict(geometries[i])
    if not geo.is_volume_slice:
        raise StoreError(f"{store.case_ids[i]}: not a slice of a volume ({geo.source})")
    done = store.rounds.done(r)
    members = [j for j, g in enumerate(geometries) if g.get("source") == geo.source and done[j]]
    labels = store.rounds.read(r, members)[which] if members else []
    slices = {k: np.zeros(geo.shape, np.uint8) for k in range(geo.volume_shape[geo.axis])}
    for j, mask in zip(members, labels):
        member = Geometry.from_dict(geometries[j])
        slices[member.slice_index] = restore_mask(mask, member)
    return Path(write_volume(slices, geo, out_path))


def _extension(fmt: str, geometry: Mapping[str, Any], case_id: str) -> str:
    name = str(geometry.get("format", "")).lower() if fmt == "source" else fmt
    if name not in _EXPORT_EXTENSIONS:
        raise StoreError(f"{case_id}: cannot write label maps in source format {name!r}; use fmt='png' or 'nifti'")
    return _EXPORT_EXTENSIONS[name]
