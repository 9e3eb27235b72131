"""The trained segmenter with its preprocessing, as one object that reads and writes a folder of plain data.

``caudo-ray predict``, the MLflow Model and the MONAI bundle all segment through :meth:`Segmenter.segment`, so
the three give the same masks. On disk a segmenter is ``segmenter.json`` (its :class:`SegmenterSpec`) and
``segmenter.safetensors`` (its weights): loading it runs no pickle, so a tampered file cannot execute code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from caudo_ray.config import SegmenterConfig
from caudo_ray.errors import DataError, ModelFileError
from caudo_ray.networks.segmenter import build_segmenter, predict
from caudo_ray.transforms.preprocess import normalize_intensity, resize_image, resize_mask

SPEC_FILE = "segmenter.json"
WEIGHTS_FILE = "segmenter.safetensors"
FORMAT = "caudo-ray-segmenter"
FORMAT_VERSION = 1


def default_label_names(num_classes: int) -> list[str]:
    """``background, class_1, ...``: the names of a run's classes when the config gives none."""
    return ["background", *(f"class_{c}" for c in range(1, num_classes))]


@dataclass(frozen=True)
class SegmenterSpec:
    """What it takes to rebuild the network and feed it: the UNet's shape, the working size, the classes.

    Attributes:
        num_classes: output classes, background included.
        working_size: (H, W) every image is resized to before the network.
        channels, strides, num_res_units: the MONAI UNet's (``segmenter.*`` of the run's config).
        label_names: one name per class, background first.
    """

    num_classes: int
    working_size: tuple[int, int]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    num_res_units: int
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.label_names) != self.num_classes:
            raise ValueError(f"{len(self.label_names)} label names for {self.num_classes} classes")

    def to_dict(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict, source: str) -> SegmenterSpec:
        """Inverse of :meth:`to_dict`.

        Raises:
            ModelFileError: naming ``source``, for another format or version, or missing or malformed fields.
        """
        if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            found = (d.get("format"), d.get("format_version")) if isinstance(d, dict) else type(d).__name__
            raise ModelFileError(source, f"not a {FORMAT} spec of version {FORMAT_VERSION} (found {found})")
        try:
            return cls(
                num_classes=int(d["num_classes"]),
                working_size=(int(d["working_size"][0]), int(d["working_size"][1])),
                channels=tuple(int(c) for c in d["channels"]),
                strides=tuple(int(s) for s in d["strides"]),
                num_res_units=int(d["num_res_units"]),
                label_names=tuple(str(n) for n in d["label_names"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelFileError(source, f"malformed segmenter spec ({type(exc).__name__}: {exc})") from None


class Segmenter:
    """A trained segmenter and its preprocessing: images as a user has them in, class maps at their size out.

    Args:
        spec: the network's shape, working size and classes.
        weights: the UNet's state dict.
        device: where the network runs.
        source: named in errors about the weights (the file they came from).

    Raises:
        ModelFileError: naming ``source``, when the weights do not fit the network the spec describes.
    """

    def __init__(self, spec: SegmenterSpec, weights: dict[str, torch.Tensor], device: str | torch.device = "cpu", source: str = "weights"):
        self.spec = spec
        self.device = torch.device(device)
        cfg = SegmenterConfig(channels=spec.channels, strides=spec.strides, num_res_units=spec.num_res_units)
        self.net = build_segmenter(cfg, spec.num_classes)
        try:
            self.net.load_state_dict(weights)
        except RuntimeError as exc:
            raise ModelFileError(source, f"weights do not fit the segmenter the spec describes ({exc})") from None
        self.net.to(self.device).eval()

    def segment(self, images: Sequence[np.ndarray], batch_size: int = 32) -> list[np.ndarray]:
        """Class maps of 2D images of any size and intensity range.

        Each image is scaled to [0, 1] between its 1st and 99th percentiles and resized to the working size
        (antialiased bilinear), exactly as in training; each class map is resized back to its image's size
        (nearest neighbour).

        Args:
            images: 2D arrays (H_i, W_i), one channel, any numeric type.
            batch_size: images per forward pass.

        Returns:
            One uint8 class map per image, of the image's shape.

        Raises:
            DataError: an image that is not a finite 2D array.
        """
        prepared = []
        for i, image in enumerate(images):
            image = np.asarray(image, dtype=np.float32)
            if image.ndim != 2:
                raise DataError(f"image {i}", f"needs a 2D (H, W) array of one channel, got shape {image.shape}")
            if not np.isfinite(image).all():
                raise DataError(f"image {i}", "has NaN or infinite intensities")
            prepared.append(resize_image(normalize_intensity(image), self.spec.working_size))
        if not prepared:
            return []
        probs = predict(self.net, np.stack(prepared), batch_size=batch_size, device=self.device, return_features=False).probs
        labels = probs.argmax(1).astype(np.uint8)
        return [resize_mask(label, np.shape(image)) for label, image in zip(labels, images)]

    def save(self, folder: Path) -> Path:
        """Write ``segmenter.json`` and ``segmenter.safetensors`` into ``folder`` (created)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SPEC_FILE).write_text(json.dumps(self.spec.to_dict(), indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        return folder

    @classmethod
    def load(cls, folder: Path, device: str | torch.device = "cpu") -> Segmenter:
        """Read a segmenter written by :meth:`save`.

        Raises:
            ModelFileError: naming the file at fault, for a missing, unreadable or tampered spec or weights file.
        """
        spec_path, weights_path = Path(folder) / SPEC_FILE, Path(folder) / WEIGHTS_FILE
        for path in (spec_path, weights_path):
            if not path.is_file():
                raise ModelFileError(str(path), "missing: not a folder written by Segmenter.save")
        try:
            spec_dict = json.loads(spec_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(str(spec_path), f"not JSON ({exc})") from None
        spec = SegmenterSpec.from_dict(spec_dict, str(spec_path))
        try:
            weights = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise ModelFileError(str(weights_path), f"not a readable safetensors file ({exc})") from None
        return cls(spec, weights, device, source=str(weights_path))
