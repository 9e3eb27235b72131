"""``caudo-ray queries --export``: each query as its image and a proposal to correct, in the dataset's own format.

An annotator corrects the run's current calibrated label of a case in the tool they already use (3D Slicer,
ITK-SNAP, any paint program) instead of drawing it from nothing, then gives the folder back with
``caudo-ray annotate`` (:mod:`caudo_ray.run.annotations`). The export folder holds::

    manifest.csv            rank, case id, reliability, round, slice, image, pre-annotation, source image
    images/<file>           each query's image as the dataset holds it (a whole volume for a slice of one)
    masks/<case_id>.<ext>   the pre-annotations: PNG for a 2D picture, NIfTI with the image's affine for NIfTI, the
                            whole label volume for a slice of a volume (the slice to correct is named in the
                            manifest); the name is what ``annotate`` takes back
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Sequence
from pathlib import Path

from caudo_ray.data import Geometry
from caudo_ray.errors import StoreError
from caudo_ray.labelling.selection import Query
from caudo_ray.store import PseudoLabelStore, export_round, export_volume

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("rank", "case_id", "reliability", "round", "slice", "image", "pre_annotation", "source")


def export_queries(store: PseudoLabelStore, r: int, queries: Sequence[Query], out_dir: Path) -> list[dict]:
    """Write round ``r``'s queries (``rounds.steps.annotation_queries``) with their pre-annotations and a manifest
    into ``out_dir``.

    Returns:
        The manifest's rows, in the queries' order (paths relative to ``out_dir``).

    Raises:
        StoreError: ``out_dir`` already holds an export (its manifest), or a query's image is gone from its
            source path.
    """
    if (out_dir / MANIFEST).exists():
        raise StoreError(f"{out_dir} holds an export already ({MANIFEST}); choose a new folder, so no correction in it is overwritten")
    images, masks = out_dir / "images", out_dir / "masks"
    images.mkdir(parents=True, exist_ok=True)
    index = {case_id: i for i, case_id in enumerate(store.case_ids)}
    rows = []
    for rank, query in enumerate(queries, 1):
        case_id, reliability = query.case_id, query.reliability
        i = index[case_id]
        geometry = Geometry.from_dict(store.geometries([i])[0])
        if geometry.is_volume_slice:
            mask = export_volume(store, r, i, masks / f"{case_id}.nii.gz")
        else:
            [mask] = export_round(store, r, masks, fmt="source", cases=[i])
        rows.append(
            {
                "rank": rank,
                "case_id": case_id,
                "reliability": f"{reliability:.6f}",
                "round": r,
                "slice": geometry.slice_index if geometry.is_volume_slice else "",
                "image": _copy_image(Path(geometry.source), images).relative_to(out_dir).as_posix(),
                "pre_annotation": mask.relative_to(out_dir).as_posix(),
                "source": geometry.source,
            }
        )
    with (out_dir / MANIFEST).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _copy_image(source: Path, images: Path) -> Path:
    """The image file (or DICOM series folder) as the dataset holds it, copied once however many queries share it."""
    target = images / source.name
    if target.exists():
        return target
    if source.is_dir():
        shutil.copytree(source, target)
    elif source.is_file():
        shutil.copyfile(source, target)
    else:
        raise StoreError(f"the image of a query is gone from {source}; export from where the run's data is")
    return target
