"""Tune benchmark: a search over guidance strength w and calibration strength s on HC18, and how well the
no-truth proxy (mean reliability of the calibrated labels) agrees with true pseudo-label Dice across configs.

The search runs ``caudo_ray.tune.run_tune`` with ``tune.objective: proxy`` on a seeded sample of the pool, whose
cases carry hidden truth on HC18, so every trial reports both its proxy and the true Dice of the same calibrated
labels. Early stopping is off here (``grace_period = max_t``): the agreement is measured on fully evaluated
configs. The shared round-0 weights are trained once; the saving is what training them per trial would cost.

Usage::

    python -m benchmarks.tune_search --fast --out runs/tune-fast.json
    python -m benchmarks.tune_search --out runs/tune-full.json

Prints a table and writes JSON (see ``docs/benchmarks.md``, section Tune).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Run as a script from anywhere: the repo root holds the benchmarks package this script shares helpers with.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.accuracy import (
    DEFAULT_DATA,
    MARKER,
    _default_group_column,
    _subset_dataset,
)
from caudo_ray.config import load_config, parse_overrides
from caudo_ray.distributed.tune import format_trials, run_tune
from caudo_ray.metrics import spearman
from caudo_ray.tracking.names import PARAM_GUIDANCE, PARAM_STRENGTH

PROFILES: dict[str, dict[str, Any]] = {
    "fast": {
        "data.working_size": [64, 64],
        "segmenter.iterations": 120,
        "calibrator.autoencoder_iterations": 300,
        "calibrator.denoiser_iterations": 1200,
        "tune.guidance_strength": {"grid": [0.0, 1.0, 2.0, 4.0]},
        "tune.calibration_strength": {"grid": [0.6, 1.0]},
        "tune.inference_steps": {"grid": [6]},
        "tune.eval_cases": 64,
    },
    "full": {
        "data.working_size": [128, 128],
        "segmenter.iterations": 1000,
        "calibrator.autoencoder_iterations": 300,
        "calibrator.denoiser_iterations": 1200,
        "tune.guidance_strength": {"grid": [0.0, 1.0, 2.0, 3.0, 4.0, 6.0]},
        "tune.calibration_strength": {"grid": [0.4, 0.6, 0.8, 1.0]},
        "tune.inference_steps": {"grid": [6]},
        "tune.eval_cases": 256,
    },
}
PROFILE_LIMIT = {"fast": 160, "full": None}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="dataset folder in the project's layout (default: %(default)s)",
    )
    p.add_argument(
        "--fast",
        action="store_true",
        help="64x64, short training, 8 configs on 64 pool cases (< 10 min on 2 cores)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="about N labelled cases (whole groups); 0: all (default: 160 fast, all full)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra run-config override (YAML value)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="default: runs/tune-<profile>; wiped if made by a benchmark",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON results (default: <work-dir>/tune.json)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    profile = "fast" if args.fast else "full"
    torch.set_num_threads(1)
    data_root = args.data.resolve()
    if not (data_root / "images").is_dir():
        raise SystemExit(f"--data {data_root}: no images/ folder (expected a dataset folder in the project's layout)")
    group_column = _default_group_column(data_root)
    work = (args.work_dir or REPO_ROOT / "runs" / f"tune-{profile}").resolve()
    if work.exists():
        if not (work / MARKER).exists():
            raise SystemExit(f"--work-dir {work} exists and was not made by a benchmark; pick another")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by benchmarks/tune_search.py; wiped on the next run\n")
    limit = PROFILE_LIMIT[profile] if args.limit is None else args.limit
    if limit:
        data_root = _subset_dataset(data_root, work / "data", limit, group_column, args.seed, [])

    overrides = {
        **PROFILES[profile],
        "work_dir": str(work / "run"),
        "seed": args.seed,
        "data.path": str(data_root),
        "data.group_column": group_column,
        "split.seed": args.seed,
        "tune.objective": "proxy",
        "tune.seed": args.seed,
        "runtime.use_ray": True,
        **parse_overrides(args.overrides),
    }
    cfg = load_config(None, overrides)
    # Every config fully evaluated: the agreement is measured on final values over the same cases.
    cfg.tune.grace_period = cfg.tune.max_t or int(np.ceil(cfg.tune.eval_cases / cfg.tune.eval_batch_size))

    t0 = time.perf_counter()
    result = run_tune(cfg, progress=False)
    wall = time.perf_counter() - t0

    rows = [t for t in result.trials if "dice" in t.metrics]
    proxy = np.array([t.metrics["proxy"] for t in rows])
    dice = np.array([t.metrics["dice"] for t in rows])
    by_dice = max(rows, key=lambda t: t.metrics["dice"])
    report = {
        "profile": profile,
        "data": str(args.data),
        "limit": limit,
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "config": {
            k: v for k, v in overrides.items() if k.startswith(("tune.", "segmenter.", "calibrator.", "data.working"))
        },
        "configs": len(result.trials),
        "eval_cases": result.eval_cases,
        "spearman_proxy_vs_dice": spearman(proxy, dice),
        "pseudo_dice": {
            "min": float(dice.min()),
            "max": float(dice.max()),
            "spread": float(dice.max() - dice.min()),
            "initial": rows[0].metrics.get("initial_dice"),
        },
        "best_by_proxy": {
            "params": result.best.params,
            "proxy": result.best.metrics["proxy"],
            "dice": result.best.metrics.get("dice"),
        },
        "best_by_dice": {
            "params": by_dice.params,
            "proxy": by_dice.metrics["proxy"],
            "dice": by_dice.metrics["dice"],
        },
        "wall_s": wall,
        "search_s": result.search_s,
        "shared_train_s": result.shared_train_s,
        "train_saved_s": result.train_saved_s,
        "tune": result.to_dict(),
    }
    out = args.out or work / "tune.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, allow_nan=True))
    print(format_trials(result.trials, result.objective, result.best))
    print(format_table(report))
    print(f"JSON: {out}")
    return report


def format_table(report: dict[str, Any]) -> str:
    bp, bd = report["best_by_proxy"], report["best_by_dice"]
    pd = report["pseudo_dice"]

    def ws(params: dict) -> str:
        return f"w={params[PARAM_GUIDANCE]:g} s={params[PARAM_STRENGTH]:g}"

    lines = [
        f"configs: {report['configs']} on {report['eval_cases']} pool cases ({report['profile']})",
        f"pseudo-label Dice across configs: {pd['min']:.4f} .. {pd['max']:.4f} (spread {pd['spread']:.4f}; uncalibrated {pd['initial']:.4f})",
        f"best by true Dice: {ws(bd['params'])}  Dice {bd['dice']:.4f}  proxy {bd['proxy']:.4f}",
        f"best by proxy:     {ws(bp['params'])}  Dice {bp['dice']:.4f}  proxy {bp['proxy']:.4f}",
        f"Spearman(proxy, true Dice) over configs: {report['spearman_proxy_vs_dice']:.3f}",
        (
            f"wall {report['wall_s']:.0f} s (search {report['search_s']:.0f} s); shared training "
            f"{report['shared_train_s']:.1f} s once, saving {report['train_saved_s']:.0f} s vs. training per trial"
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
