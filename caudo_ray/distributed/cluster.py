"""Joining or starting the Ray cluster a run uses, and leaving nothing of a local one behind."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
import threading
import uuid

import numpy as np
import ray

from caudo_ray.config import RunConfig
from caudo_ray.distributed.reaper import MARK

log = logging.getLogger(__name__)

# The reaper of the local cluster this process started, if any (see reaper.py).
_reaper: subprocess.Popen | None = None
# Whether init_ray connected this process to Ray (a caller's own ray.init is the caller's to shut down).
_connected = False


def init_ray(cfg: RunConfig, *, log_to_driver: bool = True) -> None:
    """Join ``runtime.address`` or start a local Ray whose dashboard listens on ``runtime.dashboard_host`` only.

    A local cluster gets at least as many logical CPUs as the trainer and the worker pool ask for together, so
    both stay alive for the whole run. Training and labelling alternate and each actor pins its own torch thread
    count, so the extra logical CPUs never oversubscribe the cores. Its processes are ended when this process
    ends, however it ends (a reaper process watches it; :func:`shutdown_ray` ends them at once).

    ``ray.init`` replaces the process's SIGTERM handler with one that exits; a handler the caller installed (the
    command line's, which stops a run cleanly) is put back.
    """
    global _connected
    if ray.is_initialized():
        return
    rt = cfg.runtime
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in [_project_root(), os.environ.get("PYTHONPATH", "")] if p)}}
    handler = signal.getsignal(signal.SIGTERM)
    if rt.address:
        ray.init(address=rt.address, runtime_env=env, log_to_driver=log_to_driver)
    else:
        needed = rt.trainer_cpus + rt.num_workers * rt.cpus_per_worker
        _start_local(
            num_cpus=int(max(os.cpu_count() or 1, np.ceil(needed))),
            include_dashboard=False,
            dashboard_host=rt.dashboard_host,
            runtime_env=env,
            log_to_driver=log_to_driver,
        )
    _connected = True
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _start_local(**init_kwargs) -> None:
    """``ray.init`` of a new local cluster whose every process carries a token its reaper looks for."""
    global _reaper
    token = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != MARK}
    env["PYTHONPATH"] = os.pathsep.join(p for p in [_project_root(), env.get("PYTHONPATH", "")] if p)
    _reaper = subprocess.Popen(
        [sys.executable, "-m", "caudo_ray.distributed.reaper", token],
        stdin=subprocess.PIPE,
        env=env,
        start_new_session=True,  # a signal to the driver's process group (Ctrl-C) leaves it to do its job
    )
    # Registered before ray.init registers its own shutdown, so it runs after it: the reaper then only mops up.
    atexit.register(_release_reaper)
    os.environ[MARK] = token
    try:
        ray.init(**init_kwargs)
    finally:
        del os.environ[MARK]  # processes this driver starts later are not the cluster's


def shutdown_ray(timeout_s: float = 30.0) -> None:
    """Disconnects from the Ray :func:`init_ray` connected to; a local cluster it started is gone when this returns.

    Does nothing when this process's Ray was initialised by someone else (a test session, a notebook).
    """
    global _connected
    if _connected and ray.is_initialized():
        ray.shutdown()
    _connected = False
    reaper = _release_reaper()
    if reaper is not None:
        try:
            reaper.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("the local Ray cluster's reaper (pid %d) is still ending its processes", reaper.pid)


def _release_reaper() -> subprocess.Popen | None:
    """Closes the reaper's pipe, which tells it to end what is left of the local cluster; returns it."""
    global _reaper
    reaper, _reaper = _reaper, None
    if reaper is not None and reaper.stdin is not None:
        reaper.stdin.close()
    return reaper


def _project_root() -> str:
    """The folder that holds the ``caudo_ray`` package (the repository root of a checkout)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
