"""The benchmarks' shared workload: phantom stores and networks of the demo's sizes, without a tracking server.

Kept apart from :mod:`benchmarks.throughput` so that the GPU benchmark imports nothing it does not run (a GPU
machine needs Ray, the store and the networks, not MLflow).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from caudo_ray.config import RunConfig
from caudo_ray.data.phantom import phantom_case
from caudo_ray.networks.bundle import RoundModels, feature_channels_of
from caudo_ray.networks.calibrator import Calibrator
from caudo_ray.networks.segmenter import build_segmenter
from caudo_ray.store import PseudoLabelStore

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "caudo_ray" / "configs" / "demo.yaml"


def untrained_models(cfg: RunConfig, num_classes: int) -> RoundModels:
    """Untrained segmenter and calibrator of the config's sizes (throughput does not depend on the weights)."""
    torch.manual_seed(cfg.seed)
    net = build_segmenter(cfg.segmenter, num_classes).eval()
    feature_channels = feature_channels_of(net, cfg.data.working_size, torch.device("cpu"))
    calibrator = Calibrator.from_config(cfg.calibrator, num_classes, feature_channels)
    return RoundModels(
        round=0,
        num_classes=num_classes,
        feature_channels=feature_channels,
        segmenter={k: v.detach().clone() for k, v in net.state_dict().items()},
        calibrator={k: v.detach().clone() for k, v in calibrator.state_dict().items()},
    )


def phantom_store(url: Path, num_cases: int, cfg: RunConfig, distinct: int = 64) -> PseudoLabelStore:
    """A store of ``num_cases`` phantom images with hidden truth, cycling through ``distinct`` rendered frames."""
    size = tuple(cfg.data.working_size)
    num_classes = cfg.data.phantom.num_classes
    frames = [phantom_case(seed, size, num_classes) for seed in range(distinct)]
    images = np.stack([f[0] for f in frames])
    masks = np.stack([f[1] for f in frames])
    store = PseudoLabelStore.create(
        url,
        case_ids=[f"case_{i:06d}" for i in range(num_cases)],
        working_size=size,
        num_classes=num_classes,
        config_hash=cfg.method_hash(),
        provenance={"data": "phantoms (throughput benchmark)"},
        chunk_size=cfg.runtime.batch_size,
    )
    for start in range(0, num_cases, 512):
        idx = np.arange(start, min(start + 512, num_cases))
        store.write_cases(idx, images=images[idx % distinct], truth=masks[idx % distinct])
    return store
