"""A store on S3: moto's S3 server on 127.0.0.1 (started here) holds it. The lock refuses a second run naming the
holder, a stale lock is taken over and a lost one reported, and the whole self-training loop runs against it."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
from conftest import require, tiny_config
from test_coordinator import assert_complete_run

from caudo_ray.errors import StoreError
from caudo_ray.run.coordinator import Coordinator
from caudo_ray.run.prepare import prepare_run
from caudo_ray.store import StoreLock

pytestmark = pytest.mark.faults

MOTO_SERVER = Path(sys.executable).with_name("moto_server")
BUCKET = "caudo-runs"

HOLD = """
import sys, time
from caudo_ray.store import StoreLock
StoreLock(sys.argv[1]).acquire(owner="the other run")
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port; the S3 client of this process and its children points there."""
    require(importlib.util.find_spec("s3fs") is not None, "s3fs", "make venv: the test extra installs it")
    require(MOTO_SERVER.exists(), f"moto_server at {MOTO_SERVER}", "make venv: the test extra installs moto[server]")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.1)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            mp.setenv(key, value)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        try:
            yield fs
        finally:
            server.kill()
            server.wait()
            fsspec.filesystem("s3").clear_instance_cache()


def _record(**fields) -> bytes:
    return json.dumps({"owner": "run on node-7", "pid": 4242, "hostname": "node-7", "time": "2020-01-01T00:00:00+00:00", **fields}).encode()


def test_a_second_run_on_an_s3_store_is_refused_naming_the_holder(s3, tmp_path):
    url = f"s3://{BUCKET}/refused/store.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, url], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = tiny_config(tmp_path / "run", **{"runtime.store_url": url})
        with pytest.raises(StoreError, match=rf"in use by 'the other run' \(pid {holder.pid} on {socket.gethostname()}"):
            prepare_run(cfg, progress=False)
        assert not (tmp_path / "run").exists()  # refused before anything was written
        assert s3.ls(f"{BUCKET}/refused/store.zarr") == [f"{BUCKET}/refused/store.zarr/.lock"]
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_s3_lock_is_taken_over_and_a_lost_one_reported(s3):
    url = f"s3://{BUCKET}/stale/store.zarr"
    lock_key = f"{BUCKET}/stale/store.zarr/.lock"
    s3.pipe(lock_key, _record(lease_s=60))
    with pytest.raises(StoreError, match=r"in use by 'run on node-7' \(pid 4242 on node-7"):
        StoreLock(url).acquire("run-b")  # a live heartbeat on a host whose pids cannot be checked from here

    s3.pipe(lock_key, _record(lease_s=1))
    time.sleep(1.5)  # its heartbeat (the object's LastModified) is now older than its lease
    taker = StoreLock(url, lease_s=0.6)
    assert taker.acquire("run-b")
    assert json.loads(s3.cat(lock_key))["owner"] == "run-b"
    # Its heartbeat renews the object: LastModified (what another host reads, to the second) moves on, and the
    # lock, past its 0.6 s lease by then, is still its own.
    taken = s3.info(lock_key, refresh=True)["LastModified"]
    deadline = time.monotonic() + 10
    while s3.info(lock_key, refresh=True)["LastModified"] <= taken:
        assert time.monotonic() < deadline, f"the lock object's LastModified stayed at {taken}"
        time.sleep(0.1)
    taker.check()
    assert json.loads(s3.cat(lock_key))["owner"] == "run-b"

    s3.pipe(lock_key, _record(owner="a taker", lease_s=60))  # taken over behind its back
    deadline = time.monotonic() + 10
    while taker._lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(StoreError, match="lost its lock"):
        taker.check()
    taker.release()
    assert json.loads(s3.cat(lock_key))["owner"] == "a taker"  # release never deletes another run's lock


def test_the_self_training_loop_runs_on_an_s3_store(s3, tmp_path):
    url = f"s3://{BUCKET}/loop/store.zarr"
    cfg = tiny_config(tmp_path / "run", **{"runtime.store_url": url})
    result = Coordinator(cfg, progress=False).run()
    assert result.store_url == url
    store = assert_complete_run(cfg, result)
    assert store.rounds.chunk_size(0) == cfg.runtime.batch_size
    assert not s3.exists(f"{BUCKET}/loop/store.zarr/.lock")  # released at the end
    assert not (Path(cfg.work_dir) / "store.zarr").exists() and "zarr.json" in {
        os.path.basename(p) for p in s3.ls(f"{BUCKET}/loop/store.zarr")
    }
