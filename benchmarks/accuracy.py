"""Accuracy benchmark: exemplar-only, plain self-training, consistency, caudo-ray and full supervision, one split.

Every method uses the same split (the data set's own predefined one where meta.csv has a ``split`` column, as ACDC
does; else a seeded group-wise split), the same labelled set, working size and segmenter budget (iterations:
``iterations + rounds * finetune_iterations``), and the project's own code paths:

- ``exemplar_only``: the segmenter trained on the labelled set alone (``rounds.train.train_round_models``);
- ``self_training``: the round loop (``run.coordinator.Coordinator``) with the calibrator and online consistency
  off: offline rounds of pseudo labels, plain self-training;
- ``consistency``: online weak-to-strong consistency on the pool, UniMatch as published (``training.consistency``
  without caudo's guards), the strongest semi-supervised recipe at this budget;
- ``caudo``: the round loop with its defaults;
- ``supervised``: every labelled training case, same budget, zoomed as pseudo-labelled cases are;
  ``supervised_3x``: the same at three times the budget, to show how far the budget limits every method.

Test metrics: per slice (Dice and HD95 at the working size, mean over foreground classes) and, where meta.csv
names each slice's volume and position (ACDC), per volume as ACDC results are published (the volume's slices
stacked in order at their original size; 3D Dice and HD95 per class, then the mean over classes and volumes).
HD95 is in millimetres where every test case has a spacing (slices: the working-size spacing, each case's own
stretched by its resize; volumes: the NIfTI's voxel spacing at the original size) and in pixels (voxels)
otherwise; its keys and the table's columns say which (``hd95_mm`` / ``hd95_px``).
Pseudo-label quality comes from the runs' stores, where the pool's hidden masks are kept apart from the method.
Each round's row also gives the test Dice of the segmenter that made its labels (``round_model_test_dice``, per
volume where there are volumes), so a table shows where along the rounds a method gains or loses.

A labelled set is ``cases:K`` (K cases, e.g. one slice: the one-shot setting) or ``groups:K`` (every labelled
case of K groups: "1 case" of the ACDC tables is one patient's slices). On ACDC the first draw is the published
set (patient099; patient038, patient050, patient099 for three), further draws are seeded.

Usage::

    python benchmarks/accuracy.py --fast                                      # HC18, one exemplar slice
    python benchmarks/accuracy.py                                             # HC18, full profile, 3 exemplars
    python benchmarks/accuracy.py --data ../shared/data/acdc --fast           # ACDC, 1 labelled patient
    python benchmarks/accuracy.py --data ../shared/data/acdc                  # ACDC full: 1 patient, 3 draws
    python benchmarks/accuracy.py --data ../shared/data/acdc --draw 1 --methods exemplar_only caudo  # its 2nd draw
    python benchmarks/accuracy.py --data ../shared/data/acdc --labelled groups:3 --draws 1
    python benchmarks/accuracy.py --data ../shared/data/acdc --labelled cases:1
    python benchmarks/accuracy.py --fast --smoke --limit 12 --work-dir /tmp/acc   # CI smoke test

Prints a table and writes JSON (docs/benchmarks.md, section Accuracy).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caudo_ray import data as D
from caudo_ray.arrays import finite_mean
from caudo_ray.config import RunConfig, load_config, parse_overrides
from caudo_ray.metrics import hd95_of, segmentation_metrics, spearman, volume_metrics
from caudo_ray.networks.bundle import RoundModels, build_models
from caudo_ray.networks.segmenter import predict
from caudo_ray.rounds import guard
from caudo_ray.rounds.train import train_round_models
from caudo_ray.run.baseline import plain_config
from caudo_ray.run.coordinator import Coordinator
from caudo_ray.run.prepare import PreparedRun, load_case, prepare_run
from caudo_ray.store import NO_TRUTH
from caudo_ray.training.inputs import RoundInputs
from caudo_ray.transforms.augment import pseudo_profile

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "hc18"
METHODS = ("exemplar_only", "self_training", "consistency", "caudo", "caudo_uncalibrated", "supervised", "supervised_3x")
# The round loops and the switches that make each one; everything else is the run's config.
LOOPS = {
    "caudo": {"calibrator.enabled": True},
    # The ablation of calibration: caudo's loop, every other switch the same.
    "caudo_uncalibrated": {"calibrator.enabled": False},
    # Plain self-training is the offline loop: its rounds train on the pool only through its pseudo labels.
    "self_training": {"calibrator.enabled": False, "consistency.enabled": False},
}
MARKER = ".accuracy-benchmark"  # a work dir holding this file was made by this script and may be wiped
GROUP_COLUMNS = ("patient", "exam_id", "group")  # the first one meta.csv has is the group column
# meta.csv pixel-size columns (mm) and the factor to the files' resolution: HC18's files are at half resolution
# (../shared/data/hc18/SOURCE.md). ACDC's NIfTI volumes carry their own spacing.
SPACING_COLUMNS = {"pixel_size_mm_at_full_res": 2.0}
# ACDC's published labelled sets (UniMatch's splits; ../shared/data/acdc/SOURCE.md): the first draw uses them.
PUBLISHED_GROUPS = {"acdc": {1: ["patient099"], 3: ["patient038", "patient050", "patient099"]}}
# Supervised must beat exemplar-only by this much for a profile to tell the methods apart.
SEPARATION = 0.05

# Overrides of the run config per profile (dotted keys, as in ``load_config``). Everything else is the defaults.
PROFILES: dict[str, dict[str, Any]] = {
    "fast": {
        "rounds": 2,
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
FAST_ITERATIONS_PER_CLASS = 120  # fast profile: round-0 iterations per foreground class (later rounds: half)
FAST_MIN_AREA = 150  # fast profile: the smallest class's median area in working-size pixels, at least
PROFILE_DRAWS = {"fast": 1, "full": 3}
# The fast profile keeps about this many labelled training cases (whole groups) so it fits in minutes on 2 cores;
# validation and test sets are kept whole. The full profile uses the whole dataset. --limit overrides both.
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
    "consistency.unlabelled_batch_size": 2,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder in the project's layout (default: %(default)s)")
    p.add_argument("--group-column", default=None, help=f"meta.csv column of groups (default: the first of {', '.join(GROUP_COLUMNS)} it has)")
    p.add_argument("--fast", action="store_true", help="fast profile: short training, one draw, a subset of the training cases")
    p.add_argument("--smoke", action="store_true", help="tiny networks and a few iterations on top of the profile (CI)")
    p.add_argument("--labelled", default=None, metavar="KIND:K", help="labelled set per draw: cases:K or groups:K (default: groups:1 for data with volumes, else cases:1)")
    p.add_argument("--exemplars", nargs="+", default=None, help="the labelled case ids (one draw; overrides --labelled)")
    p.add_argument("--draws", type=int, default=None, help="labelled sets drawn (default: 1 fast, 3 full)")
    p.add_argument("--draw", type=int, default=None, metavar="I", help="run only draw I (0-based) of those labelled sets, so a long profile can be split across sessions or machines")
    p.add_argument("--limit", type=int, default=None, help="use only about N labelled training cases (whole groups, drawn with --seed) and N/5 unlabelled; 0: all (default: 240 fast, all full)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="extra run-config override (YAML value), e.g. calibrator.guidance_strength=3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of every method (default: %(default)s)")
    p.add_argument("--work-dir", type=Path, default=None, help="where runs go (default: runs/accuracy-<dataset>-<profile>); wiped if made by this script")
    p.add_argument("--out", type=Path, default=None, help="JSON results (default: <work-dir>/accuracy.json)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to run (default: all)")
    return p.parse_args(argv)


@dataclass
class TestSet:
    """The test cases at the working size, and what per-volume scoring needs."""

    images: np.ndarray
    labels: np.ndarray
    spacing: np.ndarray | None  # (N, 2) mm per working-size pixel; None unless every case has one
    cases: list[D.Case]
    refs: list[D.CaseRef]
    volumes: dict[str, list[int]] = field(default_factory=dict)  # volume id -> indices into the test set, in order
    volume_truth: dict[str, np.ndarray] = field(default_factory=dict)  # volume id -> (D, H, W) at original size
    # volume id -> mm per voxel along (D, H, W); None unless every volume has a slice and pixel spacing
    volume_spacing: dict[str, tuple[float, float, float]] | None = None


@dataclass(frozen=True)
class Source:
    """A benchmark's dataset folder (``--data``) and how its meta.csv reads: groups, volumes, pixel spacing."""

    root: Path
    group_column: str | None
    has_volumes: bool
    spacing: dict[str, Any]  # the data.spacing_column / data.spacing_scale it needs

    @classmethod
    def of(cls, args: argparse.Namespace) -> Source:
        root = args.data.resolve()
        if not (root / "images").is_dir():
            raise SystemExit(f"--data {root}: no images/ folder (expected a dataset folder in the project's layout)")
        header = _meta_header(root)
        spacing_column = next((c for c in SPACING_COLUMNS if c in header), None)
        return cls(
            root,
            args.group_column or next((c for c in GROUP_COLUMNS if c in header), None),
            {"volume", "slice"} <= set(header),
            {"spacing_column": spacing_column, "spacing_scale": SPACING_COLUMNS.get(spacing_column, 1.0)},
        )

    @property
    def name(self) -> str:
        return self.root.name

    def index(self, root: Path | None = None) -> D.DatasetIndex:
        """The cases of this folder, or of a subset of it written to ``root``."""
        return D.index_dataset(root or self.root, group_column=self.group_column, split_column="split", **self.spacing)

    def published_cases(self, args: argparse.Namespace, index: D.DatasetIndex) -> list[str]:
        """The cases of the published labelled groups (the first draw): a subset keeps them whole."""
        kind, _, k = (args.labelled or "").partition(":")
        if kind == "cases" or not self.has_volumes:
            return []
        groups = PUBLISHED_GROUPS.get(self.name.lower(), {}).get(int(k) if k.isdigit() else 1, [])
        return [c for g in groups for c in index.groups.get(g, [])]

    def overrides(self, args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
        """Every run's config overrides: the profile's ``defaults``, then ``--set``, then the threads and the
        pixel-spacing keys this folder needs."""
        overrides = {**defaults, **parse_overrides(args.overrides)}
        overrides["runtime.trainer_cpus"] = overrides["runtime.threads_per_worker"] = args.threads
        overrides.update({f"data.{key}": value for key, value in self.spacing.items()})
        return overrides

    def draws(self, args: argparse.Namespace, index: D.DatasetIndex, base: RunConfig) -> list[tuple[str, list[str]]]:
        """The labelled set of each draw (:func:`_labelled_sets`); a ``--draw`` outside them is refused."""
        draws = _labelled_sets(args, index, self.name, self.has_volumes, base)
        if args.draw is not None and not 0 <= args.draw < len(draws):
            raise SystemExit(f"--draw {args.draw}: the profile draws {len(draws)} labelled sets (0 to {len(draws) - 1})")
        return draws


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    profile = "fast" if args.fast else "full"
    torch.set_num_threads(args.threads)
    source = Source.of(args)
    dataset, group_column = source.name, source.group_column
    work = (args.work_dir or REPO_ROOT / "runs" / f"accuracy-{dataset}-{profile}").resolve()
    _fresh_dir(work)
    limit = PROFILE_LIMIT[profile] if args.limit is None else args.limit
    full_index = source.index()
    data_root = source.root
    if limit:
        keep = (args.exemplars or []) + source.published_cases(args, full_index)
        data_root = _subset_dataset(full_index, work / "data", limit, args.seed, keep)
    index = source.index(data_root)

    overrides = source.overrides(args, {**PROFILES[profile], **(_fast_scale(index) if profile == "fast" else {}), **(SMOKE if args.smoke else {})})
    base = _config(work / "base", data_root, group_column, args.seed, overrides)
    num_classes = D.discover_num_classes(index, sample=64)
    draws = source.draws(args, index, base)

    budget = base.segmenter.iterations + base.rounds * base.segmenter.finetune_iterations
    methods = [m for m in METHODS if m in args.methods]
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    pseudo: list[dict[str, Any]] = []
    test: TestSet | None = None
    data_run: PreparedRun | None = None
    for draw, (kind, labelled) in enumerate(draws):
        if args.draw is not None and draw != args.draw:
            continue
        name = f"draw{draw}"
        print(f"== {name}: {kind} {', '.join(labelled[:4])}{' ...' if len(labelled) > 4 else ''}", flush=True)
        split = _split(index, base, kind, labelled)
        data_run = None
        for method, switches in LOOPS.items():
            if method not in methods:
                continue
            cfg = _config(work / name / method, data_root, group_column, args.seed, {**overrides, **switches})
            _make_work_dir(cfg, split)
            t0 = time.perf_counter()
            run = Coordinator(cfg, progress=False).run()
            wall = time.perf_counter() - t0
            prepared = data_run = _reopen(cfg)
            test = test or _test_set(prepared, index)
            scores = _score(cfg, RoundModels.load(prepared.workspace.final_model_path), test, num_classes)
            kept = {"guard_kept": run.guard.get("kept"), "guard_stopped_at": run.guard.get("regressed_at")}
            results[method].append({"draw": name, "labelled": labelled, "wall_s": wall, **kept, **scores})
            rows = _pseudo_label_rows(prepared.store, name, method, run.rounds)
            for row in rows:  # where along the rounds a method gains or loses on the test set, and what the guard saw
                models = RoundModels.load(prepared.workspace.model_path(row["round"]))
                row["round_model_test_dice"] = _headline(_score(cfg, models, test, num_classes))
                row["exemplar_view_dice"] = models.exemplar_metrics.get("dice", math.nan)
                row["guard_reading"] = guard.reading(models)  # per class, what the drift guard judged
            pseudo += rows
            _print_scores(method, scores, wall)
        # Exemplar-only, consistency and supervised need the labelled set and the pool, not a run: a run's work
        # dir, or a data-only one, gives both (the pool's images and hidden truth in a store, the labelled set).
        cfg = _config(work / name / "data", data_root, group_column, args.seed, overrides)
        if data_run is None:
            _make_work_dir(cfg, split)
            data_run = _reopen(cfg)
        test = test or _test_set(data_run, index)
        _, ex_images, ex_labels = data_run.store.exemplars()
        if "exemplar_only" in methods:
            wall, models = _timed(_train_plain, cfg, RoundInputs(ex_images, ex_labels), budget, data_run.num_classes)
            scores = _score(cfg, models, test, num_classes)
            results["exemplar_only"].append({"draw": name, "labelled": labelled, "wall_s": wall, **scores})
            _print_scores("exemplar_only", scores, wall)
        if "consistency" in methods:
            pool = data_run.store.read_images(np.flatnonzero(data_run.store.usable_mask()))
            wall, models = _timed(_train_plain, cfg, RoundInputs(ex_images, ex_labels, pool_images=pool), budget, data_run.num_classes)
            scores = _score(cfg, models, test, num_classes)
            results["consistency"].append({"draw": name, "labelled": labelled, "wall_s": wall, **scores})
            _print_scores("consistency", scores, wall)

    # The upper bounds do not depend on the labelled set: every labelled training case at the same working size,
    # the same budget and three times that budget; trained once.
    for method, factor in (("supervised", 1), ("supervised_3x", 3)):
        if method not in methods:
            continue
        cfg = _supervised_config(work / method, data_root, group_column, args.seed, overrides, base)
        wall, models, cases = _train_supervised(cfg, data_run, factor * budget)
        scores = _score(cfg, models, test, num_classes)
        results[method].append({"draw": "all", "labelled": [f"{cases} cases"], "wall_s": wall, **scores})
        _print_scores(method, scores, wall)

    report = _report(args, profile, limit, dataset, base, data_root, group_column, draws, index, budget, results, pseudo, num_classes)
    out = args.out or work / "accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, allow_nan=True))
    print(format_table(report))
    print(f"JSON: {out}")
    return report


# ------------------------------------------------------------------------------------------------- the data


def _meta_header(root: Path) -> list[str]:
    meta = root / "meta.csv"
    if not meta.is_file():
        return []
    with meta.open(newline="") as fh:
        return next(csv.reader(fh), [])


def _fresh_dir(work: Path) -> None:
    if work.exists():
        if not (work / MARKER).exists():
            raise SystemExit(f"--work-dir {work} exists and was not made by this benchmark; pick another")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by benchmarks/accuracy.py; wiped on the next run\n")


def _subset_dataset(index: D.DatasetIndex, dest: Path, limit: int, seed: int, keep: list[str]) -> Path:
    """A dataset folder of symlinks to about ``limit`` labelled training cases, taken as whole groups, plus a few
    unlabelled ones; with a predefined split every validation and test case is kept, so the scores stay
    comparable with the full data set's.

    Whole groups keep the subset split-respecting: a group-wise split of it never puts frames of one exam on
    both sides. Groups holding a ``keep`` case are always taken.
    """
    if limit < 5:
        raise SystemExit(f"--limit {limit}: needs at least 5 labelled cases (exemplar, pool, validation, test)")
    predefined = index.predefined or {}
    by_id = index.by_id()
    held_out = {c for c, s in predefined.items() if s in ("val", "test")}
    groups = {g: [c for c in ids if c not in held_out] for g, ids in index.groups.items()}
    labelled_ids = {r.case_id for r in index.labelled} - held_out
    order = sorted(g for g, ids in groups.items() if any(c in labelled_ids for c in ids))
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
    refs = [by_id[c] for g in chosen for c in groups[g] if c in labelled_ids] + [by_id[c] for c in sorted(held_out)]
    refs += index.unlabelled[: max(1, limit // 5)] if index.unlabelled else []
    for ref in refs:
        sub = "images" if ref.labelled else ref.image_path.parent.name
        _link(ref.image_path, dest / sub / ref.image_path.name)
        if ref.mask_path is not None:
            _link(ref.mask_path, dest / "masks" / ref.mask_path.name)
    meta = index.root / "meta.csv"
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


def _fast_scale(index: D.DatasetIndex) -> dict[str, Any]:
    """The fast profile sized to the data: the smallest working size (64, 96 or 128) at which every class keeps a
    usable median area, and round-0 iterations in proportion to the classes to learn.

    A fixed 64x64 profile leaves small structures a few pixels wide and a multi-class model a fraction of the
    iterations it needs, so supervision no longer beats one labelled case and the profile tells nothing.
    """
    sample = index.labelled[:: max(1, len(index.labelled) // 48)][:48]
    areas: dict[int, list[float]] = {}
    for ref in sample:
        [(mask, _)] = D.read_mask(ref.mask_path, nifti_axis=ref.nifti_axis, slice_index=ref.slice_index)
        for c in np.unique(mask[mask > 0]):
            areas.setdefault(int(c), []).append(float(np.mean(mask == c)))
    smallest = min((float(np.median(a)) for a in areas.values()), default=0.25)
    size = next((s for s in (64, 96, 128) if smallest * s * s >= FAST_MIN_AREA), 128)
    iterations = FAST_ITERATIONS_PER_CLASS * max(1, len(areas))
    return {"data.working_size": [size, size], "segmenter.iterations": iterations, "segmenter.finetune_iterations": iterations // 2}


def _labelled_sets(args, index: D.DatasetIndex, dataset: str, has_volumes: bool, base: RunConfig) -> list[tuple[str, list[str]]]:
    """The labelled set of each draw: ``("cases", ids)`` or ``("groups", ids)``."""
    if args.exemplars:
        return [("cases", list(args.exemplars))]
    kind, _, k = (args.labelled or ("groups:1" if has_volumes else "cases:1")).partition(":")
    if kind not in ("cases", "groups") or not k.isdigit() or int(k) < 1:
        raise SystemExit(f"--labelled {args.labelled!r}: expected cases:K or groups:K with K >= 1")
    k = int(k)
    draws = args.draws or PROFILE_DRAWS["fast" if args.fast else "full"]
    # The training side of the split, without a labelled set yet (the seeded split does not depend on it).
    train = _split(index, base, "cases", None)
    train_cases = sorted(set(train.pool) - {r.case_id for r in index.unlabelled} | set(train.exemplars))
    rng = np.random.default_rng([args.seed, 2])
    if kind == "cases":
        if k * draws > len(train_cases):
            raise SystemExit(f"{k * draws} labelled cases asked but the training groups hold {len(train_cases)}")
        picks = rng.choice(len(train_cases), size=k * draws, replace=False)
        if k == 1:
            picks = np.sort(picks)  # one exemplar per draw, in case-id order
        return [("cases", sorted(train_cases[i] for i in picks[d * k : (d + 1) * k])) for d in range(draws)]
    by_id = index.by_id()
    groups = sorted({by_id[c].group for c in train_cases})
    out: list[tuple[str, list[str]]] = []
    published = PUBLISHED_GROUPS.get(dataset.lower(), {}).get(k)
    if published and set(published) <= set(groups):
        out.append(("groups", list(published)))
    left = [g for g in groups if not any(g in chosen for _, chosen in out)]
    order = [left[i] for i in rng.permutation(len(left))]
    while len(out) < draws:
        if len(order) < k:
            raise SystemExit(f"{draws} draws of {k} labelled groups asked but the training split holds {len(groups)} groups")
        out.append(("groups", sorted(order[:k])))
        order = order[k:]
    return out


def _split(index: D.DatasetIndex, base: RunConfig, kind: str, labelled: list[str] | None) -> D.Split:
    s = base.split
    return D.make_split(
        index,
        seed=s.seed,
        val_fraction=s.val_fraction,
        test_fraction=s.test_fraction,
        exemplars=labelled if kind == "cases" else None,
        labelled_groups=labelled if kind == "groups" else None,
    )


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


def _make_work_dir(cfg: RunConfig, split: D.Split) -> None:
    Path(cfg.work_dir).mkdir(parents=True)
    split.to_json(Path(cfg.work_dir) / "split.json")  # the benchmark's split, not one redrawn by the run


def _reopen(cfg: RunConfig) -> PreparedRun:
    """The work dir's store and split, read-only use: the lock taken by ``prepare_run`` is given back at once."""
    prepared = prepare_run(cfg, progress=False)
    prepared.lock.release()
    return prepared


def _test_set(prepared: PreparedRun, index: D.DatasetIndex) -> TestSet:
    refs = {r.case_id: r for r in index.labelled}
    test_refs = [refs[c] for c in prepared.split.test]
    cases = [load_case(ref, prepared.cfg, prepared.num_classes) for ref in test_refs]
    stacked = D.LabelledCases.of(cases, prepared.cfg.data.working_size)
    test = TestSet(stacked.images, stacked.labels, stacked.spacing, cases, test_refs)
    position = {ref.case_id: i for i, ref in enumerate(test_refs)}
    spacing: dict[str, tuple[float, float, float] | None] = {}
    for volume, members in D.volumes_of(test_refs).items():
        test.volumes[volume] = [position[m.case_id] for m in members]
        test.volume_truth[volume] = np.stack(
            [D.read_mask(m.mask_path, nifti_axis=m.nifti_axis, slice_index=m.slice_index)[0][0] for m in members]
        )
        geometry = cases[test.volumes[volume][0]].geometry
        known = geometry.pixel_spacing is not None and geometry.slice_spacing is not None
        spacing[volume] = (geometry.slice_spacing, *geometry.pixel_spacing) if known else None
    if spacing and all(s is not None for s in spacing.values()):
        test.volume_spacing = spacing
    return test


# ---------------------------------------------------------------------------------------------- the methods


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def _train_plain(cfg: RunConfig, inputs: RoundInputs, iterations: int, num_classes: int) -> RoundModels:
    """One segmenter trained for ``iterations`` (exemplar-only, supervised; consistency when ``inputs`` holds the
    pool's images), with the round-0 seed and initial weights of a run."""
    return train_round_models(plain_config(cfg, iterations, pool=inputs.pool_images is not None), 0, inputs, num_classes=num_classes)


def _supervised_config(work_dir: Path, data_root: Path, group_column: str | None, seed: int, overrides: dict[str, Any], base: RunConfig) -> RunConfig:
    """The upper bound's config: every labelled case shows the data's own sizes, as a pseudo-labelled case does, so
    it gets the pseudo labels' zoom range, not the exemplar's wide one (one case standing for every size), unless
    ``overrides`` names one. With the wide one, supervision is held below one labelled patient on ACDC's fast
    profile (volume Dice 0.34 against 0.56)."""
    return _config(work_dir, data_root, group_column, seed, {"segmenter.scale_range": list(pseudo_profile(base.segmenter).zoom), **overrides})


def _train_supervised(cfg: RunConfig, data_run: PreparedRun, iterations: int) -> tuple[float, RoundModels, int]:
    """A segmenter trained on every labelled training case (the labelled set and the pool's hidden masks, where
    they hold foreground): wall seconds, the models and how many cases it saw."""
    store = data_run.store
    labelled = np.flatnonzero(store.usable_mask() & (store.read_truth() != NO_TRUTH).any(axis=(1, 2)))
    _, ex_images, ex_labels = store.exemplars()
    inputs = RoundInputs(np.concatenate([ex_images, store.read_images(labelled)]), np.concatenate([ex_labels, store.read_truth(labelled)]))
    wall, models = _timed(_train_plain, cfg, inputs, iterations, data_run.num_classes)
    return wall, models, len(inputs.exemplar_images)


def _score(cfg: RunConfig, models: RoundModels, test: TestSet, num_classes: int) -> dict[str, Any]:
    """Per-slice metrics at the working size; per-volume metrics at the original size where volumes exist."""
    net, _ = build_models(cfg, models, torch.device("cpu"))
    pred = predict(net, test.images, return_features=False).probs.argmax(1).astype(np.uint8)
    out: dict[str, Any] = {"slice": segmentation_metrics(pred, test.labels, num_classes, spacing=test.spacing)}
    if test.volumes:
        restored = {
            vol: np.stack([D.restore_mask(pred[i], test.cases[i].geometry) for i in idx]) for vol, idx in test.volumes.items()
        }
        out["volume"] = volume_metrics(restored, test.volume_truth, num_classes, spacing=test.volume_spacing)
    return out


def _headline(scores: dict[str, Any]) -> float:
    """The Dice a data set's results are published in: per volume where it has volumes, else per slice."""
    return scores["volume"]["dice"] if "volume" in scores else scores["slice"]["dice"]


def _print_scores(method: str, scores: dict[str, Any], wall: float) -> None:
    hd95, unit = hd95_of(scores["slice"])
    line = f"   {method:14s} slice Dice {scores['slice']['dice']:.4f} HD95 {hd95:.2f} {unit}"
    if "volume" in scores:
        hd95, unit = hd95_of(scores["volume"])
        line += f" | volume Dice {scores['volume']['dice']:.4f} HD95 {hd95:.2f} {unit}"
    print(f"{line}  {wall:.0f} s", flush=True)


def _pseudo_label_rows(store, draw: str, method: str, summaries: list[dict]) -> list[dict[str, Any]]:
    """Per round: pseudo-label Dice before/after calibration against the pool's hidden truth, and score ranks."""
    rows = []
    for r, summary in enumerate(summaries):
        scores = store.rounds.scores(r)
        has = store.usable_mask() & np.isfinite(scores["initial_dice"])
        init, cal = scores["initial_dice"][has], scores["calibrated_dice"][has]
        sel = store.rounds.selected(r)[has]
        rows.append({
            "draw": draw,
            "method": method,
            "round": r,
            "cases": int(has.sum()),
            "initial_dice": float(init.mean()),
            "calibrated_dice": float(cal.mean()),
            "calibration_gain": float(cal.mean() - init.mean()),
            "initial_below_0_5": float((init < 0.5).mean()),
            "calibrated_below_0_5": float((cal < 0.5).mean()),
            "accepted_fraction": finite_mean(scores["accepted"][has]) if "accepted" in scores else math.nan,
            "selected": int(sel.sum()),
            "selected_calibrated_dice": float(cal[sel].mean()) if sel.any() else math.nan,
            "reliability_spearman": spearman(scores["reliability"][has], cal),
            "entropy_spearman": spearman(-scores["entropy"][has], init),
            "val_dice": summary.get("val", {}).get("dice", math.nan),
            **_stage_seconds(summary.get("perf", {}), int(store.usable_mask().sum())),
        })
    return rows


def _stage_seconds(perf: dict[str, float], cases: int) -> dict[str, float]:
    """Where a round's time went, in seconds: segmenter and calibrator training, inference, DDIM, scoring."""
    train, calib = perf.get("train_s", math.nan), perf.get("calibrator_train_s", 0.0)
    return {
        "segmenter_train_s": train - calib,
        "calibrator_train_s": calib,
        **{f"{stage}_s": perf.get(f"{stage}_s_per_case", math.nan) * cases for stage in ("infer", "ddim", "score")},
    }


# ----------------------------------------------------------------------------------------------- the report


def _summary(entries: list[dict[str, Any]], level: str) -> dict[str, Any]:
    dice = np.array([e[level]["dice"] for e in entries])
    hd = np.array([hd95_of(e[level])[0] for e in entries])
    classes = sorted(k for k in entries[0][level] if k.startswith(("dice_class", "hd95_mm_class", "hd95_px_class")))
    return {
        "dice_mean": float(dice.mean()),
        "dice_std": float(dice.std()),
        "dice_per_draw": dice.tolist(),
        "hd95_mean": float(np.nanmean(hd)) if np.isfinite(hd).any() else math.nan,
        "hd95_unit": hd95_of(entries[0][level])[1],
        "per_class_mean": {k: float(np.nanmean([e[level][k] for e in entries])) for k in classes},
    }


def _report(args, profile, limit, dataset, base: RunConfig, data_root, group_column, draws, index, budget, results, pseudo, num_classes) -> dict[str, Any]:
    methods: dict[str, Any] = {}
    for name, entries in results.items():
        if not entries:
            continue
        methods[name] = {
            "slice": _summary(entries, "slice"),
            **({"volume": _summary(entries, "volume")} if "volume" in entries[0] else {}),
            "wall_s": float(np.mean([e["wall_s"] for e in entries])),
            "draws": entries,
        }
    level = "volume" if any("volume" in m for m in methods.values()) else "slice"
    gap = None
    if "supervised" in methods and "exemplar_only" in methods:
        gap = methods["supervised"][level]["dice_mean"] - methods["exemplar_only"][level]["dice_mean"]
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
        "num_classes": num_classes,
        "labelled_sets": [{"kind": kind, "ids": ids} for kind, ids in draws],
        "only_draw": args.draw,
        "split": {"predefined": index.predefined is not None, "train_labelled": sum(1 for r in index.labelled if (index.predefined or {}).get(r.case_id, "train") == "train")},
        "training_budget_iterations": budget,
        "config": {k: v for k, v in base.to_dict().items() if k in ("rounds", "segmenter", "calibrator", "consistency", "selection")},
        "metric_level": level,
        "methods": methods,
        "supervised_minus_exemplar_only": gap,
        "separates_methods": None if gap is None else bool(gap >= SEPARATION),
        "pseudo_labels": pseudo,
        "reliability_spearman": float(np.mean(rel)) if rel else math.nan,
        "calibration_ablation": _calibration_ablation(methods, pseudo, level),
        "machine": {"threads": args.threads, "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__},
    }


def _calibration_ablation(methods: dict[str, Any], pseudo: list[dict[str, Any]], level: str) -> dict[str, Any] | None:
    """What calibration buys: caudo against the same loop without it, per draw, and what it costs in time.

    The time share is the calibrator's training plus DDIM (with the scoring that only calibration needs, the
    revert's second reliability pass, inside ``score_s``) over the whole run's wall time.
    """
    if not {"caudo", "caudo_uncalibrated"} <= set(methods):
        return None
    with_cal = {e["draw"]: e for e in methods["caudo"]["draws"]}
    without = {e["draw"]: e for e in methods["caudo_uncalibrated"]["draws"]}
    draws = []
    for draw in sorted(set(with_cal) & set(without)):
        rows = {m: [r for r in pseudo if r["draw"] == draw and r["method"] == m] for m in ("caudo", "caudo_uncalibrated")}
        stage = {m: {k: float(sum(r[k] for r in rs)) for k in ("segmenter_train_s", "calibrator_train_s", "infer_s", "ddim_s", "score_s")} for m, rs in rows.items()}
        wall = with_cal[draw]["wall_s"]
        calibration_s = stage["caudo"]["calibrator_train_s"] + stage["caudo"]["ddim_s"] + stage["caudo"]["score_s"] - stage["caudo_uncalibrated"]["score_s"]
        draws.append({
            "draw": draw,
            "dice_caudo": with_cal[draw][level]["dice"],
            "dice_uncalibrated": without[draw][level]["dice"],
            "difference": with_cal[draw][level]["dice"] - without[draw][level]["dice"],
            "wall_s_caudo": wall,
            "wall_s_uncalibrated": without[draw]["wall_s"],
            "stage_s": stage,
            "calibration_s": calibration_s,
            "calibration_share_of_wall": calibration_s / wall if wall > 0 else math.nan,
        })
    return {"draws": draws, "mean_difference": float(np.mean([d["difference"] for d in draws])) if draws else math.nan}


def format_table(report: dict[str, Any]) -> str:
    level = report["metric_level"]
    first = next(iter(report["methods"].values()))
    units = {lvl: first[lvl]["hd95_unit"] if lvl in first else "" for lvl in ("slice", "volume")}
    sets = "; ".join(f"{s['kind']} {', '.join(s['ids'][:3])}{'...' if len(s['ids']) > 3 else ''}" for s in report["labelled_sets"])
    lines = [
        (
            f"accuracy ({report['profile']}{' smoke' if report['smoke'] else ''}) on {report['dataset']}, "
            f"{report['working_size'][0]}x{report['working_size'][1]}, budget {report['training_budget_iterations']} iterations, labelled: {sets}"
        ),
        f"{'method':18s} {'slice Dice':>16s} {'slice HD95 ' + units['slice']:>13s} {'volume Dice':>16s} {'volume HD95 ' + units['volume']:>14s} {'wall s':>8s}",
    ]
    for name, m in report["methods"].items():
        s, v = m["slice"], m.get("volume")
        vol = f"{v['dice_mean']:.4f} ± {v['dice_std']:.4f}" if v else "-"
        vol_hd = f"{v['hd95_mean']:.2f}" if v else "-"
        lines.append(f"{name:18s} {s['dice_mean']:.4f} ± {s['dice_std']:.4f} {s['hd95_mean']:>13.2f} {vol:>16s} {vol_hd:>14s} {m['wall_s']:>8.0f}")
    classes = sorted({k for m in report["methods"].values() for k in m[level]["per_class_mean"] if k.startswith("dice_class")})
    if len(classes) > 1:
        lines.append(f"{level} Dice per class: " + "  ".join(f"{name} " + "/".join(f"{m[level]['per_class_mean'][c]:.3f}" for c in classes) for name, m in report["methods"].items()))
    lines.append(f"{'method':18s} {'draw':>6s} {'round':>5s} {'initial':>8s} {'calibr.':>8s} {'gain':>7s} {'accepted':>8s} {'rel.rho':>8s} {'ent.rho':>8s} {'test':>7s}")
    for row in report["pseudo_labels"]:
        lines.append(
            f"{row['method']:18s} {row['draw']:>6s} {row['round']:>5d} {row['initial_dice']:>8.4f} {row['calibrated_dice']:>8.4f} "
            f"{row['calibration_gain']:>+7.4f} {row['accepted_fraction']:>8.2f} {row['reliability_spearman']:>8.3f} {row['entropy_spearman']:>8.3f} "
            f"{row['round_model_test_dice']:>7.4f}"
        )
    lines.append(f"reliability Spearman (caudo, mean over rounds): {report['reliability_spearman']:.3f}")
    ablation = report.get("calibration_ablation")
    for d in (ablation or {}).get("draws", []):
        st = d["stage_s"]["caudo"]
        lines.append(
            f"calibration on {d['draw']}: caudo {d['dice_caudo']:.4f} - uncalibrated {d['dice_uncalibrated']:.4f} = {d['difference']:+.4f}; "
            f"wall {d['wall_s_caudo']:.0f} s against {d['wall_s_uncalibrated']:.0f} s; calibration {d['calibration_s']:.0f} s "
            f"({100 * d['calibration_share_of_wall']:.0f}%: calibrator training {st['calibrator_train_s']:.0f} s, DDIM {st['ddim_s']:.0f} s, "
            f"scoring {st['score_s'] - d['stage_s']['caudo_uncalibrated']['score_s']:.0f} s more)"
        )
    if report["separates_methods"] is False:
        lines.append(
            f"WARNING: this profile is too small to separate the methods: supervised beats exemplar-only by only "
            f"{report['supervised_minus_exemplar_only']:+.3f} {level} Dice (< {SEPARATION}); use the full profile or a larger --limit"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
