"""GPU throughput: calibration cases/s on one GPU at 128x128 with 10 DDIM steps, 1 worker and several sharing it.

Needs a CUDA build of torch and a GPU; it refuses to run without one (exit status 2) unless ``--device cpu`` asks
for a dry run of the same steps on the CPU (no GPU shares; its figures are not GPU figures). Measured side by side:

- **precision**: the bare loop in this process (``rounds.steps.label_cases``) on the GPU in float32, bf16 and fp16
  autocast, and how far bf16/fp16 labels are from float32's (share of pixels that differ, initial and calibrated);
- **workers**: the same pool streamed by ``RayExecutor.label`` through each count of ``--workers`` (default 1, 2
  and 4), ``n`` workers sharing the GPU at ``runtime.gpus_per_worker: 1/n`` each, in ``runtime.autocast``
  (``auto``: bf16 on CUDA).

Every measurement also gives the per-case time of each stage as the labelling loop reports it (store read,
segmenter, DDIM, reliability scores on the CPU, store write): a worker's CPU-side stages decide how many workers
one GPU needs, and DDIM's time per case, growing as workers take turns on the GPU, shows where the GPU saturates
(docs/benchmarks.md, "GPU"). Each line is printed, and the JSON rewritten, as soon as it is measured, so a run cut
short by a time limit keeps what it measured.

Models are untrained networks of the demo's sizes unless ``--models`` names a finished run's ``round_<r>.pt``
(with ``--config`` its ``config.yaml``): throughput does not depend on the weights, label agreement does (untrained
networks give near-ties everywhere, so quote agreement from trained models).

Usage::

    python -m benchmarks.gpu_throughput                                   # untrained demo-size networks
    python -m benchmarks.gpu_throughput --config runs/hc18/config.yaml --models runs/hc18/models/round_0.pt
    python -m benchmarks.gpu_throughput --device cpu --cases 64 --batch-size 16 --workers 1,2   # dry run

Writes ``<work-dir>/gpu_throughput.json`` (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import ray
import torch

from benchmarks.workload import DEMO_CONFIG, REPO_ROOT, phantom_store, untrained_models
from caudo_ray.config import RunConfig, load_config
from caudo_ray.distributed.cluster import init_ray, shutdown_ray
from caudo_ray.distributed.executor import RayExecutor
from caudo_ray.labelling.engine import LabelingEngine
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.rounds.executor import TrainContext, labelling_precision
from caudo_ray.rounds.steps import label_cases
from caudo_ray.store import PseudoLabelStore, chunk_batches

SIZE = 128
STEPS = 10
STAGES = ("read_s", "infer_s", "ddim_s", "score_s", "store_s")


def gpu_config(work_dir: Path, base: Path, device: str, num_workers: int, batch_size: int, autocast: str) -> RunConfig:
    """``num_workers`` workers sharing one GPU equally (none on the CPU)."""
    return load_config(
        base,
        {
            "work_dir": str(work_dir),
            "device": device,
            "data.working_size": [SIZE, SIZE],
            "calibrator.inference_steps": STEPS,
            "runtime.num_workers": num_workers,
            "runtime.gpus_per_worker": 1 / num_workers if device == "cuda" else 0.0,
            "runtime.cpus_per_worker": 1,
            "runtime.threads_per_worker": 1,
            "runtime.trainer_cpus": 0,
            "runtime.batch_size": batch_size,
            "runtime.autocast": autocast,
        },
    )


class Rounds:
    """A new round of the store for each measurement, streamed chunk-aligned as the coordinator streams it."""

    def __init__(self, store: PseudoLabelStore, batch_size: int):
        self.store, self.batch_size, self.next = store, batch_size, 0

    def measure(self, label_fn, label: str) -> dict:
        r = self.next
        self.next += 1
        self.store.rounds.begin(r, {"benchmark": label}, chunk_size=self.batch_size)
        todo = self.store.rounds.missing(r)
        t0 = time.perf_counter()
        cases, sums = 0, dict.fromkeys(STAGES, 0.0)
        for stats in label_fn(r, chunk_batches(todo, self.batch_size)):
            cases += len(stats.indices)
            for key in STAGES:
                sums[key] += getattr(stats, key)
        elapsed = time.perf_counter() - t0
        assert cases == len(todo) and self.store.rounds.done(r)[todo].all(), f"{label}: not every case was labelled"
        stages = {f"{k[:-2]}_ms_per_case": 1e3 * v / cases for k, v in sums.items()}
        print(f"{label}: {cases / elapsed:.0f} cases/s; " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()), flush=True)
        return {"round": r, "cases_per_s": cases / elapsed, "elapsed_s": elapsed, **stages}


def medians(measured: list[dict]) -> dict:
    """Median rate and per-stage times of repeated measurements."""
    keys = ["cases_per_s"] + [f"{k[:-2]}_ms_per_case" for k in STAGES]
    return {k: statistics.median(m[k] for m in measured) for k in keys}


def bare(cfg: RunConfig, models: RoundModels, store: PseudoLabelStore, setting: str):
    """The labelling loop in this process, on ``cfg.device``, under ``setting`` autocast."""
    device = torch.device(cfg.device)

    def label_fn(r, batches):
        engine = LabelingEngine(cfg, models, device)
        for indices in batches:
            with labelling_precision(setting, device):
                stats = label_cases(engine, store, r, indices)
            if device.type == "cuda":
                torch.cuda.synchronize()
            yield stats

    return label_fn


def disagreement(store: PseudoLabelStore, r: int, reference: int) -> dict:
    a, b = store.rounds.read(r), store.rounds.read(reference)
    return {kind: float(np.mean(a[kind] != b[kind])) for kind in ("initial", "calibrated")}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="run config whose network sizes to use")
    parser.add_argument("--models", type=Path, default=None, help="a finished run's models/round_<r>.pt (default: untrained)")
    parser.add_argument("--cases", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workers", default="1,2,4", help="worker counts to measure, each sharing the GPU equally")
    parser.add_argument("--skip-bare", action="store_true", help="measure the workers only, not the precisions")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of the same steps")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "bench-gpu")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: <work-dir>/gpu_throughput.json)")
    args = parser.parse_args(argv)
    try:
        counts = [int(n) for n in args.workers.split(",")]
    except ValueError:
        parser.error(f"--workers: expected worker counts such as 1,2,4, got {args.workers!r}")
    if not counts or min(counts) < 1:
        parser.error(f"--workers: counts must be at least 1, got {args.workers!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU and a CUDA build of torch")
        raise SystemExit(2)

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    work = args.work_dir.resolve()
    out = (args.out or work / "gpu_throughput.json").resolve()
    shutil.rmtree(work / "gpu.zarr", ignore_errors=True)
    cfg = gpu_config(work, args.config, args.device, 1, args.batch_size, "auto")
    num_classes = cfg.data.num_classes or cfg.data.phantom.num_classes
    models = RoundModels.load(args.models) if args.models else untrained_models(cfg, num_classes)
    store = phantom_store(work / "gpu.zarr", args.cases, cfg)
    rounds = Rounds(store, args.batch_size)
    res: dict = {
        "working_size": SIZE,
        "ddim_steps": STEPS,
        "batch_size": args.batch_size,
        "cases": args.cases,
        "repeats": args.repeats,
        "models": str(args.models) if args.models else "untrained networks of the config's sizes",
        "config": str(args.config),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU dry run ({args.device})",
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "precision": {},
        "workers": {},
    }

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))

    if not args.skip_bare:
        rounds.measure(bare(cfg, models, store, "off"), "warm-up")  # CUDA context, cuDNN autotuning
        runs: dict[str, list[dict]] = {}
        for _ in range(args.repeats):
            for setting in ("off", "bf16", "fp16"):
                runs.setdefault(setting, []).append(rounds.measure(bare(cfg, models, store, setting), f"bare-{setting}"))
        reference = runs["off"][-1]["round"]
        for setting, measured in runs.items():
            res["precision"][setting] = {
                **medians(measured),
                "pixels_differing_from_fp32": disagreement(store, measured[-1]["round"], reference),
            }
        save()

    init_ray(cfg, log_to_driver=False)
    try:
        for workers in counts:
            wcfg = gpu_config(work, args.config, args.device, workers, args.batch_size, "auto")
            executor = RayExecutor(TrainContext(wcfg, store.url, num_classes))
            try:
                label_fn = lambda r, b, ex=executor: ex.label(r, models, b)
                rounds.measure(label_fn, f"ray-{workers}w-cold")
                measured = [rounds.measure(label_fn, f"ray-{workers}w") for _ in range(args.repeats)]
                where = ray.get([w.where.remote() for w in executor._workers])
            finally:
                executor.close()
            rate = medians(measured)
            first = res["workers"][f"{counts[0]}w"]["cases_per_s"] if res["workers"] else rate["cases_per_s"]
            res["workers"][f"{workers}w"] = {
                "gpus_per_worker": wcfg.runtime.gpus_per_worker,
                **rate,
                "vs_first": rate["cases_per_s"] / first,
                "placement": where,
            }
            save()
    finally:
        shutdown_ray()
    shutil.rmtree(work / "gpu.zarr", ignore_errors=True)
    print(format_table(res))
    print(f"\nJSON: {out}")
    return res


def format_table(res: dict) -> str:
    lines = [f"{res['device']}, {res['working_size']}x{res['working_size']}, {res['ddim_steps']} DDIM steps, batch {res['batch_size']}", ""]
    stages = " | ".join(f"{k[:-2]} ms/case" for k in STAGES)
    lines += [f"| run | cases/s | {stages} | pixels differing from fp32 (initial / calibrated) |", "|---" * (3 + len(STAGES)) + "|"]
    cells = lambda m: " | ".join(f"{m[f'{k[:-2]}_ms_per_case']:.2f}" for k in STAGES)
    for setting, p in res["precision"].items():
        diff = p["pixels_differing_from_fp32"]
        lines.append(f"| bare loop, {setting} | {p['cases_per_s']:.0f} | {cells(p)} | {diff['initial']:.2e} / {diff['calibrated']:.2e} |")
    for name, w in res["workers"].items():
        share = f"{w['gpus_per_worker']:.2g} GPU each, " if w["gpus_per_worker"] else ""
        lines.append(f"| Ray, {name} ({share}x{w['vs_first']:.2f} the first), autocast auto | {w['cases_per_s']:.0f} | {cells(w)} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
