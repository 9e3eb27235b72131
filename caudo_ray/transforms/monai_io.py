"""MONAI dictionary transforms around the segmenter, for the MONAI bundle that ``caudo-ray export-model`` writes.

They run the very functions of :mod:`caudo_ray.transforms.preprocess`, so the bundle gives ``caudo-ray
predict``'s masks. The export copies this file and ``preprocess.py`` side by side into the bundle's ``scripts/``
(hence the relative import), so the bundle runs with MONAI alone, without caudo-ray.

Orientation: MONAI's PIL reader swaps a picture's axes to (width, height); caudo-ray reads (rows, cols), the
picture as PIL gives it. :class:`SegmenterInputd` swaps PNG and JPEG images back before the network and
:class:`SegmenterOutputd` swaps their masks again, so MONAI's PIL writer saves them upright. NIfTI and DICOM
arrays are used in MONAI's order, which is caudo-ray's.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from .preprocess import normalize_intensity, resize_image, resize_mask

_PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
# ITU-R BT.601 luma, the weights caudo-ray's reader and PIL use for RGB -> L.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
SOURCE_SHAPE = "caudo_ray_source_shape"  # meta key: the image's (rows, cols) before resizing


def _read_by_pil(image: MetaTensor) -> bool:
    return str(image.meta.get("filename_or_obj", "")).lower().endswith(_PIL_SUFFIXES)


class SegmenterInputd(MapTransform):
    """A loaded, channel-first 2D image -> the segmenter's (1, H, W) input at the working size.

    Colour is reduced to luminance, the intensity scaled to [0, 1] between the 1st and 99th percentiles, and
    the image resized (antialiased bilinear) to ``working_size``; the source (rows, cols) is kept in the meta
    data for :class:`SegmenterOutputd`.

    Args:
        keys: the image key.
        working_size: (H, W) the segmenter was trained at.
    """

    def __init__(self, keys: str | Sequence[str], working_size: Sequence[int]):
        super().__init__(keys)
        self.working_size = (int(working_size[0]), int(working_size[1]))

    def __call__(self, data: Mapping[Hashable, MetaTensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            array = np.asarray(image.detach().cpu(), dtype=np.float32)
            array = array[0] if array.shape[0] == 1 else np.tensordot(_LUMA, array[:3], axes=1)
            if _read_by_pil(image):
                array = array.T
            meta = dict(image.meta)
            meta[SOURCE_SHAPE] = list(array.shape)
            prepared = resize_image(normalize_intensity(array), self.working_size)
            d[key] = MetaTensor(torch.from_numpy(prepared[None].copy()), meta=meta)
        return d


class SegmenterOutputd(MapTransform):
    """The segmenter's (C, H, W) output -> a (1, rows, cols) uint8 class map at the source image's size, with the
    image's meta data (file name, affine) for MONAI's writers.

    Args:
        keys: the prediction key.
        image_key: the key of the image :class:`SegmenterInputd` prepared.
    """

    def __init__(self, keys: str | Sequence[str], image_key: str = "image"):
        super().__init__(keys)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, MetaTensor]) -> dict:
        d = dict(data)
        image = d[self.image_key]
        rows, cols = (int(v) for v in image.meta[SOURCE_SHAPE])
        for key in self.key_iterator(d):
            label = np.asarray(d[key].detach().cpu().argmax(0), dtype=np.uint8)
            mask = resize_mask(label, (rows, cols))
            if _read_by_pil(image):
                mask = mask.T
            d[key] = MetaTensor(torch.from_numpy(np.ascontiguousarray(mask)[None]), meta=dict(image.meta))
        return d


def bundle_script_files() -> list[Path]:
    """The files the bundle's ``scripts/`` package holds: this module and the preprocessing it runs."""
    here = Path(__file__).parent
    return [here / "monai_io.py", here / "preprocess.py"]
