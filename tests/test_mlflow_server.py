"""A real ``mlflow server`` on 127.0.0.1 serves a finished run's metrics over its REST API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import tiny_config
from mlflow import MlflowClient

from caudo_ray.run.coordinator import Coordinator
from caudo_ray.tracking import names

MLFLOW = Path(sys.executable).with_name("mlflow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, json.loads(response.read())


def _wait_until_up(server: subprocess.Popen, base: str, log: Path, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{base}/health", timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError(f"mlflow server did not answer within {limit_s} s:\n{log.read_text()[-3000:]}")


def test_mlflow_server_serves_the_run(tmp_path):
    result = Coordinator(tiny_config(tmp_path / "run", rounds=1), progress=False).run()
    expected = [
        (m.step, m.value)
        for m in MlflowClient(result.tracking_uri).get_metric_history(result.run_id, names.PSEUDO_DICE_CALIBRATED)
    ]
    assert len(expected) == 1

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [
                str(MLFLOW),
                "server",
                "--backend-store-uri",
                result.tracking_uri,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_until_up(server, base, log)
        status, body = _get(
            f"{base}/api/2.0/mlflow/metrics/get-history?run_id={result.run_id}&metric_key={names.PSEUDO_DICE_CALIBRATED}"
        )
        assert status == 200
        assert sorted((int(m["step"]), m["value"]) for m in body["metrics"]) == sorted(expected)

        # The run's page in the UI links to its dashboard: the report run is served too.
        status, body = _get(f"{base}/api/2.0/mlflow/runs/get?run_id={result.run_id}")
        tags = {t["key"]: t["value"] for t in body["run"]["data"]["tags"]}
        status, report = _get(f"{base}/api/2.0/mlflow/runs/get?run_id={tags['caudo_ray.dashboard_run_id']}")
        assert status == 200 and report["run"]["info"]["status"] == "FINISHED"
    finally:
        # The server runs its workers as children in its own session: end that whole process group.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=20)
