"""Register the labelled exemplars onto images: a label for each image that the segmenter did not draw.

The classic one-shot route (learned transformations, Zhao et al., CVPR 2019; LT-Net, CVPR 2020; BRBS, 2023)
segments an image by warping a labelled atlas onto it. Here it is instance optimisation, no network to train, so
what it says about an image depends on the exemplars and the image alone, never on a segmenter that may drift:

1. **Which exemplar**: the one whose image correlates best with the target image at a quarter of the size.
2. **Affine**: from every start (``rotations`` x ``scales``), Adam on one minus the global normalised
   cross-correlation at half size; the start that ends most similar is kept (a head may lie at any angle, and a
   gradient from one start finds the nearest optimum only).
3. **Deformable**: a displacement field at half size, in pixels, added to the affine sampling grid; Adam, at half
   size, on MONAI's local normalised cross-correlation plus ``bending_weight`` times MONAI's bending energy of the
   field.

The warped label is the exemplar's one-hot label resampled bilinearly, so it comes as class probabilities.
Deterministic on CPU: no random draw anywhere.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import BendingEnergyLoss, LocalNormalizedCrossCorrelationLoss

from caudo_ray.errors import DataError


@dataclass
class Registration:
    """Exemplar labels warped onto a batch of images.

    Attributes:
        probs: (B, C, H, W) float32 the warped one-hot labels, bilinear: class probabilities.
        exemplar: (B,) int the exemplar registered onto each image.
        similarity: (B,) float32 the local normalised cross-correlation in [0, 1] after registration (higher is
            more alike), a label-free measure of how well the exemplar fits.
    """

    probs: np.ndarray
    exemplar: np.ndarray
    similarity: np.ndarray

    @property
    def labels(self) -> np.ndarray:
        """(B, H, W) uint8 the warped labels."""
        return self.probs.argmax(1).astype(np.uint8)


def register_exemplars(
    exemplar_images: np.ndarray,
    exemplar_labels: np.ndarray,
    images: np.ndarray,
    num_classes: int,
    *,
    rotations: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0),
    scales: tuple[float, ...] = (0.7, 1.0, 1.4),
    affine_iterations: int = 60,
    deformable_iterations: int = 80,
    bending_weight: float = 1.0,
    kernel_size: int = 5,
    batch_size: int = 64,
) -> Registration:
    """Warp the best-matching exemplar's label onto each image (affine from several starts, then deformable).

    Args:
        exemplar_images: (K, H, W) float32 in [0, 1], the labelled images.
        exemplar_labels: (K, H, W) their label maps, classes 0..num_classes-1.
        images: (B, H, W) float32 in [0, 1], the images to label.
        num_classes: classes, background included.
        rotations: start angles of the affine search, degrees.
        scales: start zooms of the exemplar in the image.
        affine_iterations: Adam steps of the affine stage, every start.
        deformable_iterations: Adam steps of the deformable stage.
        bending_weight: weight of the field's bending energy (pixels at half size) against the local NCC.
        kernel_size: window of the local NCC, pixels at half size (the similarity reported is at full size).
        batch_size: images registered at once.

    Returns:
        :class:`Registration`.

    Raises:
        DataError: naming the input whose shape or classes do not fit.
    """
    if exemplar_images.ndim != 3 or exemplar_images.shape != exemplar_labels.shape:
        raise DataError("exemplars", f"images {exemplar_images.shape} and labels {exemplar_labels.shape} must both be (K, H, W)")
    if images.ndim != 3 or images.shape[1:] != exemplar_images.shape[1:]:
        raise DataError("images", f"shape {images.shape} must be (B, H, W) with the exemplars' size {exemplar_images.shape[1:]}")
    if int(exemplar_labels.max()) >= num_classes:
        raise DataError("exemplars", f"label {int(exemplar_labels.max())} >= num_classes {num_classes}")
    moving = torch.from_numpy(np.ascontiguousarray(exemplar_images, dtype=np.float32))[:, None]
    onehot = F.one_hot(torch.from_numpy(exemplar_labels.astype(np.int64)), num_classes).permute(0, 3, 1, 2).float()
    starts = _starts(rotations, scales)
    # torch's grid_sample rather than MONAI's Warp: the affine and the displacement field are composed into one
    # normalised sampling grid, and Warp takes a displacement field alone.
    out = [[], [], []]
    for begin in range(0, len(images), batch_size):
        fixed = torch.from_numpy(np.ascontiguousarray(images[begin : begin + batch_size], dtype=np.float32))[:, None]
        which = _closest_exemplar(moving, fixed)
        theta = _affine(moving[which], fixed, starts, affine_iterations)
        grid = _deformable(moving[which], fixed, theta, deformable_iterations, bending_weight, kernel_size)
        with torch.no_grad():
            probs = F.grid_sample(onehot[which], grid, mode="bilinear", padding_mode="border", align_corners=False)
            warped = F.grid_sample(moving[which], grid, mode="bilinear", padding_mode="border", align_corners=False)
            similarity = _local_ncc(warped, fixed, 2 * kernel_size - 1)
        out[0].append(probs.numpy())
        out[1].append(which.numpy())
        out[2].append(similarity.numpy())
    return Registration(*(np.concatenate(part) for part in out))


def _starts(rotations: tuple[float, ...], scales: tuple[float, ...]) -> torch.Tensor:
    """(S, 2, 3) affine matrices (fixed -> moving coordinates) of each rotation and zoom of the exemplar."""
    mats = []
    for degrees in rotations:
        c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
        for zoom in scales:
            mats.append([[c / zoom, -s / zoom, 0.0], [s / zoom, c / zoom, 0.0]])
    return torch.tensor(mats, dtype=torch.float32)


def _normalised(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    flat = flat - flat.mean(1, keepdim=True)
    return flat / (flat.norm(dim=1, keepdim=True) + 1e-6)


def _closest_exemplar(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """(B,) index of the exemplar image most correlated with each image, both at a quarter of the size."""
    if len(moving) == 1:
        return torch.zeros(len(fixed), dtype=torch.long)
    return (_normalised(F.avg_pool2d(fixed, 4)) @ _normalised(F.avg_pool2d(moving, 4)).T).argmax(1)


def _affine(moving: torch.Tensor, fixed: torch.Tensor, starts: torch.Tensor, iterations: int) -> torch.Tensor:
    """(B, 2, 3) the affine matrix of the start that ends most similar, each optimised at half size."""
    b, s = len(fixed), len(starts)
    mov, fix = F.avg_pool2d(moving, 2).repeat_interleave(s, 0), F.avg_pool2d(fixed, 2).repeat_interleave(s, 0)
    theta = starts.repeat(b, 1, 1).clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.01)

    def dissimilarity() -> torch.Tensor:
        grid = F.affine_grid(theta, list(fix.shape), align_corners=False)
        warped = F.grid_sample(mov, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return 1.0 - (_normalised(warped) * _normalised(fix)).sum(1)

    for _ in range(iterations):
        opt.zero_grad()
        dissimilarity().sum().backward()
        opt.step()
    with torch.no_grad():
        best = dissimilarity().view(b, s).argmin(1)
    return theta.detach().view(b, s, 2, 3)[torch.arange(b), best]


def _deformable(moving, fixed, theta, iterations: int, bending_weight: float, kernel_size: int) -> torch.Tensor:
    """(B, H, W, 2) the sampling grid: the affine one plus a displacement field optimised at half size."""
    b, _, h, w = fixed.shape
    mov, fix = F.avg_pool2d(moving, 2), F.avg_pool2d(fixed, 2)
    half = F.affine_grid(theta, list(fix.shape), align_corners=False)
    ddf = torch.zeros(b, 2, h // 2, w // 2, requires_grad=True)  # pixels at half size, (x, y)
    to_grid = torch.tensor([2.0 / (w // 2), 2.0 / (h // 2)]).view(1, 2, 1, 1)  # pixels -> normalised units
    similarity = LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=kernel_size)
    bending = BendingEnergyLoss()
    opt = torch.optim.Adam([ddf], lr=0.1)
    with warnings.catch_warnings():
        # MONAI's bending energy indexes with lists, which torch warns about on every call; the result is right.
        warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)
        for _ in range(iterations):
            opt.zero_grad()
            grid = half + (ddf * to_grid).permute(0, 2, 3, 1)
            warped = F.grid_sample(mov, grid, mode="bilinear", padding_mode="border", align_corners=False)
            (similarity(warped, fix) + bending_weight * bending(ddf)).backward()
            opt.step()
    full = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    return full + F.interpolate(ddf.detach() * to_grid, size=(h, w), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


def _local_ncc(warped: torch.Tensor, fixed: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B,) mean local normalised cross-correlation of each pair (MONAI's loss is its negative)."""
    loss = LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=kernel_size, reduction="none")
    return -loss(warped, fixed).flatten(1).mean(1)
