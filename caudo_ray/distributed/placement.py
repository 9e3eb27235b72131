"""Where calibration workers run and on what: Ray options, the nodes they prefer, the torch device they use.

Pure functions of the config, so the placement rules are tested without a GPU or a second node.
"""

from __future__ import annotations

import torch

from caudo_ray.config import ConfigError, RuntimeConfig


def worker_options(rt: RuntimeConfig) -> dict:
    """Ray actor options of one calibration worker.

    - Resources: ``runtime.cpus_per_worker`` CPUs and ``runtime.gpus_per_worker`` GPUs; a fraction shares a GPU
      (0.5: two workers per GPU, each sees the same device).
    - Restarts: without limit, each call tried once; the executor re-queues a dead worker's batches.
    - Nodes: with ``runtime.worker_labels``, nodes carrying all those labels while one is alive, any node once
      none is (a soft preference, so a lost node's workers restart on the survivors).
    """
    options = {
        "num_cpus": rt.cpus_per_worker,
        "num_gpus": rt.gpus_per_worker,
        "max_restarts": -1,
        "max_task_retries": 0,
    }
    if rt.worker_labels:
        options["label_selector"] = dict(label.split("=", 1) for label in rt.worker_labels)
        options["fallback_strategy"] = [{"label_selector": {}}]
    return options


def workers_per_gpu(rt: RuntimeConfig) -> int:
    """How many calibration workers share one GPU (0 when they use none)."""
    if rt.gpus_per_worker <= 0:
        return 0
    return max(1, int(1 / rt.gpus_per_worker + 1e-9))


def check_worker_device(device: str, rt: RuntimeConfig) -> None:
    """Refuses a device a Ray worker could never get: Ray hides the GPUs from an actor that reserves none.

    Raises:
        ConfigError: ``device: cuda`` with ``runtime.gpus_per_worker`` 0.
    """
    if device == "cuda" and rt.gpus_per_worker <= 0:
        raise ConfigError(
            "runtime.gpus_per_worker",
            "device is cuda, so each calibration worker needs a GPU share (> 0): Ray hides GPUs from workers without one",
        )


def worker_device(device: str, gpu_ids: list, cuda_available: bool) -> torch.device:
    """The torch device of a worker that Ray gave ``gpu_ids`` (``ray.get_gpu_ids()``; one id for a shared GPU).

    ``auto`` is CUDA when the worker holds a GPU share, else CPU; ``cpu`` stays CPU even with one.

    Raises:
        RuntimeError: the worker holds a GPU share but torch sees no CUDA device (a CPU build of torch).
    """
    if device == "cpu" or (device == "auto" and not gpu_ids):
        return torch.device("cpu")
    if not cuda_available:
        raise RuntimeError(
            f"device {device}: the worker was given GPU {gpu_ids} but torch sees no CUDA device; install a CUDA build "
            "of torch on the workers or set device: cpu"
        )
    # Ray sets CUDA_VISIBLE_DEVICES to the worker's GPUs, so its first visible device is its own.
    return torch.device("cuda", 0)
