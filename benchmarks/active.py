"""Active-learning benchmark: what each annotation buys, by query strategy, against supervision at the same budget.

A simulated annotator stands in for the person: a run starts from one labelled set (one exemplar slice on HC18,
one patient on ACDC, as the accuracy benchmark draws them) and, after each committed round, the annotator answers
the run's top-k queries of one strategy (``selection.query_strategy``: reliability, random, entropy, diverse) with
the hidden true masks of the training split. It writes each answer into the run's ``annotations/`` folder through
the coordinator's ``on_round_committed`` hook, in the data set's own mask format and geometry, and the answers join
the labelled set at the next round. With ``--budgets 1 2 4 8`` a run has four rounds: rounds 0-3 train with 0, 1, 2
and 4 answers, and the final segmenter (the one the run serves) with 8 (1, 1, 2 and 4 answered after rounds 0-3).
Each of these segmenters is scored on the test set, so every strategy gives test Dice against annotations made:
per slice on HC18, per volume on ACDC (``accuracy._score``).

Every strategy runs with the same split, labelled set, seed, rounds and iteration budget; supervised is
``accuracy``'s upper bound (every labelled training case) at the same segmenter budget. The drift guard is off:
a guard stop would end one strategy's rounds before its annotations are spent and leave the others' unmatched.
The pool holds only cases with a mask (the data set's unlabelled images are left out), so every query can be
answered, and an empty answer (an ACDC slice past the heart) is a true one (``annotations.allow_empty``); an answer
the run refuses stops the benchmark. What each strategy ranks by, and which cases are never asked for:
``caudo_ray.labelling.selection``.

The report gives, per strategy, test Dice at each number of annotations (mean over draws), the answers made, and
the annotations needed to reach 0.95 x supervised; a plot of the same (PNG beside the JSON).

Usage::

    python benchmarks/active.py --fast                                   # HC18, CI-sized, all four strategies
    python benchmarks/active.py --data ../shared/data/acdc               # ACDC full profile, 3 draws
    python benchmarks/active.py --strategy random --draw 1 --no-supervised --out runs/active-random-d1.json
    python benchmarks/active.py --merge runs/active-*.json --out docs/results/active-hc18-full.json

Prints a table and writes JSON and a PNG plot (docs/benchmarks.md, section "Active learning").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

# Run as a script from anywhere: the repo root holds the benchmarks package this script shares its protocol with.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.accuracy import (
    DEFAULT_DATA,
    GROUP_COLUMNS,
    SEPARATION,
    SMOKE,
    Source,
    _config,
    _fresh_dir,
    _headline,
    _make_work_dir,
    _reopen,
    _score,
    _split,
    _subset_dataset,
    _supervised_config,
    _test_set,
    _train_supervised,
)
from benchmarks.accuracy import PROFILES as ACCURACY_PROFILES
from caudo_ray import data as D
from caudo_ray.config import QUERY_STRATEGIES
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.rounds.steps import annotation_queries
from caudo_ray.run.coordinator import Coordinator
from caudo_ray.store import PseudoLabelStore

DEFAULT_BUDGETS = (1, 2, 4, 8)
TARGET_FRACTION = 0.95  # "annotations to reach 0.95 x supervised"
# What every profile needs for the annotator's answers to count: see the module docstring.
ANSWERING = {"guard.enabled": False, "annotations.allow_empty": True}
# Overrides of the run config per profile (dotted keys); ``rounds`` follows from --budgets.
PROFILES: dict[str, dict[str, Any]] = {
    # Small enough for CI (well under 2 minutes for four strategies on 2 cores): 32x32, tiny networks.
    "fast": {
        # accuracy's --smoke networks (rounds follow from --budgets), with budgets that learn something
        **{k: v for k, v in SMOKE.items() if k != "rounds"},
        "segmenter.iterations": 60,
        "segmenter.finetune_iterations": 30,
        "calibrator.autoencoder_iterations": 10,
        "calibrator.denoiser_iterations": 10,
        "selection.fractions": [0.5, 0.75, 1.0],
        **ANSWERING,
    },
    "full": {**{k: v for k, v in ACCURACY_PROFILES["full"].items() if k != "rounds"}, **ANSWERING},
}
PROFILE_LIMIT = {"fast": 40, "full": None}  # labelled training cases kept (whole groups); None: all


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder in the project's layout (default: %(default)s)")
    p.add_argument("--group-column", default=None, help=f"meta.csv column of groups (default: the first of {', '.join(GROUP_COLUMNS)} it has)")
    p.add_argument("--fast", action="store_true", help="CI-sized profile: 32x32, tiny networks, about 40 training cases")
    p.add_argument("--strategy", dest="strategies", action="append", choices=QUERY_STRATEGIES, default=None, help="a query strategy to run (repeatable; default: all)")
    p.add_argument("--budgets", type=int, nargs="+", default=list(DEFAULT_BUDGETS), help="annotations made before each later round, increasing (default: %(default)s)")
    p.add_argument("--labelled", default=None, metavar="KIND:K", help="the starting labelled set: cases:K or groups:K (default: groups:1 for data with volumes, else cases:1)")
    p.add_argument("--draws", type=int, default=None, help="labelled sets drawn (default: 1 fast, 3 full)")
    p.add_argument("--draw", type=int, default=None, metavar="I", help="run only draw I (0-based), so the full profile fits in pieces")
    p.add_argument("--limit", type=int, default=None, help="about N labelled training cases, whole groups (default: 40 fast, all full; 0: all)")
    p.add_argument("--no-supervised", dest="supervised", action="store_false", help="skip the supervised upper bound (a piece another piece gives it to)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="extra run-config override (YAML value)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    p.add_argument("--work-dir", type=Path, default=None, help="where runs go (default: runs/active-<dataset>-<profile>); wiped if made by a benchmark")
    p.add_argument("--out", type=Path, default=None, help="JSON results; the plot goes beside it as .png (default: <work-dir>/active.json)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON", help="combine piece JSONs of one profile into one report (--out names it); runs nothing")
    p.set_defaults(exemplars=None)  # accuracy's labelled-set drawing reads it
    args = p.parse_args(argv)
    if args.budgets != sorted(set(args.budgets)) or args.budgets[0] < 1:
        p.error(f"--budgets {args.budgets}: expected increasing positive numbers of annotations")
    if any(item.partition("=")[0].strip() == "rounds" for item in args.overrides):
        p.error("--set rounds: the rounds follow from --budgets (one per number of annotations before the last)")
    return args


@dataclass
class SimulatedAnnotator:
    """Answers a run's queries after each committed round with the data set's own masks (the coordinator's
    ``on_round_committed`` hook).

    Attributes:
        strategy: the query strategy it is asked by.
        schedule: answers to make after round r (``schedule[r]``), one entry per round.
        refs: case id -> the data set's case, whose mask is the answer.
        groups: case id -> group (exam, patient).
        annotations_dir: the run's annotations folder.
        seed: the run's seed (the random strategy draws from it and the round).
        answers: what it answered: round, case id, group and the scores that ranked it.
    """

    strategy: str
    schedule: list[int]
    refs: dict[str, D.CaseRef]
    groups: dict[str, str]
    annotations_dir: Path
    seed: int
    answers: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, r: int, store: PseudoLabelStore) -> None:
        k = self.schedule[r]
        answered = [a["case_id"] for a in self.answers]
        queries = annotation_queries(store, r, k, strategy=self.strategy, groups=self.groups, answered=answered, seed=self.seed)
        if len(queries) < k:
            raise SystemExit(f"round {r}: {self.strategy} found {len(queries)} cases to ask for, {k} needed: the pool is too small for --budgets")
        for q in queries:
            # The data set's own mask file is the answer a person would give: its format and geometry, and for a
            # slice of a volume the whole label volume, from which the run takes the slice the case names.
            mask_path = self.refs[q.case_id].mask_path
            shutil.copyfile(mask_path, self.annotations_dir / f"{q.case_id}{D.file_extension(mask_path)}")
            self.answers.append({"round": r, **dataclasses.asdict(q)})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        report = merge([json.loads(p.read_text()) for p in args.merge])
        return _write(report, args.out or args.merge[0].with_name("active-merged.json"))
    profile = "fast" if args.fast else "full"
    torch.set_num_threads(args.threads)
    source = Source.of(args)
    dataset, group_column, has_volumes = source.name, source.group_column, source.has_volumes
    work = (args.work_dir or REPO_ROOT / "runs" / f"active-{dataset}-{profile}").resolve()
    _fresh_dir(work)
    limit = PROFILE_LIMIT[profile] if args.limit is None else args.limit
    # Only cases the annotator can answer: the unlabelled images stay out of the pool.
    full_index = dataclasses.replace(source.index(), unlabelled=[])
    data_root = _subset_dataset(full_index, work / "data", limit or len(full_index.labelled), args.seed, source.published_cases(args, full_index))
    index = source.index(data_root)
    refs = index.by_id()
    groups = {c: ref.group for c, ref in refs.items()}

    schedule = [b - a for a, b in zip([0, *args.budgets], args.budgets)]
    answers_at_round = [0, *args.budgets]
    overrides = source.overrides(args, {**PROFILES[profile], "rounds": len(args.budgets)})
    base = _config(work / "base", data_root, group_column, args.seed, overrides)
    num_classes = D.discover_num_classes(index, sample=64)
    draws = source.draws(args, index, base)
    budget = base.segmenter.iterations + base.rounds * base.segmenter.finetune_iterations
    strategies = [s for s in QUERY_STRATEGIES if s in (args.strategies or QUERY_STRATEGIES)]

    results: dict[str, list[dict[str, Any]]] = {s: [] for s in strategies}
    data_run = test = None
    for d, (kind, labelled) in enumerate(draws):
        if args.draw is not None and d != args.draw:
            continue
        name = f"draw{d}"
        print(f"== {name}: {kind} {', '.join(labelled[:4])}{' ...' if len(labelled) > 4 else ''}", flush=True)
        split = _split(index, base, kind, labelled)
        for strategy in strategies:
            cfg = _config(work / name / strategy, data_root, group_column, args.seed, {**overrides, "selection.query_strategy": strategy})
            _make_work_dir(cfg, split)
            annotator = SimulatedAnnotator(strategy, schedule, refs, groups, Path(cfg.work_dir) / "annotations", cfg.seed)
            t0 = time.perf_counter()
            run = Coordinator(cfg, progress=False, on_round_committed=annotator).run()
            wall = time.perf_counter() - t0
            prepared = _reopen(cfg)
            refused = {a["case_id"] for a in annotator.answers} - set(prepared.store.annotations)
            if refused or len(run.rounds) != cfg.rounds:
                raise SystemExit(f"{cfg.work_dir}: {len(run.rounds)} of {cfg.rounds} rounds ran; answers not taken in: {sorted(refused)} ({run.skipped})")
            test = test or _test_set(prepared, index)
            ws = prepared.workspace
            points = []  # rounds 0..R-1, then the final segmenter (round R), which trained with every answer
            for r, path in enumerate([*map(ws.model_path, range(cfg.rounds)), ws.final_model_path]):
                scores = _score(cfg, RoundModels.load(path), test, num_classes)
                points.append({"answers": answers_at_round[r], "round": r, "dice": _headline(scores), **scores})
            results[strategy].append({"draw": name, "labelled": labelled, "wall_s": wall, "points": points, "answers": annotator.answers})
            print(f"   {strategy:12s} " + "  ".join(f"{p['answers']}: {p['dice']:.4f}" for p in points) + f"  {wall:.0f} s", flush=True)
        if data_run is None:
            # A data-only work dir: its store holds the pool's hidden masks and the first labelled set, no answers.
            data_cfg = _config(work / name / "data", data_root, group_column, args.seed, overrides)
            _make_work_dir(data_cfg, split)
            data_run = _reopen(data_cfg)

    supervised = None
    if args.supervised and data_run is not None:
        # Every labelled training case, the same segmenter budget as each strategy's run; trained once.
        cfg = _supervised_config(work / "supervised", data_root, group_column, args.seed, overrides, base)
        wall, models, cases = _train_supervised(cfg, data_run, budget)
        scores = _score(cfg, models, test, num_classes)
        supervised = {"cases": cases, "wall_s": wall, "dice": _headline(scores), **scores}
        print(f"   {'supervised':12s} {supervised['dice']:.4f} ({cases} cases)  {wall:.0f} s", flush=True)

    report = {
        "benchmark": "active",
        "dataset": str(args.data),
        "data_used": str(data_root),
        "group_column": group_column,
        "profile": profile,
        "limit": limit or None,
        "working_size": list(base.data.working_size),
        "num_classes": num_classes,
        "metric_level": "volume" if has_volumes else "slice",
        "budgets": args.budgets,
        "labelled_sets": [{"kind": kind, "ids": ids} for kind, ids in draws],
        "only_draw": args.draw,
        "training_budget_iterations": budget,
        "config": {k: v for k, v in base.to_dict().items() if k in ("seed", "rounds", "segmenter", "calibrator", "consistency", "selection", "guard")},
        "strategies": {s: {"draws": entries} for s, entries in results.items()},
        "supervised": supervised,
        "machine": {"threads": args.threads, "platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__},
    }
    return _write(summarise(report), args.out or work / "active.json")


# ----------------------------------------------------------------------------------------------- the report


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Adds, per strategy, test Dice at each number of annotations (mean over draws) and the annotations needed
    to reach :data:`TARGET_FRACTION` of supervised; and the issue's targets where their strategies ran."""
    sup = (report.get("supervised") or {}).get("dice")
    for s in report["strategies"].values():
        by_answers: dict[int, list[float]] = {}
        for entry in s["draws"]:
            for p in entry["points"]:
                by_answers.setdefault(p["answers"], []).append(p["dice"])
        s["dice_by_answers"] = {str(n): float(np.mean(v)) for n, v in sorted(by_answers.items())}
        reached = [int(n) for n, v in s["dice_by_answers"].items() if sup is not None and v >= TARGET_FRACTION * sup]
        s["annotations_to_reach"] = min(reached) if reached else None
    report["target_fraction"] = TARGET_FRACTION
    report["targets"] = _targets(report["strategies"], sup)
    # Supervision must beat the rounds before any answer for "annotations to reach it" to mean anything.
    before = [s["dice_by_answers"]["0"] for s in report["strategies"].values() if "0" in s["dice_by_answers"]]
    report["separates"] = None if sup is None or not before else bool(sup - max(before) >= SEPARATION)
    return report


def _targets(strategies: dict[str, Any], sup: float | None) -> dict[str, Any]:
    """The issue's targets, each where the strategies it compares ran (None where they did not)."""
    dice = {name: s["dice_by_answers"] for name, s in strategies.items()}
    rel, rnd, ent = dice.get("reliability"), dice.get("random"), dice.get("entropy")
    # Round 0 is the same run for every strategy (nothing answered yet): the comparison starts at one annotation.
    answered = [n for n in set(rel or {}) & set(ent or {}) if n != "0"]
    return {
        "reliability_4_vs_random_8": [rel["4"], rnd["8"]] if rel and rnd and "4" in rel and "8" in rnd else None,
        "reliability_beats_entropy_at_every_budget": all(rel[n] > ent[n] for n in answered) if answered else None,
        "reliability_8_over_supervised": rel["8"] / sup if rel and "8" in rel and sup else None,
    }


def merge(pieces: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from pieces run a strategy or a draw at a time: their draws side by side, supervised from the
    piece that trained it. Pieces must share data set, profile, budgets and config.

    Raises:
        SystemExit: the pieces differ in what they measured, or two hold the same strategy's draw.
    """
    first = pieces[0]
    for key in ("dataset", "profile", "budgets", "working_size", "config", "labelled_sets"):
        for p in pieces[1:]:
            if p[key] != first[key]:
                raise SystemExit(f"--merge: the pieces differ in {key} ({first[key]!r} against {p[key]!r})")
    merged = {**first, "only_draw": None, "strategies": {}, "supervised": next((p["supervised"] for p in pieces if p["supervised"]), None)}
    for p in pieces:
        for name, s in p["strategies"].items():
            have = merged["strategies"].setdefault(name, {"draws": []})["draws"]
            for entry in s["draws"]:
                if any(e["draw"] == entry["draw"] for e in have):
                    raise SystemExit(f"--merge: {name} {entry['draw']} is in two pieces")
                have.append(entry)
    for s in merged["strategies"].values():
        s["draws"].sort(key=lambda e: e["draw"])
    merged["strategies"] = {name: merged["strategies"][name] for name in QUERY_STRATEGIES if name in merged["strategies"]}
    return summarise(merged)


def format_table(report: dict[str, Any]) -> str:
    level = report["metric_level"]
    counts = ["0", *map(str, report["budgets"])]
    sup = report.get("supervised")
    draws = sorted({e["draw"] for s in report["strategies"].values() for e in s["draws"]})
    size = "x".join(map(str, report["working_size"]))
    lines = [
        (
            f"active learning ({report['profile']}) on {report['dataset']}, {size}, {level} Dice against annotations made, "
            f"mean over {', '.join(draws)}; segmenter budget {report['training_budget_iterations']} iterations"
        ),
        f"{'strategy':12s} " + " ".join(f"{n + ' ann.':>8s}" for n in counts) + f" {'to reach ' + str(report['target_fraction']) + ' x sup.':>22s}",
    ]
    for name, s in report["strategies"].items():
        row = " ".join(f"{s['dice_by_answers'][n]:>8.4f}" if n in s["dice_by_answers"] else f"{'-':>8s}" for n in counts)
        reach = s["annotations_to_reach"]
        lines.append(f"{name:12s} {row} {('not within ' + counts[-1]) if reach is None and sup else (reach if reach is not None else '-'):>22}")
    if sup:
        lines.append(f"supervised   {sup['dice']:.4f} ({sup['cases']} labelled cases, same budget); {report['target_fraction']} x = {report['target_fraction'] * sup['dice']:.4f}")
    t = report["targets"]
    if t["reliability_4_vs_random_8"]:
        r4, r8 = t["reliability_4_vs_random_8"]
        lines.append(f"target: reliability with 4 ({r4:.4f}) >= random with 8 ({r8:.4f}): {'met' if r4 >= r8 else 'missed'}")
    if t["reliability_beats_entropy_at_every_budget"] is not None:
        lines.append(f"target: reliability above entropy at every budget: {'met' if t['reliability_beats_entropy_at_every_budget'] else 'missed'}")
    if t["reliability_8_over_supervised"] is not None:
        lines.append(f"reliability with 8 annotations / supervised: {t['reliability_8_over_supervised']:.3f}")
    if report["separates"] is False:
        lines.append(
            f"WARNING: supervised is not {SEPARATION} above the rounds before any answer: this profile cannot say what "
            "annotations buy (use the full profile)"
        )
    for name, s in report["strategies"].items():
        for entry in s["draws"]:
            asked = ", ".join(f"{a['case_id']}({a['group']})" for a in entry["answers"])
            lines.append(f"  {name} {entry['draw']} answered: {asked}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """Test Dice against annotations made, one line per strategy, supervised and its target fraction as rules."""
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.add_subplot()
    for name, s in report["strategies"].items():
        counts = [int(n) for n in s["dice_by_answers"]]
        ax.plot(counts, list(s["dice_by_answers"].values()), marker="o", label=name)
    sup = report.get("supervised")
    if sup:
        ax.axhline(sup["dice"], color="black", lw=1, label=f"supervised ({sup['cases']} cases)")
        ax.axhline(report["target_fraction"] * sup["dice"], color="black", lw=1, ls="--", label=f"{report['target_fraction']} x supervised")
    ax.set_xscale("symlog", base=2, linthresh=1)
    ax.set_xticks([0, *report["budgets"]], labels=[str(n) for n in [0, *report["budgets"]]])
    ax.set_xlabel("annotations made")
    ax.set_ylabel(f"test {report['metric_level']} Dice")
    ax.set_title(f"{Path(report['dataset']).name}, {report['profile']} profile")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _write(report: dict[str, Any], out: Path) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, allow_nan=True))
    png = plot(report, out.with_suffix(".png"))
    print(format_table(report))
    print(f"JSON: {out}\nplot: {png}")
    return report


if __name__ == "__main__":
    main()
