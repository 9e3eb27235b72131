"""``caudo-ray`` command line: run, tune, demo, predict, export, export-model, queries, annotate, data inspect, dashboard.

Exit status: 0 done; 3 done, but some input files were skipped (listed in the log and in MLflow); 2 the config
or the command line was refused before any work started; 1 the run failed; 130 stopped by Ctrl-C (SIGINT), 143
stopped by SIGTERM: the MLflow run is marked KILLED, the local Ray shut down, the lock released, and the same
command resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import signal
import sys
from importlib import resources
from pathlib import Path

from caudo_ray.config import QUERY_STRATEGIES, ConfigError, RunConfig, load_config, parse_overrides
from caudo_ray.data import file_stem, format_report, inspect_dataset
from caudo_ray.deploy.from_run import final_provenance, final_segmenter
from caudo_ray.deploy.mlflow_model import save_mlflow_model
from caudo_ray.deploy.monai_bundle import write_monai_bundle
from caudo_ray.distributed.cluster import shutdown_ray
from caudo_ray.distributed.executor import RayExecutor
from caudo_ray.distributed.tune import format_trials, run_tune
from caudo_ray.errors import DataError, StoreError
from caudo_ray.inference import predict_folder
from caudo_ray.rounds.guard import mean_reading
from caudo_ray.rounds.steps import annotation_queries
from caudo_ray.run.annotations import annotate, answer_files
from caudo_ray.run.baseline import METHODS as BASELINE_METHODS
from caudo_ray.run.baseline import train_baseline
from caudo_ray.run.calibrate_dataset import calibrate_dataset
from caudo_ray.run.coordinator import Coordinator, RunResult
from caudo_ray.run.prepare import answer_rules, index_of
from caudo_ray.run.queries import export_queries
from caudo_ray.store import PseudoLabelStore, export_round
from caudo_ray.tracking.report import DashboardError, build_dashboard
from caudo_ray.tracking.tracker import sqlite_tracking_uri
from caudo_ray.workspace import Workspace

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_SKIPPED = 0, 1, 2, 3
EXPORT_FORMATS = ("monai-bundle", "mlflow")


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGINT or SIGTERM), raised in the main thread so a run unwinds the way Ctrl-C unwinds it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    except (DataError, StoreError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as err:
        signum = err.signum if isinstance(err, Stopped) else signal.SIGINT
        shutdown_ray()
        command = shlex.join(["caudo-ray", *(sys.argv[1:] if argv is None else argv)])
        print(
            f"caudo-ray: stopped by {signal.Signals(signum).name}; what was stored is kept. Resume with: {command}",
            file=sys.stderr,
        )
        return 128 + signum
    finally:
        shutdown_ray()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(signum: int, frame) -> None:
    """The first stop signal unwinds the run; more while it cleans up (MLflow, Ray, the lock) are ignored."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="caudo-ray", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run or resume a self-training run")
    _run_options(run)
    run.set_defaults(func=cmd_run)

    tune = sub.add_parser("tune", help="Ray Tune search over guidance strength, calibration strength and DDIM steps")
    _run_options(tune, allow_no_ray=False)  # trials are Ray Tune trials: a search always runs on Ray
    tune.set_defaults(func=cmd_tune)

    base = sub.add_parser("baseline", help="train one baseline segmenter at a run's budget: consistency, exemplar_only, supervised")
    base.add_argument("--method", required=True, choices=BASELINE_METHODS, help="which baseline")
    _run_options(base, allow_no_ray=False)  # one segmenter in this process: Ray plays no part
    base.set_defaults(func=cmd_baseline)

    demo = sub.add_parser("demo", help="self-training on the embedded phantoms (what `make demo` runs)")
    _run_options(demo, config_required=False)
    demo.set_defaults(func=cmd_demo)

    calib = sub.add_parser("calibrate", help="label and calibrate a new dataset with a finished run's models")
    calib.add_argument("--run", required=True, help="work dir of a finished self-training run")
    calib.add_argument("--data", required=True, help="dataset folder (images/, optional unlabeled/)")
    calib.add_argument("--out", required=True, help="output folder: store.zarr and labels/")
    calib.add_argument("--format", choices=["source", "png", "nifti"], default="source")
    calib.add_argument("--no-ray", action="store_true", help="run in this process, without Ray")
    calib.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto, or host:6379)")
    calib.add_argument("--quiet", action="store_true", help="no progress bars")
    calib.set_defaults(func=cmd_calibrate)

    pred = sub.add_parser("predict", help="segment a folder of images with a finished run's final model")
    pred.add_argument("--work-dir", required=True, help="work dir of a finished run")
    pred.add_argument("inputs", type=Path, help="folder of images (PNG, JPEG, NIfTI, DICOM) and DICOM series subfolders")
    pred.add_argument("output", type=Path, help="folder for the masks (same names and formats)")
    pred.add_argument(
        "--dicom-seg", action="store_true", help="also write each DICOM series' mask as a DICOM SEG (<folder>.seg.dcm)"
    )
    pred.set_defaults(func=cmd_predict)

    model = sub.add_parser("export-model", help="write a finished run's final segmenter as a MONAI bundle or an MLflow Model")
    model.add_argument("--work-dir", required=True, help="work dir of a finished run")
    model.add_argument("--format", choices=EXPORT_FORMATS, default="monai-bundle")
    model.add_argument("output", type=Path, help="folder to write (an MLflow Model needs a new or empty one)")
    model.set_defaults(func=cmd_export_model)

    exp = sub.add_parser("export", help="write a round's labels as files at each case's original geometry")
    exp.add_argument("--work-dir", required=True)
    exp.add_argument("--round", type=int, default=None, help="round (default: the last committed)")
    exp.add_argument("--which", choices=["calibrated", "initial"], default="calibrated")
    exp.add_argument("--format", choices=["source", "png", "nifti"], default="source")
    exp.add_argument("--selected-only", action="store_true", help="only the cases selected for training")
    exp.add_argument("output", type=Path)
    exp.set_defaults(func=cmd_export)

    q = sub.add_parser("queries", help="the cases to annotate next (selection.query_strategy: a seeded random draw by default)")
    q.add_argument("--work-dir", required=True)
    q.add_argument("--round", type=int, default=None)
    q.add_argument("-k", type=int, default=None, help="how many (default: selection.num_queries)")
    q.add_argument("--strategy", choices=QUERY_STRATEGIES, default=None, help="how to choose them (default: selection.query_strategy)")
    q.add_argument("--json", action="store_true")
    q.add_argument(
        "--export", type=Path, default=None, metavar="DIR", help="write each query's image and its current label to correct, with a manifest"
    )
    q.set_defaults(func=cmd_queries)

    ann = sub.add_parser("annotate", help="give answers to queries (masks named <case_id>.<ext>); they join the run's next round")
    ann.add_argument("--work-dir", required=True)
    ann.add_argument("answers", type=Path, help="folder of masks, e.g. the masks/ of `queries --export`")
    ann.add_argument("--annotator", default=None, help="who answered (default: your user name)")
    ann.add_argument("--replace", action="store_true", help="replace earlier answers for the same cases (their records are kept)")
    ann.set_defaults(func=cmd_annotate)

    data = sub.add_parser("data", help="dataset utilities")
    data_sub = data.add_subparsers(required=True, metavar="ACTION")
    ins = data_sub.add_parser("inspect", help="counts, sizes, classes, groups and problems of a dataset folder")
    ins.add_argument("path", type=Path)
    ins.add_argument("--group-column", default=None, help="meta.csv column of groups (default: group, or exam_id)")
    ins.add_argument("--json", action="store_true")
    ins.set_defaults(func=cmd_inspect)

    dash = sub.add_parser("dashboard", help="build the label-quality dashboard of MLflow runs (HTML + report run)")
    which = dash.add_mutually_exclusive_group()
    which.add_argument("--run-id", action="append", default=None, help="a source run (repeat for several)")
    which.add_argument("--experiment", default=None, help="every self-training run and Tune search of an experiment")
    where = dash.add_mutually_exclusive_group()
    where.add_argument("--tracking-uri", default=None, help="MLflow tracking URI of the runs")
    where.add_argument("--work-dir", default=None, help="a run's work dir: its MLflow store (and run, without --run-id)")
    dash.add_argument(
        "--out", type=Path, default=None, help="HTML file to write (default: <work dir>/dashboard.html, else ./dashboard.html)"
    )
    dash.set_defaults(func=cmd_dashboard)
    return p


def _run_options(p: argparse.ArgumentParser, config_required: bool = False, allow_no_ray: bool = True) -> None:
    p.add_argument("--config", type=Path, default=None, help="YAML run config")
    p.add_argument("--work-dir", default=None, help="overrides work_dir")
    p.add_argument("--data", default=None, help="dataset folder (overrides data.path)")
    p.add_argument("--group-column", default=None, help="overrides data.group_column")
    if allow_no_ray:
        p.add_argument("--no-ray", action="store_true", help="run in this process, without Ray")
    p.add_argument("--address", default=None, help="Ray cluster to join (e.g. auto, or host:6379)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in the work dir)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key, e.g. calibrator.guidance_strength=2"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace, base: str | Path | dict | None = None) -> RunConfig:
    """The run config: ``--config`` (or ``base``), then ``--set`` overrides, then the dedicated flags."""
    overrides = parse_overrides(args.set)
    flags = {
        "work_dir": args.work_dir,
        "data.path": args.data,
        "data.group_column": args.group_column,
        "runtime.address": args.address,
        "tracking.tracking_uri": args.tracking_uri,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if getattr(args, "no_ray", False):
        overrides["runtime.use_ray"] = False
    return load_config(args.config if args.config is not None else base, overrides)


def demo_config_path() -> Path:
    return Path(str(resources.files("caudo_ray") / "configs" / "demo.yaml"))


def cmd_run(args: argparse.Namespace) -> int:
    return _run(config_from_args(args), progress=not args.quiet)[0]


def cmd_tune(args: argparse.Namespace) -> int:
    result = run_tune(config_from_args(args), progress=not args.quiet)
    print(format_trials(result.trials, result.objective, result.best))
    print(f"best {result.objective}: {result.best.metrics['objective']:.4f} with {result.best.params}")
    print(
        f"shared round-0 weights: {result.shared_train_s:.1f} s {'(reused)' if result.models_reused else 'trained once'}; "
        f"saved {result.train_saved_s:.1f} s of per-trial training"
    )
    print(f"MLflow parent run {result.parent_run_id} in {result.tracking_uri}")
    return EXIT_OK


def cmd_baseline(args: argparse.Namespace) -> int:
    result = train_baseline(config_from_args(args), args.method, progress=not args.quiet)
    how = "reused" if result["reused"] else f"trained {result['iterations']} iterations"
    print(f"baseline {result['method']}: {how}; final model {result['model_path']}")
    if result["val_metrics"]:
        print("segmenter on validation:", {k: round(v, 4) for k, v in result["val_metrics"].items()})
    if result["skipped"]:
        print(f"completed with {len(result['skipped'])} skipped input(s):", file=sys.stderr)
        for source, reason in sorted(result["skipped"].items()):
            print(f"  {source}: {reason}", file=sys.stderr)
        return EXIT_SKIPPED
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, base=demo_config_path())
    code, result = _run(cfg, progress=not args.quiet)
    if code in (EXIT_OK, EXIT_SKIPPED):
        ws = Workspace.of(cfg)
        uri = sqlite_tracking_uri(ws.mlflow_db)
        print(
            "\nDemo finished.\n"
            f"  pseudo-label store (Zarr): {ws.store_url}\n"
            f"  MLflow store:              {ws.mlflow_db.resolve()}\n"
            f"  open the MLflow UI:        .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1\n"
            f"  annotation queries:        .venv/bin/caudo-ray queries --work-dir {cfg.work_dir} --export review/  "
            f"(answers: .venv/bin/caudo-ray annotate --work-dir {cfg.work_dir} review/masks)\n"
            f"  export calibrated labels:  .venv/bin/caudo-ray export --work-dir {cfg.work_dir} labels_out/\n"
            f"  segment new images:        .venv/bin/caudo-ray predict --work-dir {cfg.work_dir} images/ masks_out/"
        )
        if result.model is not None:
            model = result.model.registry_uri or result.model.model_uri
            print(
                f"  MLflow model:              {model}{' (registered)' if result.model.version else ''}\n"
                # The serve command starts uvicorn by name: the virtualenv's bin must be on PATH.
                f"  serve it:                  PATH=.venv/bin:$PATH MLFLOW_TRACKING_URI={uri} mlflow models serve -m {model} "
                "--env-manager local -h 127.0.0.1 -p 5001"
            )
    return code


def _round_line(summary: dict) -> str:
    """One round at a glance: the round's segmenter on validation, what calibration did to the pool's labels
    (where hidden truth exists), what was selected; every figure is also in MLflow."""
    parts = []
    val = summary.get("val", {}).get("dice")
    if val is not None:
        parts.append(f"segmenter val Dice {val:.4f}")
    if "pseudo_dice_initial" in summary:
        parts.append(
            f"pool pseudo-label Dice {summary['pseudo_dice_initial']:.4f} -> {summary['pseudo_dice_calibrated']:.4f} "
            f"calibrated ({100 * summary['calibration_gain']:+.2f} points)"
        )
    parts.append(f"selected {summary['selected']}/{summary['cases']}, reliability mean {summary['reliability_mean']:.3f}")
    if summary.get("annotations"):
        parts.append(f"trained with {summary['annotations']} answered queries")
    return f"round {summary['round']}: " + ", ".join(parts)


def _guard_line(guard: dict, rounds: int) -> str:
    """What the drift guard read on each segmenter (its mean exemplar-view Dice), and which one the run serves."""

    def name(i: int) -> str:
        return "the final segmenter" if i == rounds else f"round {i}"

    readings = ", ".join(f"{mean_reading(r):.3f}" for r in guard["readings"])
    stopped = "" if guard["regressed_at"] is None else f"; {name(guard['regressed_at'])} regressed, so the rounds stopped"
    return f"drift guard: exemplar-view Dice {readings} (rounds 0.., then the final segmenter){stopped}; serving {name(guard['kept'])}"


def _run(cfg: RunConfig, progress: bool) -> tuple[int, RunResult]:
    """Run ``cfg``, print its rounds, final metrics and where its results are; the exit status and the result."""
    factory = (lambda ctx: RayExecutor(ctx, progress=progress)) if cfg.runtime.use_ray else None
    result = Coordinator(cfg, executor_factory=factory, progress=progress).run()
    for summary in result.rounds:
        print(_round_line(summary))
    if result.guard:
        print(_guard_line(result.guard, cfg.rounds))
    if result.final_metrics:
        print("served segmenter on validation:", {k: round(v, 4) for k, v in result.final_metrics.items()})
    print(f"MLflow run {result.run_id} in {result.tracking_uri}")
    if result.model is not None:
        print(f"MLflow model: {result.model.registry_uri or result.model.model_uri}")
    if result.dashboard is not None:
        print(f"dashboard: {result.dashboard}")
    if result.skipped:
        print(f"completed with {len(result.skipped)} skipped input(s); see {Workspace.of(cfg).log_path}:", file=sys.stderr)
        for source, reason in sorted(result.skipped.items()):
            print(f"  {source}: {reason}", file=sys.stderr)
        return EXIT_SKIPPED, result
    return EXIT_OK, result


def _saved_config(work_dir: str) -> RunConfig:
    """The config a run saved in ``work_dir``, with the work dir as named here (the run may have named it otherwise)."""
    config = Workspace(Path(work_dir)).config_path
    if not config.exists():
        raise StoreError(f"{work_dir} has no config.yaml: is it the work dir of a run?")
    return load_config(config, {"work_dir": work_dir})


def _open_store(work_dir: str) -> PseudoLabelStore:
    return PseudoLabelStore.open(Workspace.of(_saved_config(work_dir)).store_url, mode="r")


def _last_round(store, asked: int | None) -> int:
    committed = store.rounds.committed()
    if asked is not None:
        if asked not in store.rounds.numbers():
            raise StoreError(f"round {asked} does not exist (rounds: {store.rounds.numbers()})")
        return asked
    if not committed:
        raise StoreError("no round has been committed yet")
    return max(committed)


def cmd_export(args: argparse.Namespace) -> int:
    store = _open_store(args.work_dir)
    r = _last_round(store, args.round)
    written = export_round(store, r, args.output, which=args.which, fmt=args.format, selected_only=args.selected_only)
    print(f"wrote {len(written)} {args.which} label files of round {r} to {args.output}")
    return EXIT_OK


def cmd_export_model(args: argparse.Namespace) -> int:
    segmenter, cfg = final_segmenter(Path(args.work_dir))
    name = cfg.tracking.model_name or "caudo-ray-segmenter"
    if args.format == "monai-bundle":
        write_monai_bundle(segmenter, args.output, name, final_provenance(Path(args.work_dir)))
        print(f"wrote MONAI bundle {name} to {args.output}; run it with:")
        print(
            f"  python -m monai.bundle run --config_file {args.output}/configs/inference.json --bundle_root {args.output} "
            "--dataset_dir IMAGES/ --output_dir MASKS/"
        )
    else:
        save_mlflow_model(segmenter, args.output)
        print(f"wrote MLflow Model to {args.output}; serve it with:")
        print(f"  mlflow models serve -m {args.output} --env-manager local -h 127.0.0.1 -p 5001")
    return EXIT_OK


def cmd_queries(args: argparse.Namespace) -> int:
    cfg = _saved_config(args.work_dir)
    ws = Workspace.of(cfg)
    store = PseudoLabelStore.open(ws.store_url, mode="r")
    r = _last_round(store, args.round)
    strategy = args.strategy or cfg.selection.query_strategy
    answered = [file_stem(p) for p in answer_files(ws.annotations_dir)]  # waiting for the run's next intake
    rows = annotation_queries(
        store,
        r,
        args.k if args.k is not None else cfg.selection.num_queries,
        strategy=strategy,
        groups=_case_groups(cfg),
        answered=answered,
        seed=cfg.seed,
    )
    if args.export is not None:
        exported = export_queries(store, r, rows, args.export)
        if args.json:
            print(json.dumps(exported, indent=2))
            return EXIT_OK
        print(f"wrote the {len(exported)} cases of round {r} chosen by {strategy} to {args.export} ({args.export / 'manifest.csv'}):")
        for row in exported:
            where = f" slice {row['slice']}" if row["slice"] != "" else ""
            print(f"{row['rank']:4d}  {row['case_id']}  reliability={float(row['reliability']):.3f}  correct {row['pre_annotation']}{where}")
        print(f"correct the masks, then: caudo-ray annotate --work-dir {args.work_dir} {args.export / 'masks'}")
        return EXIT_OK
    if args.json:
        print(json.dumps([dataclasses.asdict(q) for q in rows], indent=2))
    else:
        print(f"cases to annotate after round {r}, by {strategy} (answer with caudo-ray annotate, or masks named <case_id>.png in {ws.annotations_dir}):")
        for rank, q in enumerate(rows, 1):
            print(f"{rank:4d}  {q.case_id}  reliability={q.reliability:.3f}  entropy={q.entropy:.3f}  group={q.group}")
    return EXIT_OK


def _case_groups(cfg: RunConfig) -> dict[str, str]:
    """Case id -> group (exam, patient) of the run's data set, indexed as the run indexed it."""
    index = index_of(cfg, Path(cfg.data.path) if cfg.data.path else Workspace.of(cfg).phantom_dir)
    return {ref.case_id: ref.group for ref in index.labelled + index.unlabelled}


def cmd_annotate(args: argparse.Namespace) -> int:
    cfg = _saved_config(args.work_dir)
    records = annotate(cfg, answer_rules(cfg), args.answers, annotator=args.annotator, replace=args.replace)
    for record in records:
        replaced = f", replacing {record['replaced']}" if record["replaced"] else ""
        print(f"{record['case_id']}: {record['file']} by {record['annotator']} at {record['time']}{replaced}")
    print(
        f"{len(records)} answer(s) in {Workspace.of(cfg).annotations_dir}: a run going on this work dir takes them in before its "
        "next round's training; otherwise the next `caudo-ray run` on it does"
    )
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    summary = calibrate_dataset(
        args.run,
        args.data,
        args.out,
        overrides={"runtime.address": args.address} if args.address else None,
        executor_factory=None if args.no_ray else RayExecutor,
        fmt=args.format,
        progress=not args.quiet,
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "perf"}, indent=2, default=str))
    return EXIT_SKIPPED if summary["skipped"] else EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    written, skipped = predict_folder(Path(args.work_dir), args.inputs, args.output, dicom_seg=args.dicom_seg)
    print(f"wrote {len(written)} masks to {args.output}")
    for source, reason in skipped.items():
        print(f"  skipped {source}: {reason}", file=sys.stderr)
    return EXIT_SKIPPED if skipped else EXIT_OK


def cmd_dashboard(args: argparse.Namespace) -> int:
    uri, run_ids, out = args.tracking_uri, args.run_id, args.out
    if args.work_dir is not None:
        ws = Workspace(Path(args.work_dir))
        info = ws.read_run_info()
        if not info and not ws.mlflow_db.exists():
            print(f"error: {args.work_dir} has no run.json or mlflow.db: is it the work dir of a run?", file=sys.stderr)
            return EXIT_REFUSED
        uri = info.get("tracking_uri") or sqlite_tracking_uri(ws.mlflow_db)
        if run_ids is None and args.experiment is None and info.get("run_id"):
            run_ids = [info["run_id"]]
        out = out or ws.dashboard_path
    if uri is None or (run_ids is None and args.experiment is None):
        print("error: name the runs (--run-id or --experiment) and their store (--tracking-uri or --work-dir)", file=sys.stderr)
        return EXIT_REFUSED
    try:
        result = build_dashboard(uri, run_ids=run_ids, experiment=args.experiment, out=out)
    except DashboardError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_REFUSED
    print(f"dashboard of {len(result.source_run_ids)} run(s): {result.html_path} ({len(result.figures)} figures)")
    print(f"logged as MLflow run {result.run_id}, artifact {result.artifact_path}, built in {result.build_s:.1f} s")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    group_column = args.group_column
    if group_column is None:
        group_column = _guess_group_column(args.path)
    report = inspect_dataset(args.path, group_column=group_column)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return EXIT_OK


def _guess_group_column(root: Path) -> str | None:
    """``group`` when meta.csv has it, else a single ``*_id`` column (HC18's ``exam_id``), else none."""
    meta = root / "meta.csv"
    if not meta.exists():
        return None
    header = meta.read_text().splitlines()[0].split(",") if meta.stat().st_size else []
    if "group" in header:
        return "group"
    ids = [h for h in header if h.endswith("_id")]
    return ids[0] if len(ids) == 1 else None


if __name__ == "__main__":
    sys.exit(main())
