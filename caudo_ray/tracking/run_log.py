"""What a self-training run logs to MLflow after each round: metrics, summary, overlays, case table, gallery,
answered queries.

The dashboard (:mod:`caudo_ray.tracking.report`) reads these back by the names in :mod:`caudo_ray.tracking.names`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from caudo_ray.store import PseudoLabelStore
from caudo_ray.tracking import names
from caudo_ray.tracking.figures import overlay_panel
from caudo_ray.tracking.tracker import Tracker, sanitize_artifact_path

_READ_BLOCK = 64  # cases read from the store at a time when building the case table


def log_round(tracker: Tracker, r: int, summary: dict[str, Any], val_metrics: dict[str, Any]) -> None:
    """Round ``r``'s summary as metrics (names.SUMMARY_METRICS, PERF_METRICS, val/*) and as a JSON artifact."""
    metrics = {name: summary[key] for key, name in names.SUMMARY_METRICS.items() if key in summary}
    metrics.update({name: summary["perf"][key] for key, name in names.PERF_METRICS.items() if key in summary.get("perf", {})})
    if "dice" in val_metrics:
        metrics[names.VAL_DICE] = val_metrics["dice"]
        metrics[names.VAL_HD95] = val_metrics["hd95"]
    tracker.log_metrics(metrics, step=r)
    tracker.log_dict(summary, names.ROUND_SUMMARY.format(r=r))


def answered_queries(store: PseudoLabelStore) -> list[dict[str, Any]]:
    """The answered queries, in the order they joined: each answer's record (case id, the round it joined,
    annotator, time, file, sha256) with ``reliability_before``, its reliability in the round whose queries it
    answered (the last committed before it joined; null when none was)."""
    committed = set(store.rounds.committed())
    index = {case_id: i for i, case_id in enumerate(store.case_ids)}
    reliability: dict[int, np.ndarray] = {}
    rows = []
    for record in sorted(store.annotations.values(), key=lambda rec: (rec["round"], rec["case_id"])):
        asked = max((r for r in committed if r < record["round"]), default=None)
        if asked is not None and asked not in reliability:
            reliability[asked] = store.rounds.scores(asked)["reliability"]
        before = None if asked is None else float(reliability[asked][index[record["case_id"]]])
        rows.append({**record, "reliability_before": before if before is None or math.isfinite(before) else None})
    return rows


def log_answers(tracker: Tracker, store: PseudoLabelStore) -> None:
    """The table of answered queries (:func:`answered_queries`), when there are any."""
    rows = answered_queries(store)
    if rows:
        tracker.log_dict({"answers": rows}, names.ANSWERED_QUERIES)


def log_overlays(tracker: Tracker, store: PseudoLabelStore, r: int, k: int) -> None:
    """Initial vs calibrated label overlays for a fixed sample of cases (the same cases every round)."""
    if k <= 0:
        return
    usable = np.flatnonzero(store.usable_mask())
    sample = usable[np.linspace(0, len(usable) - 1, num=min(k, len(usable))).astype(int)] if len(usable) else usable
    if not len(sample):
        return
    images = store.read_images(sample)
    labels = store.rounds.read(r, sample)
    for j, i in enumerate(sample):
        panel = overlay_panel(images[j], labels["initial"][j], labels["calibrated"][j])
        tracker.log_image(panel, names.OVERLAY.format(r=r, case_id=store.case_ids[int(i)]))


def case_table(store: PseudoLabelStore, r: int) -> dict[str, Any]:
    """Round ``r``'s per-case table over the usable cases, column-wise (one list per column, JSON-ready).

    Columns: ``index`` (store row), ``case_id``, ``selected``, every score the store records (``reliability``
    and its parts, ``initial_dice``/``calibrated_dice`` against hidden truth, null where a case has none) and
    ``changed_fraction``: the share of the label's pixels (foreground in either map) that calibration changed.
    Label maps are read a block at a time, so memory stays bounded for large pools.
    """
    usable = np.flatnonzero(store.usable_mask())
    names = store.score_names
    scores = {name: np.full(len(usable), np.nan, dtype=np.float32) for name in names}
    changed = np.zeros(len(usable), dtype=np.float32)
    for start in range(0, len(usable), _READ_BLOCK):
        idx = usable[start : start + _READ_BLOCK]
        block = store.rounds.read(r, idx)
        initial, calibrated = block["initial"], block["calibrated"]
        differ = (initial != calibrated).sum(axis=(1, 2))
        label = ((initial > 0) | (calibrated > 0)).sum(axis=(1, 2))
        changed[start : start + len(idx)] = differ / np.maximum(label, 1)
        for name in names:
            scores[name][start : start + len(idx)] = block["scores"][name]
    table: dict[str, Any] = {
        "round": r,
        "index": usable.tolist(),
        "case_id": [store.case_ids[i] for i in usable],
        "selected": store.rounds.selected(r)[usable].tolist(),
        "changed_fraction": _json_floats(changed),
    }
    table.update({name: _json_floats(values) for name, values in scores.items()})
    return table


def log_round_views(tracker: Tracker, store: PseudoLabelStore, r: int, k: int) -> dict[str, Any]:
    """Log round ``r``'s case table and a gallery of the ``k`` most changed and ``k`` least reliable cases.

    The table records the gallery (``gallery``: group -> [{case_id, artifact}]) so the dashboard needs no listing.

    Returns:
        The logged table.
    """
    table = case_table(store, r)
    gallery: dict[str, list[dict[str, str]]] = {group: [] for group in names.GALLERY_GROUPS}
    if k > 0 and table["case_id"]:
        changed = np.array([-math.inf if v is None else v for v in table["changed_fraction"]])
        reliability = np.array([math.inf if v is None else v for v in table["reliability"]])
        picks = {
            "most_changed": np.argsort(-changed, kind="stable")[:k],
            "least_reliable": np.argsort(reliability, kind="stable")[:k],
        }
        rows = np.unique(np.concatenate(list(picks.values())))
        indices = np.asarray(table["index"])[rows]
        images = store.read_images(indices)
        labels = store.rounds.read(r, indices)
        for group, order in picks.items():
            for rank, row in enumerate(order):
                j = int(np.searchsorted(rows, row))
                case_id = table["case_id"][row]
                path = f"{names.GALLERY_DIR.format(r=r)}/{group}_{rank:02d}_{case_id}.png"
                tracker.log_image(
                    overlay_panel(images[j], labels["initial"][j], labels["calibrated"][j]),
                    path,
                )
                gallery[group].append(
                    {
                        "case_id": case_id,
                        "artifact": sanitize_artifact_path(path),
                    }
                )
    table["gallery"] = gallery
    tracker.log_dict(table, names.CASE_TABLE.format(r=r))
    return table


def _json_floats(values: np.ndarray) -> list[float | None]:
    return [round(float(v), 5) if math.isfinite(v) else None for v in values]


