"""Joining or starting the Ray cluster a run uses."""

from __future__ import annotations

import os

import numpy as np
import ray

from caudo_ray.config import RunConfig


def init_ray(cfg: RunConfig, *, log_to_driver: bool = True) -> None:
    """Join ``runtime.address`` or start a local Ray whose dashboard listens on ``runtime.dashboard_host`` only.

    A local cluster gets at least as many logical CPUs as the trainer and the worker pool ask for together, so
    both stay alive for the whole run. Training and labelling alternate and each actor pins its own torch thread
    count, so the extra logical CPUs never oversubscribe the cores.
    """
    if ray.is_initialized():
        return
    rt = cfg.runtime
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in [_project_root(), os.environ.get("PYTHONPATH", "")] if p)}}
    if rt.address:
        ray.init(address=rt.address, runtime_env=env, log_to_driver=log_to_driver)
        return
    needed = rt.trainer_cpus + rt.num_workers * rt.cpus_per_worker
    ray.init(
        num_cpus=int(max(os.cpu_count() or 1, np.ceil(needed))),
        include_dashboard=False,
        dashboard_host=rt.dashboard_host,
        runtime_env=env,
        log_to_driver=log_to_driver,
    )


def _project_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
