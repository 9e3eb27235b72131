"""Ends a local Ray cluster's processes once the driver that started it is gone, even after a SIGKILL.

A driver that starts a local Ray (``cluster.init_ray``) starts this first, as ``python -m
caudo_ray.distributed.reaper TOKEN`` with a pipe on its standard input, and starts Ray with ``TOKEN`` in the
environment variable :data:`MARK`, which every process of that cluster inherits (GCS, raylet, the dashboard and
runtime-env agents, workers). When the driver closes the pipe or dies (the kernel closes it then), the read here
returns; every process still carrying the token, and every descendant of one, gets SIGTERM, and SIGKILL after a
grace period. Ray's agents
outlive a SIGKILLed driver and ignore SIGTERM, so without this each killed run leaked them.

Only processes whose environment carries this token, or whose parent's does, are touched: that one driver's
cluster started them all.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

MARK = "CAUDO_RAY_LOCAL_CLUSTER"
GRACE_S = 5.0


def marked_pids(token: str) -> list[int]:
    """Live (not zombie) processes whose environment has ``MARK=token``, and their descendants; this one excluded.

    Descendants count too: whatever a marked process (the raylet) started belongs to the cluster, whatever
    environment it was given.
    """
    wanted = f"{MARK}={token}".encode()
    marked: set[int] = set()
    parent: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            state, ppid = _state(proc)
            if state == "Z":
                continue
            parent[int(proc.name)] = ppid
            if wanted in (proc / "environ").read_bytes().split(b"\0"):
                marked.add(int(proc.name))
        except OSError:
            continue  # gone, or not ours to read
    found = set(marked)
    for pid in parent:
        ancestor = parent.get(pid)
        while ancestor is not None and ancestor not in found and ancestor > 1:
            ancestor = parent.get(ancestor)
        if ancestor in found:
            found.add(pid)
    return sorted(found)


def _state(proc: Path) -> tuple[str, int]:
    """(state letter, parent pid) of a process."""
    # They follow the parenthesised command name, which may itself hold spaces or parentheses.
    fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def reap(token: str, grace_s: float = GRACE_S) -> int:
    """SIGTERMs the marked processes, SIGKILLs those left after ``grace_s``; returns how many it found."""
    found = pids = marked_pids(token)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = set(marked_pids(token))
            pids = [p for p in pids if p in alive]
    return len(found)


def main(argv: list[str]) -> int:
    token = argv[0]
    # Ctrl-C in the driver's terminal must not take the reaper first; it leaves when its job is done.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sys.stdin.buffer.read()
    reap(token)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
