"""The drift guard's readings of a finished run, view by view: is a drop real, and on which class?

The guard (``caudo_ray.rounds.guard``) compares each segmenter's mean Dice on the run's 64 augmented exemplar views
with the best one's before it. This reads every saved segmenter of a run again on the same views, keeps each view's
Dice, and prints per class and on the mean how far each segmenter is from the best earlier one, with the standard
error of that paired difference over the views, and whether the run's ``guard`` tolerances stop there (switched on,
for a run that ran without the guard). It is how docs/method.md tells a round that traded one structure's fit for
the others' from noise.

Usage::

    python benchmarks/guard_readings.py RUN_DIR [--out JSON]

``RUN_DIR`` is a run's work dir (``config.yaml``, ``store.zarr``, ``models/``), e.g. a ``caudo`` or
``caudo_uncalibrated`` run of ``benchmarks/accuracy.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caudo_ray.config import load_config
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.networks.segmenter import build_segmenter
from caudo_ray.rounds import guard
from caudo_ray.rounds.train import exemplar_check_views, exemplar_view_scores
from caudo_ray.store import PseudoLabelStore
from caudo_ray.workspace import Workspace


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a finished run's work dir")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: <run_dir>/guard_readings.json)")
    return p.parse_args(argv)


def segmenters(ws: Workspace, rounds: int) -> list[tuple[str, Path]]:
    """The run's segmenters in training order, as the guard judged them: each round's, then the final one."""
    found = [(f"round {r}", ws.model_path(r)) for r in range(rounds) if ws.model_path(r).exists()]
    final = ws.trained_final_path if ws.trained_final_path.exists() else ws.final_model_path
    if len(found) == rounds and final.exists():
        found.append(("final", final))
    return found


def read_run(run_dir: Path) -> dict[str, Any]:
    """Per-view exemplar Dice of every segmenter of the run, and each one's paired drop from the best before it."""
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise SystemExit(f"{config_path}: no such file (expected a run's work dir)")
    cfg = load_config(config_path)
    ws = Workspace(run_dir, cfg.runtime.store_url)  # the run's own dir, wherever it has moved since
    store = PseudoLabelStore.open(ws.store_url, mode="r")
    ids, images, labels = store.exemplars()
    first = [i for i, case in enumerate(ids) if case not in store.annotations]  # the split's, not the answers
    views = exemplar_check_views(cfg, images[first], labels[first])
    found = segmenters(ws, cfg.rounds)
    if not found:
        raise SystemExit(f"{ws.models_dir}: no round models (has the run trained round 0?)")
    judge_with = dataclasses.replace(cfg.guard, enabled=True)
    scores, history = [], []
    for _, path in found:
        models = RoundModels.load(path)
        net = build_segmenter(cfg.segmenter, models.num_classes)
        net.load_state_dict(models.segmenter)
        net.eval()
        per_view = {k: v for k, v in exemplar_view_scores(net, *views, models.num_classes, device=torch.device("cpu")).items() if k != "dice"}
        scores.append(per_view)
        history.append({k: float(v.mean()) for k, v in per_view.items()})
    rows = []
    for i, (name, path) in enumerate(found):
        verdict = guard.judge(history[: i + 1], judge_with)
        row: dict[str, Any] = {"segmenter": name, "file": str(path), "reading": history[i], "mean": guard.mean_reading(history[i])}
        if i:
            best = guard.best_before(history[: i + 1])
            diffs = {k: scores[best][k] - scores[i][k] for k in scores[i]}
            diffs["mean"] = np.mean([diffs[k] for k in scores[i]], axis=0)
            row["against"] = found[best][0]
            row["drop"] = {k: float(d.mean()) for k, d in diffs.items()}
            row["drop_se"] = {k: float(d.std(ddof=1) / math.sqrt(len(d))) for k, d in diffs.items()}
        row["guard_stops"] = verdict.regressed
        rows.append(row)
    tolerances = {"tolerance": cfg.guard.tolerance, "class_tolerance": cfg.guard.class_tolerance}
    return {"run_dir": str(run_dir), "views": len(views[0]), "guard_enabled": cfg.guard.enabled, "guard": tolerances, "segmenters": rows}


def format_table(report: dict[str, Any]) -> str:
    """One line per segmenter: its reading per class and on the mean, and its paired drop (standard error)."""
    classes = sorted(report["segmenters"][0]["reading"])
    head = ["segmenter", *classes, "mean", "against", *(f"drop {c}" for c in [*classes, "mean"]), "guard stops"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for row in report["segmenters"]:
        cells = [row["segmenter"], *(f"{row['reading'][c]:.3f}" for c in classes), f"{row['mean']:.3f}", row.get("against", "-")]
        for c in [*classes, "mean"]:
            cells.append(f"{row['drop'][c]:+.3f} ({row['drop_se'][c]:.3f})" if "drop" in row else "-")
        cells.append("yes" if row["guard_stops"] else "no")
        lines.append(" | ".join(cells))
    return f"{report['run_dir']}: {report['views']} exemplar views, guard {report['guard']}\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report = read_run(args.run_dir.resolve())
    print(format_table(report))
    out = args.out or args.run_dir / "guard_readings.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
