"""A two-node Ray cluster on this machine: a lost node, fractional GPUs, a killed job driver.

``ray start --head`` (127.0.0.1) and a second node (``ray start --address``, on 127.0.0.2, label
``role=calibration``), each with 2 CPUs and one logical GPU (no CUDA here: the workers' GPU share is bookkeeping
and they compute on the CPU). Token authentication stays on, as in tests/test_jobs.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import ONE_ROUND, REPO_ROOT, require, tiny_config
from test_faults import assert_same_results, done_files
from test_jobs import RAY, free_ports, stop_cluster

from caudo_ray.config import save_config
from caudo_ray.store import PseudoLabelStore
from caudo_ray.workspace import Workspace

pytestmark = [pytest.mark.faults, pytest.mark.slow]

# The GCS declares a silent node dead after about 3 s instead of about 25 s.
FAST_HEALTH_CHECKS = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}
NODE_MARK = "CAUDO_TEST_NODE"

# The driver of the node-loss run: a whole one-round run whose labelling stops handing out batches once
# ``PAUSE_AT`` are out (each of the two workers then has its max_in_flight batches queued), writes where the
# workers are to <ready>, and goes on when <go> exists. Then it writes what it saw to <out>.
DRIVER = """
import json, sys, time
from pathlib import Path
import ray
from caudo_ray.config import load_config
from caudo_ray.distributed.executor import RayExecutor
from caudo_ray.run.coordinator import Coordinator

PAUSE_AT = 4
cfg = load_config(sys.argv[1])
ready, go, out = (Path(p) for p in sys.argv[2:5])

class Paused(RayExecutor):
    def label(self, r, models, batches):
        self.labelled = []
        for stats in super().label(r, models, self._pause(batches)):
            self.labelled.extend(int(i) for i in stats.indices)
            yield stats
        self.after = ray.get([w.where.remote() for w in self._workers], timeout=120)

    def _pause(self, batches):
        for n, indices in enumerate(batches):
            if n == 0:  # the pool exists; nothing is queued on it yet
                self.before = ray.get([w.where.remote() for w in self._workers], timeout=300)
            if n == PAUSE_AT:
                ready.write_text(json.dumps(self.before))
                while not go.exists():
                    time.sleep(0.05)
                # The rest of the round goes out once the cluster knows the node is gone.
                lost = {w["node_id"] for w in self.before}
                while any(node["Alive"] for node in ray.nodes() if node["NodeID"] in lost):
                    time.sleep(0.1)
            yield indices

executors = []
result = Coordinator(cfg, executor_factory=lambda ctx: executors.append(Paused(ctx)) or executors[-1], progress=False).run()
ex = executors[0]
out.write_text(json.dumps({
    "driver_node": ray.get_runtime_context().get_node_id(),
    "before": ex.before, "after": ex.after, "labelled": ex.labelled, "requeued": ex.restarts,
    "store_url": result.store_url,
}))
"""


@pytest.fixture(scope="module")
def two_nodes():
    """Head and second node, own temp dirs, ports and token; yields ``(env, gcs_address, dashboard_url, temp_dir)``."""
    require(RAY.exists(), f"the ray CLI at {RAY}", "make venv: ray[default] installs it")
    temp = Path(tempfile.mkdtemp(prefix="crn-", dir="/tmp"))  # short: unix socket paths are limited to ~107 characters
    token = temp / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]),
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, client, agent, agent2 = free_ports(5)
    head = [
        str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", "2",
        "--num-gpus", "1", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent), "--temp-dir", str(temp / "head"), "--disable-usage-stats",
        "--system-config", json.dumps(FAST_HEALTH_CHECKS),
    ]  # fmt: skip
    second = [
        str(RAY), "start", "--address", f"127.0.0.1:{gcs}", "--node-ip-address", "127.0.0.2", "--num-cpus", "2",
        "--num-gpus", "1", "--labels", "role=calibration", "--dashboard-agent-listen-port", str(agent2),
        "--temp-dir", str(temp / "node2"), "--disable-usage-stats",
    ]  # fmt: skip
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, text=True, timeout=180)
        subprocess.run(second, env={**env, NODE_MARK: str(temp)}, check=True, capture_output=True, text=True, timeout=180)
        yield env, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", temp
    finally:
        # Both nodes' processes inherit the token path, which names this cluster's temp dir (test_jobs).
        stop_cluster(temp)


def _second_node_raylet(temp: Path) -> int:
    marker = f"{NODE_MARK}={temp}".encode()
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and marker in (proc / "environ").read_bytes().split(b"\0")
                and (proc / "cmdline").read_bytes().split(b"\0")[0].endswith(b"/raylet")
            ):
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError("the second node's raylet is not running")


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"the driver ended first: {log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout_s} s: {log.read_text()[-4000:]}"
        time.sleep(0.1)


def test_a_lost_node_s_round_completes_on_the_survivor(two_nodes, clean_one_round, tmp_path):
    """Workers on the second node (two sharing its GPU); its raylet is SIGKILLed with their batches in flight."""
    env, address, _, temp = two_nodes
    cfg = tiny_config(
        tmp_path / "run",
        **ONE_ROUND,
        **{
            "runtime.use_ray": True,
            "runtime.address": address,
            "runtime.num_workers": 2,
            "runtime.cpus_per_worker": 1,
            "runtime.gpus_per_worker": 0.5,
            "runtime.worker_labels": ["role=calibration"],
            "runtime.trainer_cpus": 0,
            "runtime.batch_size": 2,
        },
    )
    config, ready, go, out = tmp_path / "run.yaml", tmp_path / "ready", tmp_path / "go", tmp_path / "out.json"
    save_config(cfg, config)
    log = tmp_path / "driver.log"
    with open(log, "w") as sink:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(config), str(ready), str(go), str(out)], env=env, stdout=sink, stderr=sink)
    try:
        _wait_for(ready, driver, log, 400)
        before = json.loads(ready.read_text())
        os.kill(_second_node_raylet(temp), signal.SIGKILL)
        go.touch()
        driver.wait(timeout=400)
    finally:
        driver.kill()
    assert driver.returncode == 0, log.read_text()[-4000:]
    seen = json.loads(out.read_text())

    # Before: both workers on the second node, sharing its one GPU; after: both on the head, sharing its GPU.
    nodes_before, nodes_after = {w["node_id"] for w in before}, {w["node_id"] for w in seen["after"]}
    assert len(nodes_before) == 1 and seen["driver_node"] not in nodes_before
    assert nodes_after == {seen["driver_node"]}
    for placement in (before, seen["after"]):
        assert [w["gpu_ids"] for w in placement] == [placement[0]["gpu_ids"]] * 2 and len(placement[0]["gpu_ids"]) == 1
    assert seen["requeued"] >= 1  # the lost node's in-flight batches were handed out again

    store = PseudoLabelStore.open(seen["store_url"])
    usable = np.flatnonzero(store.usable_mask())
    assert sorted(seen["labelled"]) == usable.tolist()  # every case came back from exactly one batch
    assert store.rounds.committed() == [0] and store.rounds.done(0)[usable].all()
    assert_same_results(store, PseudoLabelStore.open(clean_one_round[1].store_url), cfg.rounds)


def _job_driver(config: Path) -> int | None:
    """The pid of the job driver running ``jobs/self_training.py --config <config>``, None before it starts."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        args = cmdline.split(b"\0")
        # The Python process itself, not the shell the job supervisor starts it through.
        is_python = b"python" in Path(args[0].decode()).name.encode()
        if proc.name.isdigit() and is_python and b"jobs/self_training.py" in args and str(config).encode() in args:
            return int(proc.name)
    return None


def _ray_job(env, dashboard: str, command: str, *args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    """``ray job <command> --address <dashboard> <args>`` (the address before the args: a job's entry point ends them)."""
    return subprocess.run(
        [str(RAY), "job", command, "--address", dashboard, *args], env=env, check=False, capture_output=True, text=True, timeout=timeout
    )


def test_a_killed_job_driver_is_resubmitted_and_resumes(two_nodes, tmp_path):
    env, _, dashboard, _ = two_nodes
    work = tmp_path / "run"
    cfg = tiny_config(
        work, **ONE_ROUND, **{"runtime.num_workers": 1, "runtime.batch_size": 1, "runtime.trainer_cpus": 0}
    )
    config = tmp_path / "job.yaml"
    save_config(cfg, config)
    store_url = Workspace.of(cfg).store_url
    submit = [
        "submit", "--working-dir", str(REPO_ROOT),
        "--runtime-env-json", '{"excludes": [".venv", ".git", "runs", "benchmarks/results", "*.zarr"]}',
    ]  # fmt: skip
    entry = ["--", sys.executable, "jobs/self_training.py", "--config", str(config), "--quiet"]
    first = _ray_job(env, dashboard, *submit, "--no-wait", *entry, timeout=180)
    assert first.returncode == 0, first.stdout + first.stderr
    job_id = re.search(r"Job '(\S+)' submitted successfully", first.stdout + first.stderr).group(1)

    deadline = time.monotonic() + 400
    while (driver := _job_driver(config)) is None:
        assert time.monotonic() < deadline, _ray_job(env, dashboard, "logs", job_id).stdout[-3000:]
        time.sleep(0.1)
    while done_files(store_url, 0) < 3:
        assert time.monotonic() < deadline, _ray_job(env, dashboard, "logs", job_id).stdout[-3000:]
        time.sleep(0.005)
    os.kill(driver, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while f"Job '{job_id}' failed" not in (status := _ray_job(env, dashboard, "status", job_id, timeout=60)).stdout + status.stderr:
        assert time.monotonic() < deadline, f"the killed driver's job never failed: {status.stdout} {status.stderr}"
        time.sleep(1)

    store = PseudoLabelStore.open(store_url)
    done_before = int((store.rounds.done(0) & store.usable_mask()).sum())
    assert 0 < done_before < store.usable_mask().sum() and store.rounds.committed() == []

    again = _ray_job(env, dashboard, *submit, *entry)
    output = again.stdout + again.stderr
    assert again.returncode == 0 and re.search(r"Job '\S+' succeeded", output), output[-4000:]
    # run.log has every line of both drivers (Ray's log tail of a job may drop some).
    resumed = re.findall(r"round 0: labelling (\d+) cases, keeping (\d+) already done", (work / "run.log").read_text())
    assert len(resumed) == 2, resumed
    labelled, kept = map(int, resumed[-1])
    assert kept >= done_before and labelled + kept == store.usable_mask().sum()
    store = PseudoLabelStore.open(store_url)
    assert store.rounds.committed() == [0] and (work / "models" / "final.pt").is_file()
