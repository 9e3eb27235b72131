"""The single-writer lock of a store: one run at a time writes to it, on a local disk or on S3.

The lock is ``<store>/.lock``, a small JSON record naming its holder (owner, host, pid, a random token, the
lease). It is created atomically: ``O_CREAT | O_EXCL`` on a local or network file system, a conditional write
(``If-None-Match: *``) on S3. A run takes it before it writes anything, and renews a heartbeat every third of
its lease while it runs: the file's modification time, or on S3 a conditional rewrite of the object (``If-Match``
its last ETag), whose ``LastModified`` then moves.

A lock is stale, and taken over, when its holder is certainly gone: on this host, when its process no longer
exists; on another host (where no pid can be checked), when its heartbeat is older than the lease it recorded.
The takeover is atomic too (a rename aside on a file system, an ``If-Match`` rewrite on S3), so of two runs that
find the same stale lock exactly one gets it. Other fsspec stores (``gs://``, ``memory://`` ...) get no lock: a
warning says so. Hosts must agree on the time to within the lease (NTP).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

import fsspec
from fsspec.asyn import sync

from caudo_ray.errors import StoreError
from caudo_ray.store.layout import local_path, now

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
DEFAULT_LEASE_S = 60.0
# Locks this process holds, by store location: a second run in the same process is refused like any other.
_HELD: dict[str, StoreLock] = {}
_HELD_GUARD = threading.Lock()


class Lease(Protocol):
    """Where a lock record lives. ``version`` identifies one write of the record (a file's text, an ETag)."""

    where: str

    def create(self, text: str) -> str | None:
        """Writes the record if none exists; its version, or None when one exists."""

    def read(self) -> tuple[str, str, float] | None:
        """(text, version, modified as Unix time), or None when there is no record."""

    def replace(self, version: str, text: str) -> str | None:
        """Replaces the record if it is still at ``version``; the new version, or None when it is not."""

    def renew(self, version: str) -> str | None:
        """Moves the record's modification time to now if it is still at ``version``; its version, or None."""

    def delete(self, version: str) -> None:
        """Deletes the record if it is still at ``version``."""


class FileLease:
    """A lock file on a local or network file system; a record's version is its text."""

    def __init__(self, store_dir: Path):
        self.dir = store_dir
        self.path = store_dir / LOCK_NAME
        self.where = str(self.path)
        self.made_dir = False

    def create(self, text: str) -> str | None:
        existed = self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        # Written whole under a private name, then linked into place: link fails if the lock exists (one taker
        # wins, on NFS too) and never shows a half-written record, as O_EXCL then write would to a second reader.
        draft = self.path.with_name(f"{LOCK_NAME}.new-{uuid.uuid4().hex}")
        draft.write_text(text)
        try:
            os.link(draft, self.path)
        except FileExistsError:
            return None
        finally:
            draft.unlink()
        self.made_dir = not existed
        return text

    def read(self) -> tuple[str, str, float] | None:
        try:
            text = self.path.read_text()
            modified = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        return text, text, modified

    def replace(self, version: str, text: str) -> str | None:
        """Moves the record aside (atomic: one of several takers wins), checks it, then creates the new one."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        try:
            if aside.read_text() != version:
                # Another taker already replaced it: put theirs back.
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                return None
        finally:
            aside.unlink()
        return self.create(text)

    def renew(self, version: str) -> str | None:
        current = self.read()
        if current is None or current[1] != version:
            return None
        os.utime(self.path)
        return version

    def delete(self, version: str) -> None:
        current = self.read()
        if current is not None and current[1] == version:
            self.path.unlink(missing_ok=True)
        if self.made_dir:
            # The lock came first and nothing else was stored: leave no empty store behind.
            try:
                self.dir.rmdir()
            except OSError:
                pass


class S3Lease:
    """A lock object on S3 (or an S3 API), written with conditional requests; a record's version is its ETag."""

    def __init__(self, url: str, storage_options: dict | None):
        self.fs = fsspec.filesystem("s3", **(storage_options or {}))
        self.where = f"{url.rstrip('/')}/{LOCK_NAME}"
        self.bucket, self.key, _ = self.fs.split_path(self.where)

    def create(self, text: str) -> str | None:
        try:
            out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=text.encode(), IfNoneMatch="*")
        except (FileExistsError, OSError) as err:
            if _precondition_failed(err):
                return None
            raise
        return out["ETag"]

    def read(self) -> tuple[str, str, float] | None:
        try:
            out = self.fs.call_s3("get_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return None
        body = out["Body"]
        try:
            text = sync(self.fs.loop, body.read).decode()
        finally:
            body.close()
        return text, out["ETag"], out["LastModified"].timestamp()

    def replace(self, version: str, text: str) -> str | None:
        try:
            out = self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=text.encode(), IfMatch=version)
        except (FileNotFoundError, OSError) as err:
            if isinstance(err, FileNotFoundError) or _precondition_failed(err):
                return None
            raise
        return out["ETag"]

    def renew(self, version: str) -> str | None:
        current = self.read()
        if current is None or current[1] != version:
            return None
        # Rewriting the same record moves LastModified, the heartbeat another host reads.
        return self.replace(version, current[0])

    def delete(self, version: str) -> None:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=version)
        except (FileNotFoundError, OSError) as err:
            if not (isinstance(err, FileNotFoundError) or _precondition_failed(err)):
                raise


class StoreLock:
    """The lock ``<store>/.lock`` naming the run that holds it.

    Not re-entrant: while one :class:`StoreLock` of this process holds a store, another one (a second run in the
    same process) is refused like a run of another process. Acquiring the same object twice is harmless.

    Args:
        url: the store's location (a path, ``file://``, or ``s3://``; other URLs get no lock).
        lease_s: how long the heartbeat stays valid; renewed every third of it. A holder on another host whose
            heartbeat is older than its lease is taken for dead.
        storage_options: fsspec options of a remote store (endpoint, credentials).
    """

    def __init__(self, url: str, *, lease_s: float = DEFAULT_LEASE_S, storage_options: dict | None = None):
        self.url = str(url)
        self.lease_s = float(lease_s)
        path = local_path(self.url)
        self._lease: Lease | None
        if path is not None:
            self._lease, self._key = FileLease(path), str(path.resolve())
        elif self.url.startswith("s3://"):
            self._lease, self._key = S3Lease(self.url, storage_options), self.url.rstrip("/")
        else:
            self._lease, self._key = None, self.url
        self._record: dict | None = None
        self._version: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._record is not None

    @property
    def where(self) -> str | None:
        """Where the lock record lives; None for a store that gets no lock."""
        return self._lease.where if self._lease is not None else None

    def acquire(self, owner: str) -> bool:
        """Takes the lock for ``owner`` (run name or work dir, shown to anyone refused) and starts its heartbeat.

        Returns:
            True when the lock is held; False for a store that gets no lock (not local, not S3).

        Raises:
            StoreError: another run holds the lock (naming it, its pid, host and start time), in this process or
                in another one.
        """
        if self._lease is None:
            log.warning("%s is neither local nor on S3; no single-writer lock is taken", self.url)
            return False
        with _HELD_GUARD:
            holder = _HELD.get(self._key)
            if holder is self:
                return True
            if holder is not None:
                raise StoreError(
                    f"{self.url} is in use by {holder._record['owner']!r} in this process (pid {os.getpid()}); "
                    "one run per store, even within one process"
                )
            self._take(owner)
            _HELD[self._key] = self
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name=f"lock heartbeat {self.url}", daemon=True)
        self._heartbeat.start()
        return True

    def _take(self, owner: str) -> None:
        me = {
            "owner": str(owner),
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "time": now(),
            "lease_s": self.lease_s,
            "token": uuid.uuid4().hex,
        }
        text = json.dumps(me)
        for _ in range(5):
            version = self._lease.create(text)
            if version is not None:
                self._record, self._version, self._lost = me, version, None
                return
            found = self._lease.read()
            if found is None:
                continue  # released between our attempt and the read
            holder_text, holder_version, modified = found
            holder = _parse_lock(holder_text, self._lease.where)
            reason = _stale_reason(holder, modified)
            if reason is None:
                raise StoreError(
                    f"{self.url} is in use by {holder.get('owner')!r} (pid {holder.get('pid')} on "
                    f"{holder.get('hostname')}, since {holder.get('time')}); wait for that run to finish, or remove "
                    f"{self._lease.where} if it is certainly not running"
                )
            version = self._lease.replace(holder_version, text)
            if version is not None:
                log.warning("took over the stale lock of %s on %s (%s)", holder.get("owner"), self.url, reason)
                self._record, self._version, self._lost = me, version, None
                return
        raise StoreError(f"{self.url}: could not take the lock {self._lease.where} (contended); try again")

    def check(self) -> None:
        """Raises StoreError if this lock was taken over (its heartbeat stopped for longer than the lease)."""
        if self._lost is not None:
            raise StoreError(f"{self.url}: this run lost its lock: {self._lost}; stop it and resume later")

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                version = self._lease.renew(self._version)
            except Exception as err:  # noqa: BLE001 - a failed renewal is retried; the lease allows two misses
                log.warning("could not renew the lock of %s: %s", self.url, err)
                continue
            if version is None:
                found = self._lease.read()
                self._lost = f"its record at {self._lease.where} now reads {found[0] if found else 'nothing'}"
                log.error("%s: lost the lock: %s", self.url, self._lost)
                return
            self._version = version

    def release(self) -> None:
        """Releases the lock if this object holds it; otherwise does nothing."""
        if self._record is None:
            return
        self._stop.set()
        if self._heartbeat is not None and self._heartbeat is not threading.current_thread():
            self._heartbeat.join()
        with _HELD_GUARD:
            if _HELD.get(self._key) is self:
                del _HELD[self._key]
            if self._lost is None:
                self._lease.delete(self._version)
        self._record = self._version = None


def _stale_reason(holder: dict, modified: float) -> str | None:
    """Why the lock ``holder`` is stale, or None while its holder may still be running."""
    pid = holder.get("pid")
    if holder.get("hostname") == socket.gethostname() and isinstance(pid, int):
        if pid == os.getpid():
            return None  # this process: a lock of a run still going here (it would be registered) or not yet released
        return None if _pid_alive(pid) else f"pid {pid} is gone"
    lease = holder.get("lease_s")
    age = time.time() - modified
    if isinstance(lease, (int, float)) and age > lease:
        return f"its heartbeat is {age:.0f} s old, past its {lease:g} s lease"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parse_lock(text: str, where: str) -> dict:
    try:
        holder = json.loads(text)
        if isinstance(holder, dict):
            return holder
    except json.JSONDecodeError:
        pass
    raise StoreError(f"{where} is unreadable ({text[:80]!r}); remove it if no run is using the store")


def _precondition_failed(err: BaseException) -> bool:
    """Whether an S3 call failed on its condition (``If-None-Match``/``If-Match``) rather than for another reason."""
    if isinstance(err, FileExistsError):
        return True
    response = getattr(err.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")
