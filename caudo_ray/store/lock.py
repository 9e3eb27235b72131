"""The advisory single-writer lock of a store: one run at a time writes to it."""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid
from pathlib import Path

from caudo_ray.errors import StoreError
from caudo_ray.store.layout import local_path, now

log = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """The lock file ``<store>/.lock`` naming the run that holds it.

    A lock left by a dead process on this host is taken over. Re-acquiring a lock this process already holds for
    the same owner succeeds.

    Args:
        url: the store's location.
    """

    def __init__(self, url: str):
        self.url = str(url)
        self._held: dict | None = None

    @property
    def held(self) -> bool:
        return self._held is not None

    def acquire(self, owner: str) -> bool:
        """Takes the lock for ``owner`` (run name or id, shown to anyone refused).

        Returns:
            True when the lock is held; False for a remote store, where no lock file can be made atomically.

        Raises:
            StoreError: another owner holds the lock (naming it, its pid, host and start time).
        """
        path = local_path(self.url)
        if path is None:
            log.warning("%s is not a local store; no single-writer lock is taken", self.url)
            return False
        lock_path = path / ".lock"
        me = {"owner": str(owner), "pid": os.getpid(), "hostname": socket.gethostname(), "time": now()}
        for _ in range(3):
            try:
                fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder_text = _read_text(lock_path)
                if holder_text is None:
                    continue  # released between our attempt and the read
                holder = _parse_lock(holder_text, lock_path)
                same_host = holder.get("hostname") == me["hostname"]
                if same_host and holder.get("pid") == me["pid"] and holder.get("owner") == me["owner"]:
                    self._held = holder
                    return True
                if same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
                    log.warning("taking over stale lock of %s (pid %s is gone)", holder.get("owner"), holder["pid"])
                    _remove_stale(lock_path, holder_text)
                    continue
                raise StoreError(
                    f"{self.url} is in use by {holder.get('owner')!r} (pid {holder.get('pid')} on "
                    f"{holder.get('hostname')}, since {holder.get('time')}); wait for that run to finish, or remove "
                    f"{lock_path} if it is certainly not running"
                )
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._held = me
            return True
        raise StoreError(f"{self.url}: could not take the lock {lock_path} (contended); try again")

    def release(self) -> None:
        """Releases the lock if this object holds it; otherwise does nothing."""
        if self._held is None:
            return
        path = local_path(self.url)
        assert path is not None  # a lock is only ever held on a local store
        lock_path = path / ".lock"
        text = _read_text(lock_path)
        if text is not None and json.loads(text) == self._held:
            lock_path.unlink(missing_ok=True)
        self._held = None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _parse_lock(text: str, lock_path: Path) -> dict:
    try:
        holder = json.loads(text)
        if isinstance(holder, dict):
            return holder
    except json.JSONDecodeError:
        pass
    raise StoreError(f"{lock_path} is unreadable ({text[:80]!r}); remove it if no run is using the store")


def _remove_stale(lock_path: Path, stale_text: str) -> None:
    """Removes a stale lock without deleting a fresh one that another process may have just written.

    Renaming is atomic, so exactly one taker moves the file aside; if what it moved is not the stale lock it
    inspected, it puts it back.
    """
    aside = lock_path.with_name(f".lock.stale-{uuid.uuid4().hex}")
    try:
        os.rename(lock_path, aside)
    except FileNotFoundError:
        return
    if aside.read_text() != stale_text:
        try:
            os.link(aside, lock_path)
        except FileExistsError:
            pass
    aside.unlink()
