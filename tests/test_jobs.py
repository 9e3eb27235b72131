"""``ray start --head`` on loopback with token auth, ``ray job submit`` of the jobs/ entry points, ``ray stop``."""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO_ROOT, require, tiny_config
from mlflow import MlflowClient

from caudo_ray.config import save_config
from caudo_ray.store import PseudoLabelStore
from caudo_ray.tracking import names

RAY = Path(sys.executable).with_name("ray")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_cluster():
    """A separate head node: own temp dir, ports and token file, so it never meets ``ray_session`` or other users.

    Yields ``(env, dashboard_url)``; the cluster is stopped whatever the test does.
    """
    require(RAY.exists(), f"the ray CLI at {RAY}", "make venv: ray[default] installs it")
    # Short: Ray puts unix sockets under the temp dir, whose paths are limited to ~107 characters.
    temp = Path(tempfile.mkdtemp(prefix="crj-", dir="/tmp"))
    token = temp / "auth_token"
    token.write_text(uuid.uuid4().hex)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",  # keep Ray's token auth on; every client reads the token from this file
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "PYTHONPATH": str(REPO_ROOT),
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, client, agent = free_ports(4)
    start = [
        str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
        "--num-cpus", "2", "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent), "--temp-dir", str(temp), "--disable-usage-stats",
    ]  # fmt: skip
    try:
        subprocess.run(start, env=env, check=True, capture_output=True, text=True, timeout=180)
        yield env, f"http://127.0.0.1:{dashboard}"
    finally:
        stop_cluster(temp)


def stop_cluster(temp: Path) -> None:
    """Stop the cluster whose temp dir is ``temp`` and remove that dir.

    `ray stop` stops every cluster of this user on the machine; this kills only this one's processes.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _cluster_pids(temp):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(2)
    shutil.rmtree(temp, ignore_errors=True)


def _cluster_pids(temp: Path) -> list[int]:
    """Processes of this cluster: every one inherits its token path, which names the cluster's own temp dir.

    The environment rather than the command line: Ray's agents rename their process titles.
    """
    marker = f"RAY_AUTH_TOKEN_PATH={temp / 'auth_token'}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _submit(ray_cluster, job: str, config: Path) -> str:
    """``ray job submit`` a jobs/ script with ``--config``; returns its output once the job succeeded."""
    env, address = ray_cluster
    submit = [
        str(RAY), "job", "submit", "--address", address, "--working-dir", str(REPO_ROOT),
        "--runtime-env-json", '{"excludes": [".venv", ".git", "runs", "benchmarks/results", "*.zarr"]}',
        "--", sys.executable, job, "--config", str(config), "--quiet",
    ]  # fmt: skip
    proc = subprocess.run(submit, check=False, env=env, capture_output=True, text=True, timeout=420)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert re.search(r"Job '\S+' succeeded", output), output[-4000:]
    return output


def test_job_submit_runs_self_training(ray_cluster, tmp_path):
    work = tmp_path / "run"
    config = tmp_path / "job.yaml"
    overrides = {"rounds": 1, "calibrator.enabled": False, "tracking.num_overlays": 0, "runtime.num_workers": 1}
    save_config(tiny_config(work, **overrides), config)
    _submit(ray_cluster, "jobs/self_training.py", config)
    store = PseudoLabelStore.open(str(work / "store.zarr"))
    assert store.rounds.committed() == [0] and store.rounds.done(0)[store.usable_mask()].all()
    assert (work / "models" / "final.pt").is_file() and (work / "mlflow.db").is_file()


def test_job_submit_runs_a_tune_search(ray_cluster, tmp_path):
    work = tmp_path / "search"
    config = tmp_path / "tune.yaml"
    search = {
        "tune.guidance_strength": {"grid": [0.0, 2.0]},
        "tune.calibration_strength": {"grid": [1.0]},
        "tune.inference_steps": {"grid": [4]},
        "tune.eval_cases": 2,
        "tune.eval_batch_size": 1,
        "tune.cpus_per_trial": 0.5,
        # Both trials run every step (ASHA stops none before its grace period), so the best is chosen between two
        # complete trials; the calibration's changes are kept whole, so guidance strength moves the objective
        # (behind the default rules both trials kept the same labels here).
        "tune.grace_period": 2,
        "calibrator.gate": None,
        "calibrator.arbitrate": False,
        "calibrator.revert_if_less_reliable": False,
    }
    save_config(tiny_config(work, **search), config)
    output = _submit(ray_cluster, "jobs/tune_guidance.py", config)
    # caudo-ray tune prints "best <objective>: <value> with <params>".
    printed = re.search(r"^best \w+: (\S+) with (\{.*\})$", output, re.MULTILINE)
    value, best = float(printed.group(1)), ast.literal_eval(printed.group(2))
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    parent = client.get_run(re.search(r"MLflow parent run (\w+)", output).group(1))
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert parent.info.status == "FINISHED" and len(children) == 2
    # The best is the trial whose child run has the highest objective, with that objective (printed to 4 places).
    objectives = {float(c.data.params[names.PARAM_GUIDANCE]): c.data.metrics[names.METRIC_OBJECTIVE] for c in children}
    assert set(objectives) == {0.0, 2.0} and len(set(objectives.values())) == 2, objectives
    assert objectives[best[names.PARAM_GUIDANCE]] == max(objectives.values()), (best, objectives)
    assert value == pytest.approx(max(objectives.values()), abs=5e-5)
