"""``caudo-ray export-model`` (issue 31): a MONAI bundle that MONAI's own runner executes on a folder of images
without caudo-ray, and an MLflow Model folder, both giving ``caudo-ray predict``'s masks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch
from conftest import assert_labels_close
from PIL import Image

from caudo_ray.cli import EXIT_OK, main
from caudo_ray.inference import predict_folder
from caudo_ray.workspace import Workspace

RUNNER_LIMIT_S = 300  # the runner imports torch, MONAI and ignite on 2 busy cores

# MONAI's runner, with caudo_ray made unimportable: the bundle must run on MONAI alone.
_RUN_BUNDLE = """
import runpy, sys
sys.modules["caudo_ray"] = None
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__")
"""


@pytest.fixture(scope="module")
def images(clean_one_round, tmp_path_factory) -> Path:
    """PNG images as a user has them: two phantom frames as stored (48x48) and one resampled to 61x37."""
    cfg, _ = clean_one_round
    folder = tmp_path_factory.mktemp("bundle_images")
    sources = sorted((Workspace.of(cfg).phantom_dir / "images").glob("*.png"))[:2]
    for source in sources:
        Image.open(source).save(folder / source.name)
    Image.open(sources[0]).resize((37, 61), Image.BILINEAR).save(folder / "resampled.png")
    return folder


def test_monai_bundle_runs_in_monais_runner_with_predicts_masks(clean_one_round, images, tmp_path):
    cfg, _ = clean_one_round
    bundle = tmp_path / "bundle"
    assert main(["export-model", "--work-dir", cfg.work_dir, "--format", "monai-bundle", str(bundle)]) == EXIT_OK

    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["label_classes"] == {"0": "background", "1": "class_1"}
    assert metadata["network_data_format"]["inputs"]["image"]["spatial_shape"] == list(cfg.data.working_size)
    assert metadata["caudo_ray"]["method_hash"] == cfg.method_hash() and metadata["caudo_ray"]["exemplars"]
    # Weights are data: they load without unpickling code.
    assert torch.load(bundle / "models" / "model.pt", weights_only=True)

    masks = tmp_path / "bundle_masks"
    runner = subprocess.run(
        [sys.executable, "-c", _RUN_BUNDLE, "run", "--config_file", str(bundle / "configs" / "inference.json"),
         "--bundle_root", str(bundle), "--dataset_dir", str(images), "--output_dir", str(masks)],
        check=False, capture_output=True, text=True, timeout=RUNNER_LIMIT_S, cwd=tmp_path,
    )
    assert runner.returncode == 0, runner.stderr[-3000:]

    expected = tmp_path / "predicted"
    predict_folder(Path(cfg.work_dir), images, expected, progress=False)
    for image in sorted(images.iterdir()):
        got = np.asarray(Image.open(masks / image.name))
        assert_labels_close(got, np.asarray(Image.open(expected / image.name)), image.name)
    assert got.shape == (61, 37)  # the resampled image's mask, at its own size and upright


def test_exported_mlflow_model_gives_predicts_masks(clean_one_round, images, tmp_path):
    cfg, _ = clean_one_round
    out = tmp_path / "mlflow_model"
    assert main(["export-model", "--work-dir", cfg.work_dir, "--format", "mlflow", str(out)]) == EXIT_OK
    model = mlflow.pyfunc.load_model(str(out))
    expected = tmp_path / "predicted"
    predict_folder(Path(cfg.work_dir), images, expected, progress=False)
    for image in sorted(images.iterdir()):
        pixels = np.asarray(Image.open(image), dtype=np.float32)
        assert_labels_close(model.predict(pixels[None])[0], np.asarray(Image.open(expected / image.name)), image.name)
