"""Where calibration workers run and on what, tested on CPU: Ray options, GPU shares, device, autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config

from caudo_ray.config import ConfigError
from caudo_ray.distributed.placement import check_worker_device, worker_device, worker_options, workers_per_gpu
from caudo_ray.labelling.engine import LabelingEngine
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.rounds.executor import labelling_precision
from caudo_ray.store import DEFAULT_SCORE_NAMES, PseudoLabelStore
from caudo_ray.workspace import Workspace

BF16_PIXEL_SHARE = 0.01


def test_fractional_gpus_share_one_gpu_and_labels_are_a_soft_preference(tmp_path):
    rt = tiny_config(tmp_path, **{"runtime.gpus_per_worker": 0.5, "runtime.worker_labels": ["role=calibration", "zone=a"]}).runtime
    options = worker_options(rt)
    assert options["num_gpus"] == 0.5 and options["num_cpus"] == rt.cpus_per_worker
    assert options["max_restarts"] == -1 and options["max_task_retries"] == 0  # the executor re-queues instead
    assert options["label_selector"] == {"role": "calibration", "zone": "a"}
    assert options["fallback_strategy"] == [{"label_selector": {}}]  # any node once no labelled one is alive
    assert workers_per_gpu(rt) == 2
    assert workers_per_gpu(tiny_config(tmp_path, **{"runtime.gpus_per_worker": 1 / 3}).runtime) == 3
    plain = worker_options(tiny_config(tmp_path).runtime)
    assert plain["num_gpus"] == 0 and "label_selector" not in plain and workers_per_gpu(tiny_config(tmp_path).runtime) == 0


def test_a_worker_holding_a_gpu_share_computes_on_cuda(tmp_path):
    assert worker_device("auto", ["0"], cuda_available=True) == torch.device("cuda", 0)
    assert worker_device("cuda", ["1"], cuda_available=True) == torch.device("cuda", 0)  # Ray made GPU 1 its first visible
    assert worker_device("auto", [], cuda_available=True) == torch.device("cpu")  # no share: Ray hides the GPUs
    assert worker_device("cpu", ["0"], cuda_available=True) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        worker_device("auto", ["0"], cuda_available=False)
    with pytest.raises(ConfigError, match="runtime.gpus_per_worker"):
        check_worker_device("cuda", tiny_config(tmp_path).runtime)
    check_worker_device("cuda", tiny_config(tmp_path, **{"runtime.gpus_per_worker": 0.5}).runtime)
    with pytest.raises(ConfigError, match="runtime.autocast"):
        tiny_config(tmp_path, **{"runtime.autocast": "fp8"})


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # the CUDA context is only built, never entered, here
def test_labelling_precision_follows_runtime_autocast():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with labelling_precision("auto", cpu):
        assert not torch.is_autocast_enabled("cpu")  # float32 where reduced precision saves nothing
    with labelling_precision("bf16", cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with labelling_precision("fp16", cpu):
        assert torch.get_autocast_dtype("cpu") == torch.float16
    auto_cuda = labelling_precision("auto", cuda)
    assert isinstance(auto_cuda, torch.autocast) and auto_cuda.fast_dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_a_batch_labelled_under_bf16_autocast_matches_float32(clean_one_round):
    """bf16 autocast labels a batch as float32 does, up to the pixels where rounding flips a near tie: on a GPU it
    changed 0.07% of the initial labels' pixels and 0.09% of the calibrated ones' (docs/benchmarks.md); on CPU, with
    the tiny networks of a one-round run, at most BF16_PIXEL_SHARE."""
    cfg, result = clean_one_round
    models = RoundModels.load(Workspace.of(cfg).model_path(0))
    engine = LabelingEngine(cfg, models, torch.device("cpu"))
    images = PseudoLabelStore.open(result.store_url).read_images(np.arange(8))
    full = engine.label_batch(images)
    with labelling_precision("bf16", torch.device("cpu")):
        half = engine.label_batch(images)
    assert half.initial.shape == half.calibrated.shape == (8, *cfg.data.working_size) and half.initial.dtype == np.uint8
    assert full.initial.any(), "float32 labels nothing: the comparison would accept an empty label"
    for kind in ("initial", "calibrated"):
        share = float(np.mean(getattr(half, kind) != getattr(full, kind)))
        print(f"bf16 {kind} labels: {share:.3%} of pixels differ from float32")
        assert share <= BF16_PIXEL_SHARE, (kind, share)
    assert set(half.scores) == set(full.scores) >= set(DEFAULT_SCORE_NAMES) - {"initial_dice", "calibrated_dice"}
    for name, values in half.scores.items():
        assert np.isfinite(values).all(), name
    # Reliability ranks and selects the labels: bf16 moved it by at most 0.0016 here.
    np.testing.assert_allclose(half.scores["reliability"], full.scores["reliability"], atol=0.02)
