"""Accuracy benchmark: exemplar-only, plain self-training, caudo-ray and fully supervised on one split.

Every method uses the same group-wise split (pool / validation / test), the same exemplar, working size and
training budget (segmenter iterations: ``iterations + rounds * finetune_iterations``), and the project's own code
paths: the two self-training methods run :class:`caudo_ray.coordinator.Coordinator` with the local executor
(plain self-training is the same loop with ``calibrator.enabled = False``); exemplar-only and supervised call
:func:`caudo_ray.method.train_round_models`; all are scored by :func:`caudo_ray.method.evaluate` (MONAI Dice and
HD95) on the test split. Pseudo-label quality comes from the runs' pseudo-label stores, where the pool's hidden
masks are kept apart from the method.

Usage::

    python benchmarks/accuracy.py --fast --out runs/accuracy-fast.json
    python benchmarks/accuracy.py --exemplars 693_HC 010_HC 200_HC --out runs/accuracy-full.json
    python benchmarks/accuracy.py --fast --smoke --limit 24 --work-dir /tmp/acc   # CI smoke test
    python benchmarks/accuracy.py --methods caudo --set calibrator.accept_gate=true   # one method, one setting

Prints a table and writes JSON (see ``docs/benchmarks.md``, section Accuracy).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caudo_ray import data as D
from caudo_ray.config import RunConfig, load_config
from caudo_ray.metrics import spearman
from caudo_ray.networks.bundle import RoundModels, build_models
from caudo_ray.rounds.train import evaluate, train_round_models
from caudo_ray.run.coordinator import Coordinator
from caudo_ray.run.prepare import load_labelled, prepare_run
from caudo_ray.store import NO_TRUTH
from caudo_ray.training.inputs import RoundInputs

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "hc18"
METHODS = ("exemplar_only", "self_training", "caudo", "supervised")
MARKER = ".accuracy-benchmark"  # a work dir holding this file was made by this script and may be wiped

# Overrides of the run config per profile (dotted keys, as in ``load_config``). Everything else is the defaults.
PROFILES: dict[str, dict[str, Any]] = {
    "fast": {
        "data.working_size": [64, 64],
        "rounds": 2,
        "segmenter.iterations": 120,
        "segmenter.finetune_iterations": 60,
        "calibrator.autoencoder_iterations": 300,
        "calibrator.denoiser_iterations": 1200,
        "selection.fractions": [0.5, 0.75],
    },
    "full": {
        "data.working_size": [128, 128],
        "rounds": 3,
        "segmenter.iterations": 1000,
        "segmenter.finetune_iterations": 400,
        "calibrator.autoencoder_iterations": 300,
        "calibrator.denoiser_iterations": 1200,
        "selection.fractions": [0.5, 0.75, 1.0],
    },
}
PROFILE_EXEMPLARS = {"fast": 1, "full": 3}
# The fast profile keeps about this many labelled cases (whole exam groups) so it fits in 5 minutes on 2 shared
# cores; the full profile uses the whole dataset. --limit overrides both.
PROFILE_LIMIT = {"fast": 240, "full": None}
# --smoke: tiny networks and budgets on top of a profile, so a CI run on a handful of cases takes seconds.
SMOKE: dict[str, Any] = {
    "data.working_size": [32, 32],
    "rounds": 2,
    "segmenter.channels": [4, 8, 16],
    "segmenter.strides": [2, 2],
    "segmenter.num_res_units": 0,
    "segmenter.iterations": 4,
    "segmenter.finetune_iterations": 2,
    "segmenter.batch_size": 4,
    "calibrator.block_out_channels": [8, 16],
    "calibrator.autoencoder_iterations": 3,
    "calibrator.denoiser_iterations": 3,
    "calibrator.batch_size": 4,
    "calibrator.inference_steps": 4,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder in the project's layout (default: %(default)s)")
    p.add_argument("--group-column", default=None, help="meta.csv column for group-wise splits (default: exam_id if meta.csv has it, else each file is its own group)")
    p.add_argument("--fast", action="store_true", help="fast profile: 64x64, 2 rounds, short training, one exemplar (< 5 min on 2 cores)")
    p.add_argument("--smoke", action="store_true", help="tiny networks and a few iterations on top of the profile (CI)")
    p.add_argument("--exemplars", nargs="+", default=None, help="exemplar case ids (default: drawn with --seed from the training groups)")
    p.add_argument("--num-exemplars", type=int, default=None, help="exemplars to draw when --exemplars is not given (default: 1 fast, 3 full)")
    p.add_argument("--limit", type=int, default=None, help="use only about N labelled cases (whole groups, drawn with --seed) plus N/5 unlabelled ones; 0: all (default: 240 fast, all full)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="extra run-config override (YAML value), e.g. calibrator.guidance_strength=3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s; on a shared 2-core machine more threads spin against other processes and run slower)")
    p.add_argument("--work-dir", type=Path, default=None, help="where runs go (default: runs/accuracy-<profile> in the repo); wiped if made by this script")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: <work-dir>/accuracy.json)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run (default: all four)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    profile = "fast" if args.fast else "full"
    torch.set_num_threads(args.threads)
    data_root = args.data.resolve()
    if not (data_root / "images").is_dir():
        raise SystemExit(f"--data {data_root}: no images/ folder (expected a dataset folder in the project's layout)")
    group_column = args.group_column if args.group_column is not None else _default_group_column(data_root)
    work = (args.work_dir or REPO_ROOT / "runs" / f"accuracy-{profile}").resolve()
    _fresh_dir(work)
    limit = PROFILE_LIMIT[profile] if args.limit is None else args.limit
    if limit:
        data_root = _subset_dataset(data_root, work / "data", limit, group_column, args.seed, args.exemplars or [])

    overrides = {**PROFILES[profile], **(SMOKE if args.smoke else {}), **_parse_overrides(args.overrides)}
    base = _config(work / "base", data_root, group_column, args.seed, overrides)
    index = D.index_dataset(data_root, group_column=group_column)
    split = D.make_split(index, seed=args.seed, val_fraction=base.split.val_fraction, test_fraction=base.split.test_fraction)
    train_cases = sorted(set(split.pool) - {r.case_id for r in index.unlabelled} | set(split.exemplars))
    exemplars = args.exemplars or _draw_exemplars(train_cases, args.num_exemplars or PROFILE_EXEMPLARS[profile], args.seed)
    unknown = [e for e in exemplars if e not in train_cases]
    if unknown:
        raise SystemExit(f"--exemplars {unknown}: not labelled training cases of this split (val/test cases or unknown ids)")

    budget = base.segmenter.iterations + base.rounds * base.segmenter.finetune_iterations
    methods = [m for m in METHODS if m in args.methods]
    results: dict[str, Any] = {m: {"test_dice_per_exemplar": [], "test_hd95_per_exemplar": [], "wall_s_per_exemplar": [], "per_class": []} for m in methods}
    pseudo: list[dict[str, Any]] = []
    test_images = test_labels = None
    for e in exemplars:
        print(f"== exemplar {e}", flush=True)
        e_split = D.Split(
            exemplars=[e],
            pool=sorted((set(train_cases) - {e}) | {r.case_id for r in index.unlabelled}),
            val=split.val,
            test=split.test,
            seed=split.seed,
            group_column=split.group_column,
        )
        prepared = None
        for method, calibrated in (("caudo", True), ("self_training", False)):
            if method not in methods:
                continue
            cfg = _config(work / e / method, data_root, group_column, args.seed, {**overrides, "calibrator.enabled": calibrated, "split.exemplars": [e]})
            _make_work_dir(cfg, e_split)
            t0 = time.perf_counter()
            run = Coordinator(cfg, progress=False).run()
            wall = time.perf_counter() - t0
            prepared = prepare_run(cfg, progress=False)
            if test_images is None:
                test_images, test_labels = load_labelled(prepared, split.test)
            metrics = _evaluate_models(cfg, RoundModels.load(prepared.workspace.final_model_path), test_images, test_labels)
            _record(results[method], metrics, wall)
            pseudo += _pseudo_label_rows(prepared.store, e, method, run.rounds)
            print(f"   {method:14s} test Dice {metrics['dice']:.4f}  HD95 {metrics['hd95']:.2f}  {wall:.0f} s", flush=True)

        if prepared is None:  # neither self-training method ran: a work dir only for the exemplar and test images
            cfg = _config(work / e / "data", data_root, group_column, args.seed, {**overrides, "split.exemplars": [e]})
            _make_work_dir(cfg, e_split)
            prepared = prepare_run(cfg, progress=False)
        num_classes = prepared.num_classes
        if test_images is None:
            test_images, test_labels = load_labelled(prepared, split.test)
        _, ex_images, ex_labels = prepared.store.exemplars()
        if "exemplar_only" not in methods:
            continue
        cfg = _config(work / e / "exemplar_only", data_root, group_column, args.seed, {**overrides, "calibrator.enabled": False, "segmenter.iterations": budget})
        t0 = time.perf_counter()
        models = train_round_models(cfg, 0, RoundInputs(ex_images, ex_labels), num_classes=num_classes)
        wall = time.perf_counter() - t0
        metrics = _evaluate_models(cfg, models, test_images, test_labels)
        _record(results["exemplar_only"], metrics, wall)
        print(f"   {'exemplar_only':14s} test Dice {metrics['dice']:.4f}  HD95 {metrics['hd95']:.2f}  {wall:.0f} s", flush=True)

    if "supervised" in methods:
        # The upper bound does not depend on the exemplar: every labelled training case, the exemplar included,
        # at the same working size and budget; trained once.
        store = prepared.store
        labelled = np.flatnonzero(store.usable_mask() & (store.read_truth() != NO_TRUTH).any(axis=(1, 2)))
        images = np.concatenate([ex_images, store.read_images(labelled)])
        labels = np.concatenate([ex_labels, store.read_truth(labelled)])
        cfg = _config(work / "supervised", data_root, group_column, args.seed, {**overrides, "calibrator.enabled": False, "segmenter.iterations": budget})
        t0 = time.perf_counter()
        models = train_round_models(cfg, 0, RoundInputs(images, labels), num_classes=num_classes)
        wall = time.perf_counter() - t0
        metrics = _evaluate_models(cfg, models, test_images, test_labels)
        _record(results["supervised"], metrics, wall)
        results["supervised"]["train_cases"] = len(images)
        print(f"   {'supervised':14s} test Dice {metrics['dice']:.4f}  HD95 {metrics['hd95']:.2f}  {wall:.0f} s ({len(images)} cases)", flush=True)

    report = _report(args, limit, profile, base, data_root, group_column, exemplars, split, len(train_cases), budget, results, pseudo)
    out = args.out or work / "accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, allow_nan=True))
    print(format_table(report))
    print(f"JSON: {out}")
    return report


def _default_group_column(root: Path) -> str | None:
    meta = root / "meta.csv"
    if not meta.is_file():
        return None
    with meta.open(newline="") as fh:
        header = next(csv.reader(fh), [])
    return "exam_id" if "exam_id" in header else None


def _fresh_dir(work: Path) -> None:
    if work.exists():
        if not (work / MARKER).exists():
            raise SystemExit(f"--work-dir {work} exists and was not made by this benchmark; pick another")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by benchmarks/accuracy.py; wiped on the next run\n")


def _subset_dataset(root: Path, dest: Path, limit: int, group_column: str | None, seed: int, keep: list[str]) -> Path:
    """A dataset folder of symlinks to about ``limit`` labelled cases, taken as whole groups, plus a few unlabelled.

    Whole groups keep the subset split-respecting: the benchmark's group-wise split then never puts frames of
    one exam on both sides. Groups holding a ``keep`` case are always taken.
    """
    if limit < 5:
        raise SystemExit(f"--limit {limit}: needs at least 5 labelled cases (exemplar, pool, validation, test)")
    index = D.index_dataset(root, group_column=group_column)
    groups = index.groups
    labelled_ids = {r.case_id for r in index.labelled}
    by_id = index.by_id()
    order = sorted(groups)
    order = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    forced = [by_id[c].group for c in keep if c in by_id]
    chosen: list[str] = []
    count = 0
    for g in forced + order:
        members = [c for c in groups[g] if c in labelled_ids]
        if g in chosen or not members or (count >= limit and g not in forced):
            continue
        chosen.append(g)
        count += len(members)
    refs = [by_id[c] for g in chosen for c in groups[g] if c in labelled_ids]
    refs += index.unlabelled[: max(1, limit // 5)] if index.unlabelled else []
    for ref in refs:
        sub = "images" if ref.labelled else ref.image_path.parent.name
        _link(ref.image_path, dest / sub / ref.image_path.name)
        if ref.mask_path is not None:
            _link(ref.mask_path, dest / "masks" / ref.mask_path.name)
    meta = root / "meta.csv"
    if meta.is_file():
        names = {r.image_path.name for r in refs}
        with meta.open(newline="") as src, (dest / "meta.csv").open("w", newline="") as out:
            reader = csv.DictReader(src)
            writer = csv.DictWriter(out, fieldnames=reader.fieldnames or [])
            writer.writeheader()
            writer.writerows(row for row in reader if row.get("filename") in names)
    return dest


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src.resolve())


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _config(work_dir: Path, data_root: Path, group_column: str | None, seed: int, overrides: dict[str, Any]) -> RunConfig:
    raw = {
        "work_dir": str(work_dir),
        "seed": seed,
        "device": "cpu",
        "data": {"path": str(data_root), "group_column": group_column},
        "split": {"seed": seed},
        "runtime": {"use_ray": False, "batch_size": 64},
        "tracking": {"num_overlays": 0},
    }
    return load_config(raw, overrides)


def _draw_exemplars(train_cases: list[str], n: int, seed: int) -> list[str]:
    if n > len(train_cases):
        raise SystemExit(f"{n} exemplars asked but the training groups hold {len(train_cases)} labelled cases")
    picks = np.random.default_rng([seed, 2]).choice(len(train_cases), size=n, replace=False)
    return [train_cases[i] for i in sorted(picks.tolist())]


def _evaluate_models(cfg: RunConfig, models: RoundModels, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    net, _ = build_models(cfg, models, torch.device("cpu"))
    return evaluate(net, images, labels, models.num_classes)


def _make_work_dir(cfg: RunConfig, e_split: D.Split) -> None:
    Path(cfg.work_dir).mkdir(parents=True)
    e_split.to_json(Path(cfg.work_dir) / "split.json")  # the shared split, not one redrawn around the exemplar


def _record(entry: dict[str, Any], metrics: dict[str, Any], wall: float) -> None:
    entry["test_dice_per_exemplar"].append(metrics["dice"])
    entry["test_hd95_per_exemplar"].append(metrics["hd95"])
    entry["wall_s_per_exemplar"].append(wall)
    entry["per_class"].append({k: v for k, v in metrics.items() if k.startswith(("dice_class", "hd95_class"))})
    dice = np.asarray(metrics["dice_per_case"])
    entry.setdefault("test_cases_dice_below_0_5", []).append(int((dice < 0.5).sum()))


def _pseudo_label_rows(store, exemplar: str, method: str, summaries: list[dict]) -> list[dict[str, Any]]:
    """Per round: pseudo-label Dice before/after calibration against the pool's hidden truth, and score ranks."""
    rows = []
    for r, summary in enumerate(summaries):
        scores = store.rounds.scores(r)
        has = store.usable_mask() & np.isfinite(scores["initial_dice"])
        init, cal = scores["initial_dice"][has], scores["calibrated_dice"][has]
        sel = store.rounds.selected(r)[has]
        rows.append({
            "exemplar": exemplar,
            "method": method,
            "round": r,
            "cases": int(has.sum()),
            "initial_dice": float(init.mean()),
            "calibrated_dice": float(cal.mean()),
            "initial_below_0_5": float((init < 0.5).mean()),
            "calibrated_below_0_5": float((cal < 0.5).mean()),
            "accepted_fraction": float(scores["accepted"][has].mean()) if method == "caudo" else math.nan,
            "selected": int(sel.sum()),
            "selected_calibrated_dice": float(cal[sel].mean()) if sel.any() else math.nan,
            "reliability_spearman": spearman(scores["reliability"][has], cal),
            "entropy_spearman": spearman(-scores["entropy"][has], init),
            "val_dice": summary.get("val", {}).get("dice", math.nan),
        })
    return rows


def _report(args, limit, profile, base: RunConfig, data_root, group_column, exemplars, split, n_train, budget, results, pseudo) -> dict[str, Any]:
    methods = {}
    for name, entry in results.items():
        dice, hd = np.asarray(entry["test_dice_per_exemplar"]), np.asarray(entry["test_hd95_per_exemplar"])
        methods[name] = {
            "test_dice_mean": float(dice.mean()),
            "test_dice_std": float(dice.std()),
            "test_hd95_mean": float(np.nanmean(hd)) if np.isfinite(hd).any() else math.nan,
            "wall_s": float(np.mean(entry["wall_s_per_exemplar"])),
            **entry,
        }
    caudo_rows = [row for row in pseudo if row["method"] == "caudo"]
    rel = [row["reliability_spearman"] for row in caudo_rows if np.isfinite(row["reliability_spearman"])]
    return {
        "dataset": str(args.data),
        "data_used": str(data_root),
        "group_column": group_column,
        "profile": profile,
        "smoke": bool(args.smoke),
        "limit": limit or None,
        "working_size": list(base.data.working_size),
        "exemplars": list(exemplars),
        "split": {"seed": split.seed, "train_labelled": n_train, "pool": len(split.pool), "val": len(split.val), "test": len(split.test)},
        "training_budget_iterations": budget,
        "config": {k: v for k, v in base.to_dict().items() if k in ("rounds", "segmenter", "calibrator", "selection")},
        "methods": methods,
        "pseudo_labels": pseudo,
        "reliability_spearman": float(np.mean(rel)) if rel else math.nan,
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__},
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [
        f"accuracy ({report['profile']}{' smoke' if report['smoke'] else ''}) on {report['dataset']}, {report['working_size'][0]}x{report['working_size'][1]}, "
        f"exemplars {', '.join(report['exemplars'])}, budget {report['training_budget_iterations']} iterations",
        f"{'method':15s} {'test Dice':>16s} {'HD95 (px)':>10s} {'wall s':>8s}",
    ]
    for name, m in report["methods"].items():
        spread = f"{m['test_dice_mean']:.4f} ± {m['test_dice_std']:.4f}"
        lines.append(f"{name:15s} {spread:>16s} {m['test_hd95_mean']:>10.2f} {m['wall_s']:>8.0f}")
    lines.append(f"{'method':15s} {'exemplar':>10s} {'round':>5s} {'initial':>8s} {'calibr.':>8s} {'accepted':>8s} {'rel.rho':>8s} {'ent.rho':>8s}")
    for row in report["pseudo_labels"]:
        lines.append(
            f"{row['method']:15s} {row['exemplar']:>10s} {row['round']:>5d} {row['initial_dice']:>8.4f} {row['calibrated_dice']:>8.4f} "
            f"{row['accepted_fraction']:>8.2f} {row['reliability_spearman']:>8.3f} {row['entropy_spearman']:>8.3f}"
        )
    lines.append(f"reliability Spearman (caudo, mean over rounds): {report['reliability_spearman']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
