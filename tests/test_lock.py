"""One run per store: the lock is taken before anything is written, refuses a second run (in another process or
this one), is taken over only from a holder that is gone, and is held by a Tune search from start to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import tiny_config

from caudo_ray.config import save_config
from caudo_ray.distributed import tune
from caudo_ray.errors import StoreError
from caudo_ray.run.coordinator import Coordinator
from caudo_ray.run.prepare import prepare_run
from caudo_ray.store import StoreLock

pytestmark = pytest.mark.faults

HOLD = """
import sys, time
from caudo_ray.store import StoreLock
StoreLock(sys.argv[1]).acquire(owner="the other run")
print("locked", flush=True)
time.sleep(60)
"""

# Two fresh starts of one config at once: each says it is ready, waits for the go file, then prepares the run and
# holds it a while.
RACE = """
import os, sys, time
from caudo_ray.config import load_config
from caudo_ray.errors import StoreError
from caudo_ray.run.prepare import prepare_run
cfg = load_config(sys.argv[1])
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
try:
    prepared = prepare_run(cfg, progress=False)
except StoreError as err:
    print("refused:", err, flush=True)
    sys.exit(1)
print("prepared", flush=True)
time.sleep(2)
prepared.lock.release()
"""


def _record(**fields) -> str:
    base = {"owner": "elsewhere", "pid": 1, "hostname": socket.gethostname(), "time": "2020-01-01T00:00:00+00:00"}
    return json.dumps({**base, **fields})


def test_second_run_on_a_locked_store_is_refused(tiny_cfg):
    prepared = prepare_run(tiny_cfg, progress=False)
    prepared.lock.release()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, prepared.workspace.store_url], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match="in use by 'the other run'"):
            Coordinator(tiny_cfg, progress=False).run()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its stale lock is taken over and the run goes through.
    time.sleep(0.1)
    result = Coordinator(tiny_cfg, progress=False).run()
    assert len(result.rounds) == tiny_cfg.rounds


def test_lock_is_not_reentrant_and_a_dead_holder_is_taken_over(tmp_path):
    url = tmp_path / "store.zarr"
    first, second = StoreLock(url), StoreLock(url)
    assert first.acquire("run-a")
    assert first.acquire("run-a")  # the same object: harmless
    with pytest.raises(StoreError, match=f"in use by 'run-a' in this process \\(pid {os.getpid()}\\)"):
        second.acquire("run-b")  # a second run in this process is refused like any other
    first.release()
    assert not url.exists()  # the lock came first and nothing else was stored: no empty store left behind
    assert second.acquire("run-b")
    second.release()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    url.mkdir()
    (url / ".lock").write_text(_record(owner="crashed", pid=int(dead.stdout)))
    assert second.acquire("run-c")
    assert json.loads((url / ".lock").read_text())["owner"] == "run-c"
    second.release()
    assert sorted(p.name for p in url.iterdir()) == []

    (url / ".lock").write_text("not json")
    with pytest.raises(StoreError, match="unreadable"):
        StoreLock(url).acquire("run-d")


def test_lock_of_another_host_is_taken_over_once_its_heartbeat_expires(tmp_path):
    url = tmp_path / "store.zarr"
    url.mkdir()
    lock_file = url / ".lock"
    lock_file.write_text(_record(owner="run on node-7", hostname="node-7", pid=os.getpid(), lease_s=30))
    with pytest.raises(StoreError, match="in use by 'run on node-7' \\(pid \\d+ on node-7"):
        StoreLock(url).acquire("run-b")  # its pid cannot be checked from here, and its heartbeat is fresh
    old = time.time() - 31
    os.utime(lock_file, (old, old))
    taker = StoreLock(url)
    assert taker.acquire("run-b")
    assert json.loads(lock_file.read_text())["owner"] == "run-b"
    taker.release()


def test_heartbeat_keeps_the_lock_fresh_and_a_lost_lock_is_reported(tmp_path):
    url = tmp_path / "store.zarr"
    lock = StoreLock(url, lease_s=0.3)
    assert lock.acquire("run-a")
    lock_file = url / ".lock"
    old = time.time() - 100
    os.utime(lock_file, (old, old))
    # Renewed every lease / 3; the deadline only leaves a loaded machine time to schedule the heartbeat thread.
    deadline = time.monotonic() + 10
    while time.time() - lock_file.stat().st_mtime > 1.0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert time.time() - lock_file.stat().st_mtime < 1.0
    lock.check()

    lock_file.write_text(_record(owner="a taker", hostname="node-7"))  # taken over behind its back
    deadline = time.monotonic() + 10
    while lock._lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(StoreError, match="lost its lock"):
        lock.check()
    lock.release()
    assert json.loads(lock_file.read_text())["owner"] == "a taker"  # release never deletes another run's lock


def test_the_lock_is_taken_before_anything_is_written(tmp_path):
    """A fresh start on a store another run has locked writes nothing: no config, split, phantoms or store."""
    cfg = tiny_config(tmp_path / "run")
    store_url = tmp_path / "run" / "store.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(store_url)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match="in use by 'the other run'"):
            prepare_run(cfg, progress=False)
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["store.zarr"]
        assert sorted(p.name for p in store_url.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()


def test_two_fresh_starts_at_once_one_prepares_the_other_is_refused(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    config = tmp_path / "run.yaml"
    save_config(cfg, config)
    go = tmp_path / "go"
    starts = [
        subprocess.Popen([sys.executable, "-c", RACE, str(config), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    # Both have imported caudo_ray and wait for the go, however long their start took on a loaded machine.
    for p in starts:
        assert p.stdout.readline().strip() == "ready", p.communicate(timeout=300)
    go.touch()
    outputs = [p.communicate(timeout=300) for p in starts]
    codes = sorted(p.returncode for p in starts)
    assert codes == [0, 1], outputs
    refused = next(out for out, _ in outputs if out.startswith("refused"))
    assert f"in use by 'caudo-ray run {(tmp_path / 'run').resolve()}'" in refused
    # The winner's work dir is whole: a later run resumes it.
    prepared = prepare_run(cfg, progress=False)
    try:
        assert prepared.store.images_missing().size == len(prepared.store.skipped)
    finally:
        prepared.lock.release()


def test_a_second_run_in_the_same_process_is_refused(tiny_cfg):
    prepared = prepare_run(tiny_cfg, progress=False)
    try:
        with pytest.raises(StoreError, match="in this process"):
            prepare_run(tiny_cfg, progress=False)
    finally:
        prepared.lock.release()
    prepare_run(tiny_cfg, progress=False).lock.release()  # free again once released


def test_a_tune_search_holds_the_lock_from_start_to_end(tiny_cfg, monkeypatch):
    seen = {}

    def search(cfg, prepared, space, t_start, progress):
        where = prepared.lock.where
        seen["holder"] = json.loads(Path(where).read_text())["owner"]
        with pytest.raises(StoreError, match="in use by 'caudo-ray tune"):
            prepare_run(cfg, progress=False)
        raise RuntimeError("search failed")

    monkeypatch.setattr(tune, "_search", search)
    with pytest.raises(RuntimeError, match="search failed"):
        tune.run_tune(tiny_cfg, progress=False)
    assert seen["holder"].startswith("caudo-ray tune ")
    prepare_run(tiny_cfg, progress=False).lock.release()  # released when the search ended, even by an error


def test_a_store_on_another_fsspec_protocol_gets_no_lock():
    assert StoreLock(f"memory://caudo-{uuid.uuid4().hex}/store.zarr").acquire("run-a") is False
