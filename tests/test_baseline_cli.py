"""``caudo-ray baseline``: consistency, exemplar-only and supervised segmenters at a run's budget, end to end on the
embedded phantoms, then served by ``caudo-ray predict``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from caudo_ray.cli import EXIT_FAILED, EXIT_OK, EXIT_REFUSED, main
from caudo_ray.config import save_config
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.run.baseline import budget, plain_config, train_baseline

# Enough iterations that the segmenter marks the phantoms' targets; the pool batch is kept small for speed.
SETTINGS = {"rounds": 1, "segmenter.iterations": 40, "segmenter.finetune_iterations": 20, "consistency.unlabelled_batch_size": 4}


def write_config(path: Path, work_dir: Path, **overrides) -> Path:
    save_config(tiny_config(work_dir, **{**SETTINGS, **overrides}), path)
    return path


def baseline(method: str, config: Path, *extra: str) -> int:
    return main(["baseline", "--method", method, "--quiet", "--config", str(config), *extra])


def test_consistency_baseline_end_to_end_then_predict(tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", tmp_path / "run")
    assert baseline("consistency", config) == EXIT_OK
    out = capsys.readouterr().out
    assert "baseline consistency: trained 60 iterations" in out and "segmenter on validation:" in out

    work = tmp_path / "run"
    models = RoundModels.load(work / "models" / "final.pt")
    assert models.calibrator is None and models.round == 1 and 0.0 <= models.val_metrics["dice"] <= 1.0
    record = json.loads((work / "baseline.json").read_text())
    assert record["method"] == "consistency" and record["iterations"] == 60
    assert not (work / "checkpoints" / "baseline_consistency.pt").exists()  # deleted once the model is saved

    # `caudo-ray predict` serves the baseline like a run's final model.
    frames = work / "phantoms" / "unlabeled"
    masks = tmp_path / "masks"
    assert main(["predict", "--work-dir", str(work), str(frames), str(masks)]) == EXIT_OK
    written = sorted(masks.iterdir())
    assert [p.name for p in written] == sorted(p.name for p in frames.iterdir() if p.suffix == ".png")
    arrays = [np.asarray(Image.open(p)) for p in written]
    assert all(a.shape == (48, 48) for a in arrays)
    assert sum(int((a > 0).any()) for a in arrays) >= len(arrays) // 2  # the masks mark targets

    # A rerun reuses the model; another baseline in the same work dir is refused, keeping this one's model.
    assert baseline("consistency", config) == EXIT_OK
    assert "baseline consistency: reused" in capsys.readouterr().out
    assert baseline("exemplar_only", config) == EXIT_FAILED
    assert "'consistency' baseline" in capsys.readouterr().err
    assert RoundModels.load(work / "models" / "final.pt").version == models.version


def test_other_baselines_train_for_the_whole_budget_and_more_labels_segment_better(tmp_path):
    """Both train for the run's budget; the segmenter trained on every labelled training frame must beat the one
    trained on the exemplar alone on validation (0.56 against 0.05 here), or the supervised bar measures nothing.
    A higher learning rate and a larger budget than SETTINGS: the least at which supervised training learns."""
    settings = {**SETTINGS, "segmenter.channels": [8, 16, 32], "segmenter.learning_rate": 5e-3,
                "segmenter.iterations": 200, "segmenter.finetune_iterations": 100}  # fmt: skip
    dice = {}
    for method in ("exemplar_only", "supervised"):
        cfg = tiny_config(tmp_path / method, **settings)
        result = train_baseline(cfg, method, progress=False)
        assert result["iterations"] == budget(cfg) == 300 and not result["reused"]
        models = RoundModels.load(result["model_path"])
        assert models.calibrator is None and models.round == cfg.rounds
        assert models.val_metrics["dice"] == result["val_metrics"]["dice"]
        dice[method] = result["val_metrics"]["dice"]
    assert dice["supervised"] > dice["exemplar_only"] + 0.2, dice


def test_a_baseline_trains_as_round_0_for_its_budget_with_the_peer_or_without_the_pool(tmp_path):
    cfg = tiny_config(tmp_path / "run", **SETTINGS)
    peer, alone = plain_config(cfg, 60, pool=True), plain_config(cfg, 60, pool=False)
    for plain in (peer, alone):
        assert plain.segmenter.iterations == 60 and not plain.calibrator.enabled
        assert plain.seed == cfg.seed and plain.segmenter.channels == cfg.segmenter.channels
    assert peer.consistency == cfg.consistency.peer() and peer.consistency.online_in_round(0)
    assert not alone.consistency.online_in_round(0)


def test_bad_method_or_config_is_refused_before_any_work(tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", tmp_path / "run")
    with pytest.raises(SystemExit) as exit_info:
        baseline("fixmatch", config)
    assert exit_info.value.code == EXIT_REFUSED  # argparse refuses an unknown method
    assert baseline("consistency", config, "--set", "consistency.threshold=2") == EXIT_REFUSED
    assert "consistency.threshold" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
