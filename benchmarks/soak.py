"""Soak test: a long labelling round on a local Ray cluster while calibration workers are SIGKILLed.

``N`` phantom cases (32x32, tiny untrained networks: the work per case does not depend on the weights) stream
through ``RayExecutor.label`` on a pool of :class:`~caudo_ray.actors.CalibrationWorker`; a killer thread sends
SIGKILL to one worker process (alternating between workers) every ``--kill-every`` finished batches. Ray restarts
the actor (``max_restarts=-1``) and the executor re-queues the dead worker's in-flight batches.

At the end it checks that nothing was lost or doubled: the round's ``done`` mask covers all ``N`` cases and
every case index came back from exactly one finished batch. It prints a table and writes JSON with duration,
cases/s, kills, actor restarts (a new worker pid after a kill), re-queued batches and the driver's peak RSS.

Usage::

    python -m benchmarks.soak                          # 20,000 cases, a kill every 200 batches
    python -m benchmarks.soak --cases 300 --kill-every 4 --work-dir /tmp/soak   # smoke

Exit status 0 when every case is stored exactly once, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.throughput import RssSampler
from benchmarks.workload import DEMO_CONFIG, REPO_ROOT, phantom_store, untrained_models
from caudo_ray.config import RunConfig, load_config
from caudo_ray.rounds.executor import TrainContext
from caudo_ray.store import chunk_batches

# The conftest tiny_config's model sizes: the soak is about the runtime surviving kills, not model cost.
TINY = {
    "data.working_size": [32, 32],
    "segmenter.channels": [4, 8, 16],
    "segmenter.strides": [2, 2],
    "segmenter.num_res_units": 0,
    "calibrator.block_out_channels": [8, 16],
    "calibrator.inference_steps": 4,
}


def soak_config(work_dir: Path, num_workers: int, batch_size: int) -> RunConfig:
    """Tiny models on CPU, ``num_workers`` one-thread workers, no trainer (so the pool stays up)."""
    return load_config(
        DEMO_CONFIG,
        {
            **TINY,
            "work_dir": str(work_dir),
            "device": "cpu",
            "runtime.num_workers": num_workers,
            "runtime.cpus_per_worker": 1,
            "runtime.threads_per_worker": 1,
            "runtime.trainer_cpus": 0,
            "runtime.batch_size": batch_size,
        },
    )


class Killer(threading.Thread):
    """SIGKILLs one worker process every ``every`` finished batches, alternating between the pool's workers.

    It learns each worker's pid by asking the actor (``CalibrationWorker.pid``) in this thread, so the stream
    never waits for it; after a kill it asks again, and a different pid is one observed actor restart.
    """

    def __init__(self, workers: list, every: int):
        super().__init__(daemon=True)
        import ray

        self.ray = ray
        self.workers = workers
        self.every = every
        self.pids = ray.get([w.pid.remote() for w in workers])
        self.finished = 0  # batches finished so far; the stream loop bumps it
        self.kills = 0
        self.restarts = 0
        self.wake = threading.Event()
        self.stop = threading.Event()

    def batch_done(self) -> None:
        self.finished += 1
        if self.finished >= (self.kills + 1) * self.every:
            self.wake.set()

    def run(self) -> None:
        while not self.stop.is_set():
            self.wake.wait(0.5)
            if self.stop.is_set() or not self.wake.is_set():
                continue
            self.wake.clear()
            w = self.kills % len(self.workers)
            os.kill(self.pids[w], signal.SIGKILL)
            self.kills += 1
            pid = self._pid_after_restart(w)
            if pid is not None and pid != self.pids[w]:
                self.restarts += 1
                self.pids[w] = pid

    def _pid_after_restart(self, w: int) -> int | None:
        """The worker's pid once its actor answers again (a restarting actor refuses calls, so ask until it does);
        None if the round ends first: a restart still under way then is not counted."""
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not self.stop.is_set():
            try:
                return self.ray.get(self.workers[w].pid.remote(), timeout=5)
            except (
                self.ray.exceptions.RayActorError,
                self.ray.exceptions.ActorUnavailableError,
                self.ray.exceptions.GetTimeoutError,
            ):
                time.sleep(0.5)
        return None


def run_soak(
    work_dir: Path,
    num_cases: int,
    kill_every: int,
    num_workers: int = 2,
    batch_size: int = 16,
) -> dict:
    """Streams ``num_cases`` through a pool of ``num_workers`` with kills; returns the JSON record."""
    import ray

    from caudo_ray.distributed.executor import RayExecutor

    cfg = soak_config(work_dir, num_workers, batch_size)
    num_classes = cfg.data.phantom.num_classes
    shutil.rmtree(work_dir / "soak.zarr", ignore_errors=True)
    t0 = time.perf_counter()
    store = phantom_store(work_dir / "soak.zarr", num_cases, cfg)
    models = untrained_models(cfg, num_classes)
    build_s = time.perf_counter() - t0

    executor = RayExecutor(TrainContext(cfg, store.url, num_classes))
    try:
        # An empty first round starts the pool, so the killer knows every worker before the soak round begins.
        for _ in executor.label(0, models, iter(())):
            pass
        killer = Killer(executor._workers, kill_every)
        r = 0
        chunk = store.rounds.begin(r, {"benchmark": "soak"}, chunk_size=batch_size)
        todo = store.rounds.missing(r)
        seen = np.zeros(num_cases, dtype=np.int64)
        killer.start()
        t1 = time.perf_counter()
        with RssSampler(interval_s=0.05) as rss:
            for stats in executor.label(r, models, chunk_batches(todo, chunk)):
                seen[stats.indices] += 1
                killer.batch_done()
        stream_s = time.perf_counter() - t1
        killer.stop.set()
        killer.join()
        requeued = executor.restarts
    finally:
        executor.close()
    done = store.rounds.done(r)
    res = {
        "cases": num_cases,
        "workers": num_workers,
        "batch_size": batch_size,
        "kill_every_batches": kill_every,
        "batches": int(np.ceil(num_cases / batch_size)),
        "duration_s": stream_s,
        "cases_per_s": num_cases / stream_s,
        "store_build_s": build_s,
        "kills": killer.kills,
        "restarts": killer.restarts,
        "requeued_batches": requeued,
        "done_count": int(done.sum()),
        "cases_returned_once": int((seen == 1).sum()),
        "cases_returned_twice_or_more": int((seen > 1).sum()),
        "cases_never_returned": int((seen == 0).sum()),
        "driver_peak_rss_mb": rss.peak_mb,
        "driver_rss_growth_mb": rss.peak_mb - rss.start_mb,
        "working_size": list(cfg.data.working_size),
        "cpu_count": os.cpu_count(),
        "ray_version": ray.__version__,
    }
    res["ok"] = res["done_count"] == num_cases and res["cases_returned_once"] == num_cases
    return res


def format_table(res: dict) -> str:
    rows = [
        (
            "cases / workers / batch size",
            f"{res['cases']} / {res['workers']} / {res['batch_size']}",
        ),
        ("kill every (finished batches)", str(res["kill_every_batches"])),
        ("duration of the round (s)", f"{res['duration_s']:.1f}"),
        ("cases/s", f"{res['cases_per_s']:.1f}"),
        ("kills / observed actor restarts", f"{res['kills']} / {res['restarts']}"),
        ("re-queued batches", str(res["requeued_batches"])),
        ("done count", f"{res['done_count']} of {res['cases']}"),
        (
            "cases returned once / twice+ / never",
            f"{res['cases_returned_once']} / {res['cases_returned_twice_or_more']} / {res['cases_never_returned']}",
        ),
        (
            "driver peak RSS (MB), growth during the round",
            f"{res['driver_peak_rss_mb']:.0f}, +{res['driver_rss_growth_mb']:.1f}",
        ),
        ("every case stored exactly once", "yes" if res["ok"] else "NO"),
    ]
    lines = ["| measurement | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument(
        "--kill-every",
        type=int,
        default=200,
        help="finished batches between two SIGKILLs",
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "bench-soak")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default: <work-dir>/soak.json)",
    )
    args = parser.parse_args(argv)

    import ray

    from caudo_ray.distributed.cluster import init_ray

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    started_ray = not ray.is_initialized()
    init_ray(soak_config(work_dir, args.workers, args.batch_size), log_to_driver=False)
    try:
        res = run_soak(work_dir, args.cases, args.kill_every, args.workers, args.batch_size)
    finally:
        if started_ray:
            ray.shutdown()
    out = args.out or work_dir / "soak.json"
    out.write_text(json.dumps(res, indent=2))
    shutil.rmtree(work_dir / "soak.zarr", ignore_errors=True)
    print(format_table(res))
    print(f"\nJSON: {out}")
    return res


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
