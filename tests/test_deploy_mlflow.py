"""The final segmenter as an MLflow Model (issue 31): logged and registered by every run, loaded with
``mlflow.pyfunc.load_model`` and served by a real ``mlflow models serve`` process, giving ``caudo-ray predict``'s
masks for images of any size and intensity range."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow.artifacts
import mlflow.pyfunc
import nibabel as nib
import numpy as np
import pytest
from conftest import assert_labels_close
from mlflow import MlflowClient
from PIL import Image

from caudo_ray.deploy.from_run import segmenter_of
from caudo_ray.deploy.mlflow_model import log_final_model
from caudo_ray.inference import predict_folder
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.tracking import names
from caudo_ray.tracking.tracker import Tracker, sqlite_tracking_uri
from caudo_ray.workspace import Workspace

MLFLOW = Path(sys.executable).with_name("mlflow")
SERVE_LIMIT_S = 300.0  # start-up of a serve process that imports torch and MONAI, on 2 busy cores


@pytest.fixture(scope="module")
def user_images(clean_one_round, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """Images as a user has them, none at the working size: a phantom PNG as stored (48x48, 0..255) and the same
    frame resampled to 61x37 in a CT-like int16 range as a 2D NIfTI. Returns their folder and arrays by file name."""
    cfg, _ = clean_one_round
    folder = tmp_path_factory.mktemp("user_images")
    source = min((Workspace.of(cfg).phantom_dir / "images").glob("*.png"))
    png = np.asarray(Image.open(source))
    Image.fromarray(png).save(folder / "frame.png")
    resampled = np.asarray(Image.fromarray(png).resize((37, 61), Image.BILINEAR)).astype(np.int16) * 8 - 1000
    nib.save(nib.Nifti1Image(resampled, np.eye(4)), folder / "scan.nii.gz")
    return folder, {"frame.png": png, "scan.nii.gz": resampled}


@pytest.fixture(scope="module")
def predicted(clean_one_round, user_images, tmp_path_factory) -> dict[str, np.ndarray]:
    """``caudo-ray predict``'s masks of the user images, by file name."""
    cfg, _ = clean_one_round
    folder, images = user_images
    out = tmp_path_factory.mktemp("predicted")
    written, skipped = predict_folder(Path(cfg.work_dir), folder, out, progress=False)
    assert not skipped and len(written) == len(images)
    return {
        "frame.png": np.asarray(Image.open(out / "frame.png")),
        "scan.nii.gz": np.asarray(nib.load(out / "scan.nii.gz").dataobj).astype(np.uint8),
    }


def test_run_registers_its_final_segmenter_with_tags(clean_one_round, monkeypatch):
    cfg, result = clean_one_round
    monkeypatch.setenv("MLFLOW_TRACKING_URI", result.tracking_uri)  # where models:/ URIs resolve
    assert result.model is not None and result.model.registered_name == cfg.tracking.model_name
    client = MlflowClient(result.tracking_uri)
    version = client.get_model_version(cfg.tracking.model_name, result.model.version)
    assert version.run_id == result.run_id
    assert float(version.tags[names.TAG_VAL_DICE]) == pytest.approx(result.final_metrics["dice"], abs=1e-6)
    exemplars = json.loads(version.tags[names.TAG_EXEMPLARS])
    assert exemplars and exemplars == json.loads((Path(cfg.work_dir) / "split.json").read_text())["exemplars"]
    assert version.tags[names.TAG_METHOD_HASH] == cfg.method_hash()
    # The logged model sits in the run's experiment, where the MLflow UI lists it with the run.
    logged = client.get_logged_model(result.model.model_uri.removeprefix("models:/"))
    assert logged.experiment_id == client.get_run(result.run_id).info.experiment_id and logged.source_run_id == result.run_id
    run_tags = client.get_run(result.run_id).data.tags
    assert run_tags[names.TAG_MODEL_URI] == result.model.model_uri
    assert run_tags[names.TAG_MODEL_VERSION] == result.model.version

    # Logged from code, with its weights as safetensors: loading it unpickles nothing.
    files = Path(mlflow.artifacts.download_artifacts(result.model.model_uri))
    assert not [p for p in files.rglob("*") if p.suffix in (".pkl", ".pt", ".pth")]
    assert "model_code_path" in (files / "MLmodel").read_text()
    assert (files / "artifacts" / "segmenter" / "segmenter.safetensors").is_file()

    # A resumed run finds its model logged and registers no second version.
    tracker = Tracker(result.tracking_uri, cfg.tracking.experiment, run_id=result.run_id)
    again = log_final_model(cfg, tracker, Workspace.of(cfg).final_model_path, exemplars)
    tracker.finish("FINISHED")  # opening the run by id marked it running again
    assert again == result.model
    assert len(client.search_model_versions(f"name='{cfg.tracking.model_name}'")) == 1


def test_pyfunc_model_gives_predicts_masks(clean_one_round, user_images, predicted, monkeypatch):
    _, result = clean_one_round
    monkeypatch.setenv("MLFLOW_TRACKING_URI", result.tracking_uri)
    model = mlflow.pyfunc.load_model(result.model.registry_uri)
    assert model.metadata.signature is not None and model.metadata.saved_input_example_info is not None
    for name, image in user_images[1].items():
        # The image's own size and intensity range; float32 is the signature's dtype, which MLflow enforces.
        mask = model.predict(image[None].astype(np.float32))
        assert mask.shape == (1, *image.shape) and mask.dtype == np.uint8
        assert_labels_close(mask[0], predicted[name], name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(server: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + SERVE_LIMIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{base}/ping", timeout=2).close()
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise AssertionError(f"mlflow models serve did not answer within {SERVE_LIMIT_S} s:\n{log.read_text()[-3000:]}")


def _invoke(base: str, image: np.ndarray) -> np.ndarray:
    body = json.dumps({"inputs": image[None].tolist()}).encode()
    request = urllib.request.Request(f"{base}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return np.asarray(json.loads(response.read())["predictions"], dtype=np.uint8)


def test_mlflow_models_serve_gives_predicts_masks(clean_one_round, user_images, predicted, tmp_path):
    _, result = clean_one_round
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    # The serve command starts uvicorn by name: the virtualenv's bin must be on PATH even when the venv is not active.
    env = {**os.environ, "MLFLOW_TRACKING_URI": result.tracking_uri, "PATH": f"{MLFLOW.parent}{os.pathsep}{os.environ['PATH']}"}
    command = [str(MLFLOW), "models", "serve", "-m", result.model.registry_uri, "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_until_up(server, base, log)
        for name, image in user_images[1].items():
            mask = _invoke(base, image)
            assert mask.shape == (1, *image.shape), (name, mask.shape)
            assert_labels_close(mask[0], predicted[name], name)
    finally:
        _stop_group(server)


def _stop_group(server: subprocess.Popen) -> None:
    """End the server's whole process group: it runs uvicorn and its worker as children in its own session."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(server.pid, signal.SIGKILL)  # whatever of the group outlived its leader
    except ProcessLookupError:
        pass
    server.wait(timeout=30)


def test_round_models_are_logged_on_request(clean_one_round, tmp_path, monkeypatch):
    cfg, _ = clean_one_round
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, round_models=True, model_name="rounds-too"))
    uri = sqlite_tracking_uri(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = Tracker(uri, "round-models", artifact_root=tmp_path / "artifacts")
    ws = Workspace.of(cfg)
    final = log_final_model(cfg, tracker, ws.final_model_path, ["p000_f00"])
    logged = {m.name: m for m in MlflowClient(uri).search_logged_models(experiment_ids=[tracker.experiment_id])}
    assert set(logged) == {"segmenter", "segmenter_round_0"} and final.version == "1"

    image = np.asarray(Image.open(min((ws.phantom_dir / "images").glob("*.png"))), dtype=np.float32)
    round_model = mlflow.pyfunc.load_model(f"models:/{logged['segmenter_round_0'].model_id}")
    expected = segmenter_of(cfg, RoundModels.load(ws.model_path(0))).segment([image])[0]
    assert_labels_close(round_model.predict(image[None])[0], expected, "round 0")
