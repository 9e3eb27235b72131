"""``caudo-ray predict``: masks with each input's name, format, size and (NIfTI) affine."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import LABEL_TOLERANCE, assert_nearest_resize, tiny_config
from PIL import Image

from caudo_ray import data as D
from caudo_ray.cli import EXIT_OK, EXIT_SKIPPED, main
from caudo_ray.config import load_config
from caudo_ray.networks.bundle import RoundModels, build_models
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


def _reference_label(work_dir, frame: np.ndarray) -> np.ndarray:
    """The final segmenter's label of ``frame`` at the working size, with the preprocessing written out here rather
    than taken from the code under test: intensities clipped to their 1st-99th percentiles and scaled to [0, 1],
    torch's antialiased bilinear resize, the network's argmax."""
    ws = Workspace(Path(work_dir))
    cfg = load_config(ws.config_path)
    net, _ = build_models(cfg, RoundModels.load(ws.final_model_path), torch.device("cpu"))
    lo, hi = np.percentile(frame, [1.0, 99.0])
    image = torch.from_numpy(((np.clip(frame, lo, hi) - lo) / (hi - lo)).astype(np.float32))[None, None]
    image = F.interpolate(image, size=tuple(cfg.data.working_size), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        label = net(image).argmax(1)[0].numpy().astype(np.uint8)
    assert label.any(), "the reference segmenter labels nothing: the comparison would accept an empty mask"
    return label


# Share of pixels a mask may differ from the reference: LABEL_TOLERANCE (2 pixels of a 56x44 frame; none differed when
# written), since PIL's and torch's antialiased bilinear resizes may differ in the last float32 bits, which can flip
# the argmax where two classes tie that closely.
REFERENCE_TOLERANCE = LABEL_TOLERANCE


def test_predict_writes_masks_in_each_inputs_format_and_geometry(work_dir, inputs, tmp_path):
    out = tmp_path / "masks"
    assert main(["predict", "--work-dir", str(work_dir), str(inputs), str(out)]) == EXIT_OK
    assert sorted(p.name for p in out.iterdir()) == ["frame.png", "slice.nii.gz", "volume.nii.gz"]
    frames = [D.phantom_case(seed, size=(56, 44))[0] for seed in range(4)]

    png = np.asarray(Image.open(out / "frame.png"))
    assert png.shape == (56, 44) and png.dtype == np.uint8 and png.max() <= 1
    # The mask is the final segmenter's label of the frame (as its 8-bit PNG holds it), brought back to the frame's
    # geometry: not an empty, shifted or transposed mask.
    eight_bit = (frames[0] * 255).astype(np.uint8).astype(np.float32)
    assert_nearest_resize(png, _reference_label(work_dir, eight_bit), "frame.png", REFERENCE_TOLERANCE)

    for name, shape, slices in [("slice.nii.gz", (56, 44, 1), frames[1:2]), ("volume.nii.gz", (56, 44, 3), frames[1:])]:
        source, mask = nib.load(inputs / name), nib.load(out / name)
        assert mask.shape == source.shape == shape, name
        np.testing.assert_allclose(mask.affine, source.affine)
        labels = np.asarray(mask.dataobj)
        assert labels.dtype == np.uint8 and labels.max() <= 1
        # Each slice along the volume's third axis is that frame's label, in the source's voxel order.
        for k, frame in enumerate(slices):
            assert_nearest_resize(labels[:, :, k], _reference_label(work_dir, frame), f"{name}[:, :, {k}]", REFERENCE_TOLERANCE)


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
