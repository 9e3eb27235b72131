"""Throughput benchmark: the calibration pipeline against its limits, on phantoms at 64x64 and 128x128.

Measured side by side in one run, at each working size (``--sizes``; the store is chunked by batch, schema 2):

- **bare vs pipeline**: the calibrator loop in this process without Ray (``rounds.steps.label_cases``: read images
  from the store, ``LabelingEngine.label_batch``, write labels/scores/done) against the same pool streamed by
  ``RayExecutor.label`` through one :class:`~caudo_ray.actors.CalibrationWorker`;
- **scaling**: two workers against one, one torch thread each;
- **driver memory**: peak RSS of this (driver) process while streaming a small and a 10x larger pool through
  no-op workers (at the first size);
- **coordinator + store ceiling**: the pipeline with no-op workers (:class:`NoopEngine`: same input and output
  sizes, no model), over several batch sizes, plus the same no-op loop without Ray, which splits the cost into
  store I/O and Ray's per-batch overhead; the workers report their store read and write time per batch, and the
  driver's CPU time per batch is what one coordinator spends to feed them.

Models are UNTRAINED networks of the demo's sizes (``caudo_ray/configs/demo.yaml``): the work per case does not
depend on the weights. Rates are medians over repeats; the pipeline/bare ratio is the median of ratios paired
within a repeat (bare and 1-worker rounds alternate, so drift in the machine's load hits both); the 2w/1w
ratio is a ratio of medians, since each pool holds the CPUs while it is up. End-to-end rates include what a
round pays once (actor start, model build); steady rates time from the first finished batch to the last.

Usage::

    python -m benchmarks.throughput                 # docs profile, 64x64 and 128x128 (3-6 minutes on 2 cores)
    python -m benchmarks.throughput --sizes 128     # one size
    python -m benchmarks.throughput --quick         # CI smoke profile (small counts, 64x64)

Writes ``<work-dir>/throughput.json``, prints a table and logs everything to MLflow
(``sqlite:///<work-dir>/mlflow.db``, experiment ``caudo-ray-benchmarks``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

import numpy as np
import torch

from benchmarks.workload import DEMO_CONFIG, REPO_ROOT, phantom_store, untrained_models
from caudo_ray.config import RunConfig, load_config
from caudo_ray.labelling.engine import BatchResult, LabelingEngine
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.rounds.executor import TrainContext
from caudo_ray.rounds.steps import BatchStats, label_cases
from caudo_ray.store import DEFAULT_SCORE_NAMES, PseudoLabelStore, chunk_batches
from caudo_ray.tracking import names
from caudo_ray.tracking.tracker import Tracker, flatten, sqlite_tracking_uri

# Goals per working size, and for the driver's memory (measured once).
SIZE_GOALS = {"ratio_pipeline_vs_bare": 0.90, "scaling_2w_vs_1w": 1.7, "noop_ceiling_cases_per_s": 2000.0}
MEMORY_GOAL = 1.2


@dataclass(frozen=True)
class Profile:
    """Sizes of one benchmark run.

    Attributes:
        sizes: working sizes (H = W) measured, one after the other.
        model_cases: pool streamed through the real models (bare, 1 worker, 2 workers), per size; a multiple of
            two batches, so two workers can split a round evenly (48 cases in batches of 16 capped 2w / 1w at 1.5).
        repeats: repetitions of every timed measurement (medians are quoted).
        memory_counts: (small, large) pools streamed through no-op workers for the driver's peak memory.
        ceiling_cases: pool streamed through no-op workers for the ceiling.
        ceiling_batch_sizes: batch sizes tried for the ceiling; the first is the headline one.
        warmup: run two untimed bare batches first (lazy torch initialisation).
    """

    sizes: tuple[int, ...]
    model_cases: tuple[int, ...]
    repeats: int
    memory_counts: tuple[int, int]
    ceiling_cases: int
    ceiling_batch_sizes: tuple[int, ...]
    warmup: bool


PROFILES = {
    "default": Profile(
        sizes=(64, 128), model_cases=(192, 64), repeats=3, memory_counts=(1000, 10000), ceiling_cases=4096,
        ceiling_batch_sizes=(64, 16, 256), warmup=True,
    ),
    "quick": Profile(
        sizes=(64,), model_cases=(32,), repeats=1, memory_counts=(100, 1000), ceiling_cases=512, ceiling_batch_sizes=(64, 16),
        warmup=False,
    ),
}  # fmt: skip


class NoopEngine:
    """A labelling engine with :class:`LabelingEngine`'s inputs and outputs and no model.

    It returns label maps of the batch's size (a threshold of the image, so chunks compress like real label
    maps) and a full set of scores, so ``rounds.steps.label_cases`` reads and writes exactly what a real batch does.
    """

    def __init__(self, cfg: RunConfig, models: RoundModels, device: torch.device):
        self.num_classes = models.num_classes

    def label_batch(self, images: np.ndarray, truth: np.ndarray | None = None) -> BatchResult:
        labels = (images > 0.5).astype(np.uint8)
        scores = {name: np.zeros(len(images), np.float32) for name in DEFAULT_SCORE_NAMES}
        return BatchResult(labels, labels.copy(), scores, {"infer_s": 0.0, "ddim_s": 0.0, "score_s": 0.0, "n": len(images)})


@dataclass
class StreamRun:
    """Timing of one round's labelling: cases, wall time, and the stage times the workers reported."""

    cases: int
    elapsed_s: float
    first_result_s: float  # from the call to the first finished batch: start-up, model build, one batch
    steady_cases_per_s: float  # from the first finished batch to the last
    driver_cpu_s: float  # CPU time of this process (all its threads) during the round
    infer_s: float
    ddim_s: float
    score_s: float
    store_s: float
    read_s: float

    @property
    def cases_per_s(self) -> float:
        return self.cases / self.elapsed_s


class RssSampler:
    """Samples this process's resident set size (``/proc/self/status``) in a thread; the peak is kept in MB."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self.start_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss_mb() -> float:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
        raise RuntimeError("/proc/self/status has no VmRSS line; the memory measurement needs Linux")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.rss_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        self.start_mb = self.peak_mb = self.rss_mb()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self.rss_mb())


def benchmark_config(work_dir: Path, num_workers: int = 1, batch_size: int | None = None, size: int | None = None) -> RunConfig:
    """The demo's model sizes at ``size`` x ``size`` (the demo's when None) with ``num_workers`` one-thread CPU workers."""
    overrides = {
        "work_dir": str(work_dir),
        "device": "cpu",
        "runtime.num_workers": num_workers,
        "runtime.cpus_per_worker": 1,
        "runtime.threads_per_worker": 1,
        # No trainer runs here; with its CPUs at 0 the RayExecutor keeps its pool between rounds.
        "runtime.trainer_cpus": 0,
    }
    if batch_size is not None:
        overrides["runtime.batch_size"] = batch_size
    if size is not None:
        overrides["data.working_size"] = [size, size]
    return load_config(DEMO_CONFIG, overrides)


class Bench:
    """Runs the measurements of one working size on two stores (real models, no-op); keeps each one's round counter."""

    def __init__(self, work_dir: Path, profile: Profile, size: int, model_cases: int, memory: bool):
        self.work_dir = work_dir
        self.profile = profile
        self.size = size
        cfg = self.config()
        self.batch_size = cfg.runtime.batch_size
        self.num_classes = cfg.data.phantom.num_classes
        self.models = untrained_models(cfg, self.num_classes)
        self.model_store = phantom_store(work_dir / "model.zarr", model_cases, cfg)
        noop_cases = max(*profile.memory_counts, profile.ceiling_cases) if memory else profile.ceiling_cases
        self.noop_store = phantom_store(work_dir / "noop.zarr", noop_cases, cfg)
        self._rounds: dict[str, int] = {}

    def config(self, num_workers: int = 1) -> RunConfig:
        return benchmark_config(self.work_dir, num_workers, size=self.size)

    def _begin(self, store: PseudoLabelStore, label: str, num_cases: int, batch_size: int) -> tuple[int, np.ndarray]:
        """Begins the store's next round (chunked by ``batch_size``); returns it and its first ``num_cases`` cases."""
        r = self._rounds.get(store.url, 0)
        self._rounds[store.url] = r + 1
        store.rounds.begin(r, {"benchmark": label}, chunk_size=batch_size)
        return r, store.rounds.missing(r)[:num_cases]

    def stream(self, label_fn: Callable[[int, Iterator[np.ndarray]], Iterator[BatchStats]], store: PseudoLabelStore,
               label: str, num_cases: int, batch_size: int | None = None) -> StreamRun:
        """Streams ``num_cases`` of a new round through ``label_fn`` the way the Coordinator does, timing it."""
        batch_size = batch_size or self.batch_size
        r, todo = self._begin(store, label, num_cases, batch_size)
        sums = {"infer_s": 0.0, "ddim_s": 0.0, "score_s": 0.0, "store_s": 0.0, "read_s": 0.0}
        done, first_t, first_n = 0, None, 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        for stats in label_fn(r, chunk_batches(todo, batch_size)):
            done += len(stats.indices)
            if first_t is None:
                first_t, first_n = time.perf_counter(), len(stats.indices)
            for key in sums:
                sums[key] += getattr(stats, key)
        end, cpu = time.perf_counter(), time.process_time() - cpu0
        if done != len(todo) or not store.rounds.done(r)[todo].all():
            raise RuntimeError(f"{label}: {len(todo) - done} of {len(todo)} cases were not labelled")
        steady = (done - first_n) / (end - first_t) if done > first_n and end > first_t else float("nan")
        return StreamRun(done, end - t0, first_t - t0, steady, cpu, **sums)

    def local(self, engine_factory, store: PseudoLabelStore, label: str, num_cases: int, batch_size: int | None = None) -> StreamRun:
        """The loop in this process without Ray: build the engine, then ``rounds.steps.label_cases`` batch by batch."""

        def label_fn(r, batches):
            engine = engine_factory(self.config(), self.models, torch.device("cpu"))
            for indices in batches:
                yield label_cases(engine, store, r, indices)

        return self.stream(label_fn, store, label, num_cases, batch_size)

    def bare(self, num_cases: int) -> StreamRun:
        """The limit: the calibrator loop in this process, one torch thread, no Ray."""
        torch.set_num_threads(1)
        return self.local(LabelingEngine, self.model_store, "bare", num_cases)

    def pool(self, num_workers: int, *, noop: bool = False):
        """A :class:`RayExecutor` with ``num_workers`` one-thread workers; its pool stays up until ``close()``."""
        from caudo_ray.distributed.executor import RayExecutor

        cfg = self.config(num_workers)
        store = self.noop_store if noop else self.model_store
        executor = RayExecutor(TrainContext(cfg, store.url, self.num_classes), engine_factory=NoopEngine if noop else LabelingEngine)
        executor.bench_store = store
        return executor

    def ray(self, executor, num_cases: int, batch_size: int | None = None) -> StreamRun:
        """The full pipeline: one round's labelling through ``RayExecutor.label``."""
        n = executor.ctx.cfg.runtime.num_workers
        return self.stream(lambda r, batches: executor.label(r, self.models, batches), executor.bench_store, f"ray_{n}w", num_cases, batch_size)

    def driver_peak(self, executor, num_cases: int) -> tuple[float, float, StreamRun]:
        """Peak driver RSS (MB) and its growth over the RSS at the start, streaming ``num_cases`` through ``executor``."""
        with RssSampler() as rss:
            run = self.ray(executor, num_cases)
        return rss.peak_mb, rss.peak_mb - rss.start_mb, run


def run_size(work_dir: Path, profile: Profile, size: int, model_cases: int, memory: bool, log: Callable[[str], None]) -> dict:
    """Every measurement at one working size; the driver's memory too when ``memory``.

    Each worker pool is started once (its cold start is timed on a first, short round) and then measured over
    ``profile.repeats`` rounds; bare and 1-worker rounds alternate, so a change in the machine's load hits both.
    """
    for name in ("model.zarr", "noop.zarr"):
        shutil.rmtree(work_dir / name, ignore_errors=True)
    t_start = time.perf_counter()
    bench = Bench(work_dir, profile, size, model_cases, memory)
    batch = bench.batch_size
    log(f"{size}x{size}: stores ready ({time.perf_counter() - t_start:.0f} s)")
    runs: dict[str, list[StreamRun]] = {"bare": [], "pipeline_1w": [], "pipeline_2w": []}
    cold: dict[str, StreamRun] = {}
    if profile.warmup:
        bench.bare(2 * batch)

    for workers, key in ((1, "pipeline_1w"), (2, "pipeline_2w")):
        executor = bench.pool(workers)
        try:
            cold[key] = bench.ray(executor, workers * batch)
            for rep in range(profile.repeats):
                if workers == 1:
                    runs["bare"].append(bench.bare(model_cases))
                runs[key].append(bench.ray(executor, model_cases))
                log(f"{size}x{size} {key} repeat {rep + 1}/{profile.repeats}: " + ", ".join(f"{k} {v[-1].cases_per_s:.1f}/s" for k, v in runs.items() if v))
        finally:
            executor.close()

    peaks: dict[int, dict] = {}
    ceiling: dict[int, list[StreamRun]] = {b: [] for b in profile.ceiling_batch_sizes}
    executor = bench.pool(2, noop=True)
    try:
        cold["noop_2w"] = bench.ray(executor, 2 * batch)
        for count in profile.memory_counts if memory else ():
            peak, growth, run = bench.driver_peak(executor, count)
            peaks[count] = {"peak_mb": peak, "growth_mb": growth, "cases_per_s": run.cases_per_s}
            log(f"driver memory, {count} cases: peak {peak:.0f} MB (+{growth:.1f} MB), {run.cases_per_s:.0f} cases/s")
        for rep in range(profile.repeats):
            for b in profile.ceiling_batch_sizes:
                ceiling[b].append(bench.ray(executor, profile.ceiling_cases, b))
            log(f"{size}x{size} no-op ceiling repeat {rep + 1}/{profile.repeats}: " + ", ".join(f"batch {b}: {v[-1].cases_per_s:.0f}/s" for b, v in ceiling.items()))
    finally:
        executor.close()
    noop_local: dict[int, list[StreamRun]] = {b: [] for b in profile.ceiling_batch_sizes}
    for rep in range(profile.repeats):
        for b in profile.ceiling_batch_sizes:
            noop_local[b].append(bench.local(NoopEngine, bench.noop_store, f"noop_local_b{b}", profile.ceiling_cases, b))
    out = summarize_size(profile, runs, cold, ceiling, noop_local, batch, model_cases)
    if memory:
        out["memory"] = peaks
    out["total_s"] = time.perf_counter() - t_start
    return out


def run_benchmark(work_dir: Path, profile: Profile, sizes: tuple[int, ...] | None = None, log: Callable[[str], None] = print) -> dict:
    """Runs every measurement of ``profile`` (at ``sizes``, default the profile's) on the Ray already initialised."""
    work_dir.mkdir(parents=True, exist_ok=True)
    sizes = sizes or profile.sizes
    cases = dict(zip(profile.sizes, profile.model_cases))
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    by_size = {}
    for k, size in enumerate(sizes):
        by_size[str(size)] = run_size(work_dir, profile, size, cases.get(size, profile.model_cases[-1]), k == 0, log)
    return summarize(profile, by_size, load_before, time.perf_counter() - t_start)


def _median(values) -> float:
    return float(statistics.median(values))


def _stages(runs: list[StreamRun]) -> dict[str, float]:
    """Median per-case stage times in ms (as the workers report them) of a list of runs."""
    return {
        "store_read_ms_per_case": _median(1e3 * r.read_s / r.cases for r in runs),
        "infer_ms_per_case": _median(1e3 * r.infer_s / r.cases for r in runs),
        "ddim_ms_per_case": _median(1e3 * r.ddim_s / r.cases for r in runs),
        "score_ms_per_case": _median(1e3 * r.score_s / r.cases for r in runs),
        "store_write_ms_per_case": _median(1e3 * r.store_s / r.cases for r in runs),
        "wall_ms_per_case": _median(1e3 / r.cases_per_s for r in runs),
    }


def summarize_size(profile, runs, cold, ceiling, noop_local, batch, model_cases) -> dict:
    """One working size's record: headline fields first, then the detail behind them."""
    bare, one = runs["bare"], runs["pipeline_1w"]
    headline = profile.ceiling_batch_sizes[0]
    rate = {k: _median(r.cases_per_s for r in v) for k, v in runs.items()}
    steady = {k: _median(r.steady_cases_per_s for r in v) for k, v in runs.items()}
    ceiling_rate = {b: _median(r.cases_per_s for r in v) for b, v in ceiling.items()}
    local_rate = {b: _median(r.cases_per_s for r in v) for b, v in noop_local.items()}
    cpu_per_batch = {b: _median(r.driver_cpu_s / math.ceil(r.cases / b) for r in v) for b, v in ceiling.items()}
    out = {
        "bare_cases_per_s": _median(r.cases_per_s for r in bare),
        "pipeline_1w_cases_per_s": rate["pipeline_1w"],
        "pipeline_2w_cases_per_s": rate["pipeline_2w"],
        "ratio_pipeline_vs_bare": _median(p.cases_per_s / b.cases_per_s for p, b in zip(one, bare)),
        # the 2-worker rounds run after the 1-worker ones (each pool holds the CPUs): a ratio of medians
        "scaling_2w_vs_1w": rate["pipeline_2w"] / rate["pipeline_1w"],
        "noop_ceiling_cases_per_s": ceiling_rate[headline],
        "noop_ceiling_batch_size": headline,
        # detail
        "steady_cases_per_s": steady,
        "steady_ratio_pipeline_vs_bare": _median(p.steady_cases_per_s / b.steady_cases_per_s for p, b in zip(one, bare)),
        "steady_scaling_2w_vs_1w": steady["pipeline_2w"] / steady["pipeline_1w"],
        # a pool's first round pays for starting its actors (importing torch, MONAI, diffusers) and building models
        "cold_first_result_s": {k: r.first_result_s for k, r in cold.items()},
        "warm_first_result_s": {k: _median(r.first_result_s for r in v) for k, v in runs.items()},
        "model_cases": model_cases,
        "model_batch_size": batch,
        "per_case_ms": {k: _stages(v) for k, v in runs.items()},
        "noop_ceiling_by_batch_size": {str(b): v for b, v in ceiling_rate.items()},
        # what each no-op worker spent per case on the store (its own clock), the rest of the wall time is Ray's
        "noop_2w_per_case_ms_by_batch_size": {str(b): _stages(v) for b, v in ceiling.items()},
        "noop_local_by_batch_size": {str(b): v for b, v in local_rate.items()},
        "noop_local_per_case_ms_by_batch_size": {str(b): _stages(v) for b, v in noop_local.items()},
        # The driver's own CPU per batch while no-op workers stream: what one coordinator spends per batch
        # (submit, wait, get, bookkeeping); batch size / that is the rate at which the coordinator saturates.
        "coordinator_cpu_ms_per_batch": {str(b): cpu_per_batch[b] * 1e3 for b in cpu_per_batch},
        "coordinator_bound_cases_per_s": {str(b): b / cpu_per_batch[b] for b in cpu_per_batch},
    }
    out["goals"] = {key: {"goal": goal, "value": out[key], "met": out[key] >= goal} for key, goal in SIZE_GOALS.items()}
    return out


def summarize(profile, by_size: dict, load_before: tuple[float, ...], total_s: float) -> dict:
    """The JSON record: per working size, the driver's memory (measured at the first), the machine."""
    first = by_size[next(iter(by_size))]
    small, large = profile.memory_counts
    peaks = first.pop("memory")
    ratio = peaks[large]["peak_mb"] / peaks[small]["peak_mb"]
    out = {
        "sizes": by_size,
        "memory_ratio_10k_vs_1k": ratio,
        "driver_peak_rss_mb": {str(k): v["peak_mb"] for k, v in peaks.items()},
        "driver_rss_growth_mb": {str(k): v["growth_mb"] for k, v in peaks.items()},
        "memory_counts": [small, large],
        "memory_goal": {"goal": MEMORY_GOAL, "value": ratio, "met": ratio <= MEMORY_GOAL},
        "all_goals_met": ratio <= MEMORY_GOAL and all(g["met"] for s in by_size.values() for g in s["goals"].values()),
        "profile": asdict(profile),
        "models": "untrained networks of the demo's sizes (caudo_ray/configs/demo.yaml)",
        "cpu_count": os.cpu_count(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "torch_threads_per_worker": 1,
        "total_s": total_s,
    }
    return out


def format_table(res: dict) -> str:
    """The headline numbers with their goals, as a Markdown table: one column per working size."""
    sizes = list(res["sizes"])
    cols = [res["sizes"][s] for s in sizes]

    def row(name: str, fmt, goal: str = "", key: str | None = None) -> str:
        values = [fmt(c) for c in cols]
        met = " / ".join("yes" if c["goals"][key]["met"] else "no" for c in cols) if key else ""
        return f"| {name} | {' | '.join(values)} | {goal} | {met} |"

    lines = [f"| measurement | {' | '.join(f'{s}x{s}' for s in sizes)} | goal | met |", "|---" * (len(sizes) + 3) + "|"]
    lines += [
        row("bare calibrator loop, 1 process (cases/s)", lambda c: f"{c['bare_cases_per_s']:.1f}"),
        row("pipeline, 1 Ray worker (cases/s)", lambda c: f"{c['pipeline_1w_cases_per_s']:.1f}"),
        row("pipeline, 2 Ray workers (cases/s)", lambda c: f"{c['pipeline_2w_cases_per_s']:.1f}"),
        row("pipeline 1w / bare", lambda c: f"{c['ratio_pipeline_vs_bare']:.2f}", ">= 0.90", "ratio_pipeline_vs_bare"),
        row("  same, steady state (first batch excluded)", lambda c: f"{c['steady_ratio_pipeline_vs_bare']:.2f}"),
        row("2 workers / 1 worker", lambda c: f"{c['scaling_2w_vs_1w']:.2f}", ">= 1.7", "scaling_2w_vs_1w"),
        row("  same, steady state", lambda c: f"{c['steady_scaling_2w_vs_1w']:.2f}"),
        row(
            f"no-op ceiling, 2 workers, batch {cols[0]['noop_ceiling_batch_size']} (cases/s)",
            lambda c: f"{c['noop_ceiling_cases_per_s']:.0f}", ">= 2000", "noop_ceiling_cases_per_s",
        ),
    ]  # fmt: skip
    for b in cols[0]["noop_ceiling_by_batch_size"]:
        lines.append(row(f"no-op, 2 workers / without Ray, batch {b} (cases/s)", lambda c, b=b: f"{c['noop_ceiling_by_batch_size'][b]:.0f} / {c['noop_local_by_batch_size'][b]:.0f}"))
        lines.append(row(
            f"  no-op worker store read / write, batch {b} (ms per case)",
            lambda c, b=b: " / ".join(f"{c['noop_2w_per_case_ms_by_batch_size'][b][k]:.3f}" for k in ("store_read_ms_per_case", "store_write_ms_per_case")),
        ))  # fmt: skip
        lines.append(row(
            f"  coordinator CPU per batch of {b} / bound (ms, cases/s)",
            lambda c, b=b: f"{c['coordinator_cpu_ms_per_batch'][b]:.2f} / {c['coordinator_bound_cases_per_s'][b]:.0f}",
        ))  # fmt: skip
    for name in cols[0]["per_case_ms"]:
        lines.append(row(
            f"{name}: read / infer / DDIM / scores / write / wall (ms per case)",
            lambda c, name=name: " / ".join(f"{c['per_case_ms'][name][k]:.1f}" for k in ("store_read_ms_per_case", "infer_ms_per_case", "ddim_ms_per_case", "score_ms_per_case", "store_write_ms_per_case", "wall_ms_per_case")),
        ))  # fmt: skip
    for name in cols[0]["cold_first_result_s"]:
        lines.append(row(f"{name}: first batch back, cold pool (s)", lambda c, name=name: f"{c['cold_first_result_s'][name]:.1f}"))
    small, large = res["memory_counts"]
    lines.append(
        f"| driver peak RSS {small:,} / {large:,} cases (MB), ratio | {res['driver_peak_rss_mb'][str(small)]:.0f} / "
        f"{res['driver_peak_rss_mb'][str(large)]:.0f}, {res['memory_ratio_10k_vs_1k']:.3f} (at {sizes[0]}x{sizes[0]})"
        + " |" * (len(sizes) - 1) + f" <= {MEMORY_GOAL} | {'yes' if res['memory_goal']['met'] else 'no'} |"
    )
    return "\n".join(lines)


def log_to_mlflow(res: dict, work_dir: Path, profile_name: str) -> str:
    """Logs the results to the sqlite MLflow store in ``work_dir``; returns the run id."""
    tracker = Tracker(
        sqlite_tracking_uri(Path(work_dir) / "mlflow.db"),
        "caudo-ray-benchmarks",
        run_name=f"throughput-{profile_name}",
        artifact_root=work_dir / "mlartifacts",
        tags={"benchmark": "throughput", "profile": profile_name},
    )
    tracker.log_params({"profile": profile_name, **res["profile"], "models": res["models"], "cpu_count": res["cpu_count"]})
    metrics = {f"bench/{k}": v for k, v in flatten(res).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    one = res["sizes"][next(iter(res["sizes"]))]
    stages = one["per_case_ms"]["pipeline_1w"]
    metrics.update({
        names.CASES_PER_S: one["pipeline_1w_cases_per_s"],
        names.INFER_S_PER_CASE: stages["infer_ms_per_case"] / 1e3,
        names.DDIM_S_PER_CASE: stages["ddim_ms_per_case"] / 1e3,
        names.SCORE_S_PER_CASE: stages["score_ms_per_case"] / 1e3,
        names.STORE_S_PER_CASE: stages["store_write_ms_per_case"] / 1e3,
    })
    tracker.log_metrics(metrics, step=0)
    tracker.log_dict(res, "throughput.json")
    tracker.finish("FINISHED")
    return tracker.run_id


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a CI smoke test, not numbers to quote")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "bench-throughput")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: <work-dir>/throughput.json)")
    parser.add_argument("--keep-stores", action="store_true", help="keep the benchmark's Zarr stores afterwards")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="working sizes (default: the profile's)")
    args = parser.parse_args(argv)

    from caudo_ray.distributed.cluster import init_ray, shutdown_ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    name = "quick" if args.quick else "default"
    profile = PROFILES[name]
    work_dir = args.work_dir.resolve()
    init_ray(benchmark_config(work_dir, num_workers=2), log_to_driver=False)
    try:
        res = run_benchmark(work_dir, profile, tuple(args.sizes) if args.sizes else None)
    finally:
        shutdown_ray()  # only a Ray this call started (the CI test runs on the session's)
    res["mlflow_run_id"] = log_to_mlflow(res, work_dir, name)
    res["mlflow_tracking_uri"] = sqlite_tracking_uri(Path(work_dir) / "mlflow.db")
    out = args.out or work_dir / "throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    if not args.keep_stores:
        for store in ("model.zarr", "noop.zarr"):
            shutil.rmtree(work_dir / store, ignore_errors=True)
    print(format_table(res))
    print(f"\nJSON: {out}\nMLflow: {res['mlflow_tracking_uri']} (run {res['mlflow_run_id']})")
    return res


if __name__ == "__main__":
    main()
