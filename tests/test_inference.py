"""``caudo-ray predict``: masks with each input's name, format, size and (NIfTI) affine."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import assert_labels_close, tiny_config
from PIL import Image

from caudo_ray import data as D
from caudo_ray.cli import EXIT_OK, EXIT_SKIPPED, main
from caudo_ray.config import load_config
from caudo_ray.networks.bundle import RoundModels, build_models
from caudo_ray.networks.segmenter import predict
from caudo_ray.run.coordinator import Coordinator
from caudo_ray.workspace import Workspace

AFFINE = np.array([[0.5, 0, 0, -10.0], [0, 0.7, 0, 4.0], [0, 0, 2.0, 1.5], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    """A finished run's work dir; predict needs only its final segmenter, so the calibrator is off."""
    cfg = tiny_config(tmp_path_factory.mktemp("predict") / "run", **{"rounds": 1, "calibrator.enabled": False, "tracking.num_overlays": 0})
    Coordinator(cfg, progress=False).run()
    return cfg.work_dir


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A PNG, a 2D NIfTI stored as (H, W, 1) and a 3D NIfTI volume, each of another size than the working size."""
    folder = tmp_path_factory.mktemp("inputs")
    frames = [D.phantom_case(seed, size=(56, 44))[0] for seed in range(4)]
    Image.fromarray((frames[0] * 255).astype(np.uint8)).save(folder / "frame.png")
    nib.save(nib.Nifti1Image(frames[1][:, :, None].astype(np.float32), AFFINE), folder / "slice.nii.gz")
    nib.save(nib.Nifti1Image(np.stack(frames[1:], axis=2).astype(np.float32), AFFINE), folder / "volume.nii.gz")
    return folder


def _reference_mask(work_dir, frame: np.ndarray) -> np.ndarray:
    """The final segmenter's argmax on ``frame`` (after the PNG's 8-bit rounding), resized back with nearest."""
    ws = Workspace(Path(work_dir))
    cfg = load_config(ws.config_path)
    net, _ = build_models(cfg, RoundModels.load(ws.final_model_path), torch.device("cpu"))
    image = D.normalize_intensity((frame * 255).astype(np.uint8).astype(np.float32))
    probs = predict(net, D.resize_image(image, cfg.data.working_size)[None], device="cpu", return_features=False).probs
    label = probs.argmax(1)[0].astype(np.uint8)
    assert label.any(), "the reference segmenter labels nothing: the comparison would accept an empty mask"
    return np.asarray(Image.fromarray(label).resize(frame.shape[::-1], Image.NEAREST))


def test_predict_writes_masks_in_each_inputs_format_and_geometry(work_dir, inputs, tmp_path):
    out = tmp_path / "masks"
    assert main(["predict", "--work-dir", str(work_dir), str(inputs), str(out)]) == EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == ["frame.png", "slice.nii.gz", "volume.nii.gz"]

    png = np.asarray(Image.open(out / "frame.png"))
    assert png.shape == (56, 44) and png.dtype == np.uint8 and png.max() <= 1
    # The mask is the final segmenter's label at the working size, brought back to the frame's geometry: not an
    # empty, shifted or transposed mask.
    assert_labels_close(png, _reference_mask(work_dir, D.phantom_case(0, size=(56, 44))[0]), "frame.png")

    for name, shape in [("slice.nii.gz", (56, 44, 1)), ("volume.nii.gz", (56, 44, 3))]:
        source, mask = nib.load(inputs / name), nib.load(out / name)
        assert mask.shape == source.shape == shape, name
        np.testing.assert_allclose(mask.affine, source.affine)
        labels = np.asarray(mask.dataobj)
        assert labels.dtype == np.uint8 and labels.max() <= 1

    # The volume is segmented slice by slice, in a batch of 3: its slice 0 is the same image as the 2D NIfTI
    # (segmented alone), so the same mask up to float32 ties between batch compositions.
    volume = np.asarray(nib.load(out / "volume.nii.gz").dataobj)
    assert_labels_close(volume[:, :, 0], np.asarray(nib.load(out / "slice.nii.gz").dataobj)[:, :, 0])


def test_predict_skips_unreadable_files_and_exits_3(work_dir, inputs, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "frame.png").write_bytes((inputs / "frame.png").read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "masks"
    assert main(["predict", "--work-dir", str(work_dir), str(folder), str(out)]) == EXIT_SKIPPED
    err = capsys.readouterr().err
    assert "broken.png" in err and "notes.txt" in err
    assert [p.name for p in out.iterdir()] == ["frame.png"]
