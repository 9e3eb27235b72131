"""Stopping a run from outside: SIGTERM and Ctrl-C end it cleanly, a SIGKILLed driver leaves no process behind,
and the same command resumes after each, ending where an uninterrupted run ends.

The driver runs in the default mode (a local Ray it starts itself) for SIGTERM and SIGKILL; every process of the
run (the driver, Ray's GCS, raylet, agents and workers, the reaper) inherits a marker in its environment, which
is how they are counted.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO_ROOT
from mlflow import MlflowClient
from test_cli import write_config
from test_faults import assert_same_results, done_files

from caudo_ray.config import load_config
from caudo_ray.store import PseudoLabelStore
from caudo_ray.workspace import Workspace

pytestmark = [pytest.mark.faults, pytest.mark.slow]

MARK = "CAUDO_TEST_RUN"
# Processes of a local Ray, by what their command lines contain. The agents (renamed once started) are what a
# killed driver used to leave behind.
LOCAL_RAY = {
    "GCS": ("gcs_server",),
    "raylet": ("raylet",),
    "dashboard agent": ("ray::DashboardAgent", "dashboard/agent.py"),
    "runtime-env agent": ("ray::RuntimeEnvAgent", "runtime_env/agent"),
}
CAUDO_RAY = REPO_ROOT / ".venv" / "bin" / "caudo-ray"


def run_processes(mark: str) -> dict[int, str]:
    """Live (not zombie) processes carrying ``MARK=mark``: pid -> command line."""
    wanted = f"{MARK}={mark}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and wanted in (proc / "environ").read_bytes().split(b"\0")
                and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            ):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def wait_until_gone(mark: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while (left := run_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"left behind: {left}"


def start(command: list[str], mark: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, MARK: mark, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    with open(log, "w") as sink:
        return subprocess.Popen(command, env=env, stdout=sink, stderr=sink, start_new_session=True)


def stop_after(driver: subprocess.Popen, store_url: str, batches: int, sig: int, log: Path) -> None:
    """Sends ``sig`` to the driver once ``batches`` batches of round 0 are done, and waits for it to end."""
    deadline = time.monotonic() + 400  # generous: a local Ray start and worker imports take minutes on busy cores
    while done_files(store_url, 0) < batches:
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.005)
    driver.send_signal(sig)
    driver.wait(timeout=180)


def test_stopped_and_killed_drivers_leave_nothing_behind_and_resume(clean_one_round, tmp_path):
    config = write_config(
        tmp_path / "run.yaml",
        tmp_path / "run",
        **{"runtime.use_ray": True, "runtime.num_workers": 1, "runtime.batch_size": 1, "runtime.trainer_cpus": 0},
    )
    cfg = load_config(config)
    assert cfg.method_hash() == clean_one_round[0].method_hash()
    ws = Workspace.of(cfg)
    command = [str(CAUDO_RAY), "run", "--quiet", "--config", str(config)]

    # 1. SIGTERM to a Ray-mode driver mid-round: a clean stop.
    mark, log = uuid.uuid4().hex, tmp_path / "sigterm.log"
    driver = start(command, mark, log)
    deadline = time.monotonic() + 400
    while done_files(ws.store_url, 0) < 2:
        assert driver.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    running = sorted(run_processes(mark).values())
    for part, names in LOCAL_RAY.items():
        assert any(name in c for c in running for name in names), (part, running)
    stop_after(driver, ws.store_url, 3, signal.SIGTERM, log)
    output = log.read_text()
    assert driver.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert output.rstrip().splitlines()[-1] == f"caudo-ray: stopped by SIGTERM; what was stored is kept. Resume with: caudo-ray run --quiet --config {config}"
    info = ws.read_run_info()
    assert MlflowClient(tracking_uri=info["tracking_uri"]).get_run(info["run_id"]).info.status == "KILLED"
    assert not (Path(ws.store_url) / ".lock").exists()
    wait_until_gone(mark)  # the local Ray was shut down
    after_term = int(PseudoLabelStore.open(ws.store_url).rounds.done(0).sum())

    # 2. SIGKILL of the resumed driver mid-round: nothing it started may outlive it (Ray's agents did, ~210 MB a run).
    mark, log = uuid.uuid4().hex, tmp_path / "sigkill.log"
    driver = start(command, mark, log)
    stop_after(driver, ws.store_url, after_term + 3, signal.SIGKILL, log)
    assert driver.returncode == -signal.SIGKILL
    wait_until_gone(mark)
    after_kill = int(PseudoLabelStore.open(ws.store_url).rounds.done(0).sum())
    assert after_kill > after_term

    # 3. Ctrl-C (in process: --no-ray, the same stop path without a third cluster start).
    mark, log = uuid.uuid4().hex, tmp_path / "sigint.log"
    driver = start([*command, "--no-ray"], mark, log)
    stop_after(driver, ws.store_url, after_kill + 2, signal.SIGINT, log)
    output = log.read_text()
    assert driver.returncode == 128 + signal.SIGINT and "Traceback" not in output, output[-3000:]
    assert "caudo-ray: stopped by SIGINT; what was stored is kept." in output
    assert not (Path(ws.store_url) / ".lock").exists()

    # 4. The same command resumes, labels only what is left, and ends where an uninterrupted run ends.
    store = PseudoLabelStore.open(ws.store_url)
    kept = int((store.rounds.done(0) & store.usable_mask()).sum())
    assert kept < store.usable_mask().sum()
    rerun = subprocess.run([*command, "--no-ray"], check=False, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    labelled, resumed_kept = map(int, re.search(r"round 0: labelling (\d+) cases, keeping (\d+) already done", rerun.stderr).groups())
    assert (labelled, resumed_kept) == (store.usable_mask().sum() - kept, kept)
    assert_same_results(PseudoLabelStore.open(ws.store_url), PseudoLabelStore.open(clean_one_round[1].store_url), cfg.rounds)
    assert MlflowClient(tracking_uri=info["tracking_uri"]).get_run(info["run_id"]).info.status == "FINISHED"
