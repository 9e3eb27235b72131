"""The final segmenter as an MLflow ``python_function`` model: images as the user has them in, class maps out.

The model is logged from code (:mod:`caudo_ray.deploy.model_code`), not pickled: loading it reads a JSON spec
and safetensors weights and unpickles nothing. Its input is a batch of images of one size, ``(N, H, W)``
float32 (MLflow enforces the signature's dtype in process: cast integer images, their values unchanged), one
channel, any intensity range; its output is ``(N, H, W)`` uint8 class indices, what ``caudo-ray predict``
writes for the same images.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from caudo_ray.deploy.segmenter import Segmenter

ARTIFACT = "segmenter"  # the artifact key (and folder) holding segmenter.json and segmenter.safetensors


class SegmenterModel(mlflow.pyfunc.PythonModel):
    """``predict`` segments a batch of same-size 2D images with the logged segmenter."""

    def load_context(self, context) -> None:
        self._segmenter = Segmenter.load(Path(context.artifacts[ARTIFACT]))

    # np.ndarray is a hint MLflow infers no schema from: the logged tensor signature is the input contract.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        images = np.asarray(model_input, dtype=np.float32)
        if images.ndim == 2:  # one image sent without its batch axis
            images = images[None]
        masks = self._segmenter.segment(list(images))
        return np.stack(masks) if masks else np.zeros(images.shape, np.uint8)


def signature() -> ModelSignature:
    """``(N, H, W)`` float32 images in, ``(N, H, W)`` uint8 class indices out; every axis of any length."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1))]),
    )


def input_example(height: int = 40, width: int = 56) -> np.ndarray:
    """One ``(1, height, width)`` image in a scanner's intensity range (a bright disc on a ramp), not the
    working size: it shows that any size and range go in as they are."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    disc = ((rows - height / 2) ** 2 + (cols - width / 2) ** 2) < (min(height, width) / 3) ** 2
    return (200.0 * cols / width + 800.0 * disc)[None].astype(np.float32)
