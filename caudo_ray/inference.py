"""Segment a folder of images with a finished run's final model, writing masks in each input's format and size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from caudo_ray import data as D
from caudo_ray.config import load_config
from caudo_ray.data.readers import file_format
from caudo_ray.errors import DataError
from caudo_ray.networks.bundle import RoundModels, build_models
from caudo_ray.networks.device import resolve_device
from caudo_ray.networks.segmenter import predict
from caudo_ray.workspace import Workspace


def predict_folder(work_dir: Path, inputs: Path, output: Path, *, progress: bool = True) -> tuple[list[Path], dict[str, str]]:
    """Write one mask per input file under ``output`` with the input's name, format and geometry.

    A 3D NIfTI volume is segmented slice by slice and written back as one volume with the input's affine.
    Unreadable files are skipped and reported, the rest proceed.

    Returns:
        (paths written, {file: reason} of the skipped inputs).
    """
    ws = Workspace(Path(work_dir))
    if not ws.config_path.exists():
        raise DataError(str(ws.config_path), "no run config: is this the work dir of a run?")
    cfg = load_config(ws.config_path)
    if not ws.final_model_path.exists():
        raise DataError(str(ws.final_model_path), "no final model: the run in this work dir has not finished")
    models = RoundModels.load(ws.final_model_path)
    device = resolve_device(cfg.device)
    net, _ = build_models(cfg, models, device)

    files = sorted(p for p in Path(inputs).iterdir() if p.is_file() and not p.name.startswith("."))
    written: list[Path] = []
    skipped: dict[str, str] = {}
    for path in tqdm(files, desc="predicting", unit="file", disable=not progress):
        try:
            file_format(path)
            slices = D.read_image(path, nifti_axis=cfg.data.nifti_axis)
        except DataError as err:
            skipped[str(path)] = err.problem
            continue
        batch = np.stack([D.resize_image(D.normalize_intensity(img), cfg.data.working_size) for img, _ in slices])
        labels = predict(net, batch, device=str(device), return_features=False).probs.argmax(1).astype(np.uint8)
        restored = [D.restore_mask(lab, geom) for lab, (_, geom) in zip(labels, slices)]
        out = output / path.name
        if slices[0][1].is_volume_slice:
            written.append(D.write_volume(restored, slices[0][1], out))
        else:
            written.append(D.write_mask(restored[0], slices[0][1], out))
    return written, skipped
