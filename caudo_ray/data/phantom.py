"""Ultrasound-like phantoms: the embedded default dataset for the demo and for fast tests.

A frame is a fan-shaped field of view over speckled tissue with a depth-dependent gain, bright clutter blobs and
acoustic shadows, holding an elliptical target (a bright rim around a darker textured interior, like a fetal
skull) of widely varying size, position and angle. With three classes an inner elliptical structure is class 2.
Frames of one "patient" share the anatomy (target size, shape, inner structure, gain) and differ in probe
position, angle and speckle, so group-wise splits matter as they do on real data.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from caudo_ray.config import TARGET_LABELS, PhantomConfig
from caudo_ray.errors import DataError


@dataclass(frozen=True)
class _Anatomy:
    """What stays the same across the frames of one patient."""

    width_frac: float  # target's long axis as a fraction of the frame width
    aspect: float  # short / long axis
    rim_brightness: float
    interior_level: float
    inner_scale: float  # inner structure's axes relative to the target's
    inner_level: float
    gain_slope: float
    tissue_level: float


def _draw_anatomy(rng: np.random.Generator, width_range: tuple[float, float] = (0.15, 0.60)) -> _Anatomy:
    return _Anatomy(
        width_frac=float(rng.uniform(*width_range)),
        aspect=float(rng.uniform(0.65, 0.9)),
        rim_brightness=float(rng.uniform(0.75, 1.0)),
        interior_level=float(rng.uniform(0.08, 0.2)),
        inner_scale=float(rng.uniform(0.3, 0.45)),
        inner_level=float(rng.uniform(0.45, 0.65)),
        gain_slope=float(rng.uniform(0.6, 1.4)),
        tissue_level=float(rng.uniform(0.3, 0.45)),
    )


def phantom_case(
    seed: int,
    size: tuple[int, int] = (96, 96),
    num_classes: int = 2,
    *,
    speckle: float = 1.0,
    rim_width: float = 0.08,
    target_width: tuple[float, float] = (0.15, 0.60),
    decoys: tuple[int, int] = (0, 0),
    decoy_contrast: float = 1.3,
    decoy_size: tuple[float, float] = (0.5, 1.0),
    target_label: str = "filled",
) -> tuple[np.ndarray, np.ndarray]:
    """One phantom frame, deterministic from ``seed``.

    Args:
        seed: random seed; same seed, same frame.
        size: (H, W).
        num_classes: 2 (background, head) or 3 (background, head, inner structure).
        speckle: share of the intensity modulated by fully developed speckle (1: all of it; 0: none).
        rim_width: the bright rim's least width as a fraction of the target's radius (at least 1.5 pixels).
        target_width: range of the target's long axis as a fraction of the frame's width.
        decoys: range of the number of decoys per frame: unlabelled rings shaped like the target, their rim
            ``decoy_contrast`` times as bright (phantoms on which self-training drifts: a one-shot segmenter
            takes decoys for targets, and rounds that learn from its labels take more of them).
        decoy_contrast: a decoy's rim brightness relative to the target's.
        decoy_size: range of a decoy's long axis relative to the target's.
        target_label: ``filled`` labels the whole target; ``ring`` only its rim (a thin ring-shaped structure).

    Returns:
        image (H, W) float32 in [0, 1] and mask (H, W) uint8 class indices.
    """
    rng = np.random.default_rng(seed)
    return _render(
        _draw_anatomy(rng, target_width), rng, size, num_classes, speckle, rim_width, decoys, decoy_contrast, decoy_size, target_label
    )


def _render(
    anatomy: _Anatomy,
    rng: np.random.Generator,
    size: tuple[int, int],
    num_classes: int,
    speckle_share: float = 1.0,
    min_rim: float = 0.08,
    decoys: tuple[int, int] = (0, 0),
    decoy_contrast: float = 1.3,
    decoy_size: tuple[float, float] = (0.5, 1.0),
    target_label: str = "filled",
) -> tuple[np.ndarray, np.ndarray]:
    if num_classes not in (2, 3):
        raise ValueError(f"phantoms have 2 or 3 classes, got {num_classes}")
    if target_label not in TARGET_LABELS:
        raise ValueError(f"target_label must be one of {TARGET_LABELS}, got {target_label!r}")
    h, w = int(size[0]), int(size[1])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # Sector scan: apex above the top edge; depth r and beam angle theta for every pixel.
    apex_x, apex_y = w / 2 + rng.uniform(-0.05, 0.05) * w, -0.15 * h
    r = np.hypot(xx - apex_x, yy - apex_y)
    theta = np.arctan2(xx - apex_x, yy - apex_y)
    half_angle = rng.uniform(0.55, 0.75)
    r_min, r_max = 0.2 * h, 1.12 * h
    fov = (np.abs(theta) <= half_angle) & (r >= r_min) & (r <= r_max)

    # Tissue: smooth low-frequency structure plus a few layered bands.
    tissue = anatomy.tissue_level + 0.12 * _smooth_noise(rng, (h, w), sigma=max(h, w) / 12)
    tissue += 0.08 * np.sin(r / h * rng.uniform(6, 14) + rng.uniform(0, 2 * np.pi))

    # Target ellipse, kept inside the frame.
    a = anatomy.width_frac * w / 2
    b = a * anatomy.aspect
    angle = rng.uniform(0, np.pi)
    ex = np.sqrt((a * np.cos(angle)) ** 2 + (b * np.sin(angle)) ** 2)
    ey = np.sqrt((a * np.sin(angle)) ** 2 + (b * np.cos(angle)) ** 2)
    cx = rng.uniform(min(ex + 1, w / 2), max(w - ex - 1, w / 2))
    cy = rng.uniform(min(ey + 0.15 * h, h / 2), max(h - ey - 1, h / 2))
    rho = _ellipse_radius(xx, yy, cx, cy, a, b, angle)
    head = rho <= 1.0
    rim_width = max(1.5 / b, min_rim)
    rim = head & (rho >= 1.0 - rim_width)
    image = np.where(head, anatomy.interior_level + 0.08 * _smooth_noise(rng, (h, w), sigma=max(h, w) / 30), tissue)
    image = np.where(rim, anatomy.rim_brightness, image)

    mask = (rim if target_label == "ring" else head).astype(np.uint8)
    if num_classes == 3:
        ia, ib = a * anatomy.inner_scale, b * anatomy.inner_scale * rng.uniform(0.8, 1.1)
        offset = rng.uniform(-0.25, 0.25, size=2) * np.array([a, b])
        icx = cx + offset[0] * np.cos(angle) - offset[1] * np.sin(angle)
        icy = cy + offset[0] * np.sin(angle) + offset[1] * np.cos(angle)
        inner = _ellipse_radius(xx, yy, icx, icy, ia, ib, angle + rng.uniform(-0.4, 0.4)) <= 1.0
        inner &= rho <= 1.0 - rim_width
        image = np.where(inner, anatomy.inner_level, image)
        mask[inner] = 2
    if decoys[1] > 0:
        # Drawn from a generator of their own, so frames without decoys stay those of earlier versions.
        image = _add_decoys(
            np.random.default_rng(rng.integers(2**32)), image, head, anatomy, (xx, yy), decoys, decoy_contrast, decoy_size, num_classes
        )

    # Clutter: bright blobs in tissue (and occasionally over the target, as real reverberations are).
    for _ in range(int(rng.integers(2, 7))):
        bx, by = rng.uniform(0, w), rng.uniform(0.1 * h, h)
        s = rng.uniform(0.01, 0.04) * max(h, w)
        image = image + rng.uniform(0.3, 0.7) * np.exp(-((xx - bx) ** 2 + (yy - by) ** 2) / (2 * s * s))

    # Acoustic shadows: dark wedges along beams, starting at some depth.
    for _ in range(int(rng.integers(0, 3))):
        t0 = rng.uniform(-half_angle, half_angle)
        width = rng.uniform(0.04, 0.12)
        start = rng.uniform(0.4, 0.9) * h
        shadow = (np.abs(theta - t0) < width) & (r > start)
        image = np.where(shadow, image * rng.uniform(0.25, 0.5), image)

    # Depth-dependent gain: attenuation with depth, partly compensated, never quite flat.
    depth = (r - r_min) / (r_max - r_min)
    image = image * (1.15 - 0.45 * anatomy.gain_slope * depth + 0.25 * anatomy.gain_slope * depth**2)

    # Speckle: multiplicative Rayleigh noise with a short correlation length, like a coherent imaging system.
    re = gaussian_filter(rng.standard_normal((h, w)), 0.7)
    im = gaussian_filter(rng.standard_normal((h, w)), 0.7)
    speckle = np.hypot(re, im)
    image = image * (1.0 - speckle_share + speckle_share * speckle / speckle.mean())

    image = np.where(fov, image, 0.0)
    mask[~fov] = 0
    hi = np.percentile(image[fov], 99.5) if fov.any() else 1.0
    image = np.clip(image / max(hi, 1e-6), 0.0, 1.0).astype(np.float32)
    return image, mask


def _add_decoys(
    rng: np.random.Generator,
    image: np.ndarray,
    head: np.ndarray,
    anatomy: _Anatomy,
    grid: tuple[np.ndarray, np.ndarray],
    count: tuple[int, int],
    contrast: float,
    size: tuple[float, float],
    num_classes: int,
) -> np.ndarray:
    """Unlabelled rings like the target (rim, dark interior, an inner blob with three classes), kept off it."""
    xx, yy = grid
    h, w = image.shape
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
        a = anatomy.width_frac * w / 2 * rng.uniform(*size)
        b = a * rng.uniform(0.65, 0.95)
        angle = rng.uniform(0, np.pi)
        for _attempt in range(20):  # a free spot: a decoy never covers the labelled target
            cx, cy = rng.uniform(a, w - a), rng.uniform(0.15 * h + b, h - b) if h - b > 0.15 * h + b else h / 2
            rho = _ellipse_radius(xx, yy, cx, cy, a, b, angle)
            if not (head & (rho <= 1.15)).any():
                break
        else:
            continue
        ring = (rho <= 1.0) & (rho >= 1.0 - max(1.5 / b, 0.1))
        image = np.where(rho <= 1.0, anatomy.interior_level, image)
        if num_classes == 3:
            image = np.where(rho <= 0.4, anatomy.inner_level, image)
        image = np.where(ring, min(1.0, anatomy.rim_brightness * contrast), image)
    return image


def write_phantom_dataset(root: str | Path, cfg: PhantomConfig) -> Path:
    """Write a phantom dataset folder (images/, masks/, unlabeled/ as PNG, meta.csv with ``filename,group``).

    Labelled frames are dealt round-robin to ``cfg.num_groups`` patients; unlabelled frames come from further
    patients with about as many frames each, so the unlabelled pool never shares a patient with val/test. The
    folder is deterministic from ``cfg``; a folder already written with the same settings is reused as is.

    Raises:
        DataError: ``root`` holds a dataset written with other settings or other files.
    """
    root = Path(root)
    marker = root / "phantom.json"
    settings = json.dumps(asdict(cfg), sort_keys=True, default=list)
    if marker.is_file() and marker.read_text() == settings:
        return root
    if root.exists() and any(root.iterdir()):
        raise DataError(str(root), "folder is not empty and was not written with these phantom settings; choose another folder or empty it")

    # Written beside the target and renamed at the end, so an interrupted run never leaves a half dataset.
    staging = root.with_name(root.name + ".phantom-partial")
    if staging.exists():
        shutil.rmtree(staging)
    size = (int(cfg.size[0]), int(cfg.size[1]))
    per_group = max(1, -(-cfg.num_labelled // cfg.num_groups))
    rows: list[tuple[str, str]] = []
    for sub in ("images", "masks", "unlabeled"):
        (staging / sub).mkdir(parents=True, exist_ok=True)

    def frames(prefix: str, count: int, num_groups: int) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
        out = []
        for i in range(count):
            g, k = i % num_groups, i // num_groups
            group = f"{prefix}{g:03d}"
            anatomy = _draw_anatomy(np.random.default_rng([cfg.seed, ord(prefix), g]), cfg.target_width)
            frame_rng = np.random.default_rng([cfg.seed, ord(prefix), g, k + 1])
            image, mask = _render(
                anatomy, frame_rng, size, cfg.num_classes, cfg.speckle, cfg.rim_width, cfg.decoys, cfg.decoy_contrast, cfg.decoy_size, cfg.target_label
            )
            out.append((f"{group}_f{k:02d}.png", group, image, mask))
        return out

    for name, group, image, mask in frames("p", cfg.num_labelled, cfg.num_groups):
        Image.fromarray(_to_u8(image), mode="L").save(staging / "images" / name)
        Image.fromarray(mask, mode="L").save(staging / "masks" / name)
        rows.append((name, group))
    if cfg.num_unlabelled:
        for name, group, image, _ in frames("u", cfg.num_unlabelled, max(1, -(-cfg.num_unlabelled // per_group))):
            Image.fromarray(_to_u8(image), mode="L").save(staging / "unlabeled" / name)
            rows.append((name, group))
    with (staging / "meta.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "group"])
        writer.writerows(rows)
    (staging / marker.name).write_text(settings)
    if root.exists():
        root.rmdir()  # checked empty above
    staging.rename(root)
    return root


def _to_u8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    noise = gaussian_filter(rng.standard_normal(shape), sigma)
    return noise / (noise.std() + 1e-8)


def _ellipse_radius(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, a: float, b: float, angle: float) -> np.ndarray:
    """Normalised elliptical radius: <= 1 inside the ellipse."""
    dx, dy = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    u = dx * c + dy * s
    v = -dx * s + dy * c
    return np.sqrt((u / a) ** 2 + (v / b) ** 2)
