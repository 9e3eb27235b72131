"""A first look at a dataset folder: counts, sizes, formats, classes, groups and problems."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from caudo_ray.data.dataset import index_dataset
from caudo_ray.data.readers import file_format, read_image, read_mask
from caudo_ray.errors import DataError

TOP_SIZES = 5


def inspect_dataset(
    root: str | Path,
    group_column: str | None = "group",
    nifti_axis: int = 2,
    progress: bool = True,
    *,
    split_column: str | None = "split",
    datalist: str | Path | None = None,
) -> dict[str, Any]:
    """Read every file of a dataset folder once and summarise it.

    Args:
        root: the dataset folder.
        group_column: meta.csv group column (None: each file its own group).
        nifti_axis: axis volumes are sliced along.
        progress: show a tqdm progress bar over the files.
        split_column: meta.csv column of a predefined split (see :func:`index_dataset`).
        datalist: a Decathlon datalist JSON defining the split instead.

    Returns:
        A JSON-serialisable dict: ``labelled``, ``unlabelled`` (case counts), ``files``, ``formats``,
        ``image_sizes`` (most common (rows, cols) with counts), ``distinct_sizes``, ``classes`` (class index ->
        pixel fraction over all masks), ``num_classes``, ``group_column``, ``groups`` (count and cases per group
        min / median / max, and how many groups hold labelled cases), ``predefined_split`` (source and labelled
        cases per set, or None), ``volumes`` (3D volumes the cases stack into), ``problems`` (file, problem)
        from indexing and reading.
    """
    try:
        index = index_dataset(root, group_column=group_column, nifti_axis=nifti_axis, split_column=split_column, datalist=datalist)
        split_problem = None
    except DataError as exc:
        # A broken predefined split is one more finding here, not a reason to stop looking at the data.
        if split_column is None and datalist is None:
            raise
        index = index_dataset(root, group_column=group_column, nifti_axis=nifti_axis, split_column=None)
        split_problem = [exc.source, exc.problem]
    problems = [list(p) for p in index.problems] + ([split_problem] if split_problem else [])
    sizes: Counter[tuple[int, int]] = Counter()
    formats: Counter[str] = Counter()
    class_pixels: Counter[int] = Counter()
    mismatched = 0

    files: dict[Path, Path | None] = {}
    for ref in index.cases:
        files.setdefault(ref.image_path, ref.mask_path)
    for image_path, mask_path in tqdm(sorted(files.items()), desc="reading", unit="file", disable=not progress):
        formats["dicom series" if image_path.is_dir() else file_format(image_path)] += 1
        try:
            images = read_image(image_path, nifti_axis=nifti_axis)
        except DataError as exc:
            problems.append([exc.source, exc.problem])
            continue
        for arr, _ in images:
            sizes[(int(arr.shape[0]), int(arr.shape[1]))] += 1
        if mask_path is None:
            continue
        try:
            # A series' mask volume is stacked along axis 0, as the series is.
            masks = read_mask(mask_path, nifti_axis=0 if image_path.is_dir() else nifti_axis)
        except DataError as exc:
            problems.append([exc.source, exc.problem])
            continue
        if [m.shape for m, _ in masks] != [a.shape for a, _ in images]:
            mismatched += 1
            problems.append([str(mask_path), f"mask shape {masks[0][0].shape} does not match image shape {images[0][0].shape}"])
            continue
        for mask, _ in masks:
            values, counts = np.unique(mask, return_counts=True)
            for v, c in zip(values.tolist(), counts.tolist()):
                class_pixels[int(v)] += int(c)

    total_pixels = sum(class_pixels.values())
    per_group = sorted(len(ids) for ids in index.groups.values())
    return {
        "root": str(index.root),
        "labelled": len(index.labelled),
        "unlabelled": len(index.unlabelled),
        "files": len(files),
        "formats": dict(sorted(formats.items())),
        "image_sizes": [[list(size), count] for size, count in sizes.most_common(TOP_SIZES)],
        "distinct_sizes": len(sizes),
        "classes": {str(k): class_pixels[k] / total_pixels for k in sorted(class_pixels)} if total_pixels else {},
        "num_classes": (max(class_pixels) + 1) if class_pixels else 0,
        "group_column": index.group_column,
        "groups": {
            "count": len(per_group),
            "labelled_count": len({ref.group for ref in index.labelled}),
            "cases_per_group": {
                "min": per_group[0] if per_group else 0,
                "median": float(np.median(per_group)) if per_group else 0.0,
                "max": per_group[-1] if per_group else 0,
            },
        },
        "predefined_split": {"source": index.split_source, **(index.predefined_counts() or {})} if index.predefined is not None else None,
        "volumes": len({ref.volume for ref in index.cases if ref.volume is not None}),
        "problems": problems,
    }


def format_report(report: dict[str, Any], max_problems: int = 20) -> str:
    """Readable text for a report from :func:`inspect_dataset`."""
    lines = [
        f"Dataset {report['root']}",
        f"  cases: {report['labelled']} labelled, {report['unlabelled']} unlabelled ({report['files']} files)",
        "  formats: " + ", ".join(f"{k} {v}" for k, v in report["formats"].items()),
        f"  image sizes (rows x cols), {report['distinct_sizes']} distinct, most common: "
        + ", ".join(f"{h}x{w} ({n})" for (h, w), n in report["image_sizes"]),
        f"  classes: {report['num_classes']} found; pixel fractions: "
        + ", ".join(f"{k}: {v:.3f}" for k, v in report["classes"].items()),
    ]
    g = report["groups"]
    cpg = g["cases_per_group"]
    source = f"from meta.csv column {report['group_column']!r}" if report["group_column"] else "each file its own group"
    lines.append(f"  groups: {g['count']} ({g['labelled_count']} with labelled cases; {source}); cases per group min {cpg['min']}, median {cpg['median']:g}, max {cpg['max']}")
    split = report.get("predefined_split")
    if split:
        left_out = f", {split['none']} in no set" if split["none"] else ""
        lines.append(f"  predefined split ({split['source']}): {split['train']} train, {split['val']} val, {split['test']} test labelled cases{left_out}")
    if report.get("volumes"):
        lines.append(f"  volumes: {report['volumes']} (slices stack into 3D volumes for per-volume metrics)")
    problems = report["problems"]
    lines.append(f"  problems: {len(problems)}" + ("" if problems else " (none)"))
    for source_file, problem in problems[:max_problems]:
        lines.append(f"    {source_file}: {problem}")
    if len(problems) > max_problems:
        lines.append(f"    ... and {len(problems) - max_problems} more")
    return "\n".join(lines)
