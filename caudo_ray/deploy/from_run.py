"""A run's segmenter as a :class:`~caudo_ray.deploy.segmenter.Segmenter`: from its weights or its work dir."""

from __future__ import annotations

from pathlib import Path

import torch

from caudo_ray.config import ConfigError, RunConfig, load_config
from caudo_ray.deploy.segmenter import Segmenter, SegmenterSpec, default_label_names
from caudo_ray.errors import DataError
from caudo_ray.networks.bundle import RoundModels
from caudo_ray.networks.device import resolve_device
from caudo_ray.store import PseudoLabelStore
from caudo_ray.workspace import Workspace


def segmenter_spec(cfg: RunConfig, num_classes: int) -> SegmenterSpec:
    """The spec of ``cfg``'s segmenter for ``num_classes`` classes, named by ``tracking.label_names``.

    Raises:
        ConfigError: ``tracking.label_names`` names another number of classes than the run has.
    """
    names = cfg.tracking.label_names or default_label_names(num_classes)
    if len(names) != num_classes:
        raise ConfigError("tracking.label_names", f"names {len(names)} classes, the run's masks have {num_classes}")
    return SegmenterSpec(
        num_classes=num_classes,
        working_size=tuple(cfg.data.working_size),
        channels=tuple(cfg.segmenter.channels),
        strides=tuple(cfg.segmenter.strides),
        num_res_units=cfg.segmenter.num_res_units,
        label_names=tuple(names),
    )


def segmenter_of(cfg: RunConfig, models: RoundModels, device: str | torch.device = "cpu", source: str = "weights") -> Segmenter:
    """The segmenter of a round's (or the final) weights."""
    return Segmenter(segmenter_spec(cfg, models.num_classes), models.segmenter, device, source=source)


def provenance(cfg: RunConfig, models: RoundModels, exemplar_ids: list[str]) -> dict:
    """What an exported model records of its run: config hash, exemplar ids, validation Dice (None without a
    validation split)."""
    dice = models.val_metrics.get("dice")
    return {"method_hash": cfg.method_hash(), "exemplars": list(exemplar_ids), "val_dice": None if dice is None else float(dice)}


def final_segmenter(work_dir: Path) -> tuple[Segmenter, RunConfig]:
    """The final segmenter of the finished run in ``work_dir``, on the run's device, and the run's config.

    Raises:
        DataError: ``work_dir`` holds no run config or no final model (``ModelFileError`` for a bad one).
    """
    ws = Workspace(Path(work_dir))
    if not ws.config_path.exists():
        raise DataError(str(ws.config_path), "no run config: is this the work dir of a run?")
    cfg = load_config(ws.config_path)
    if not ws.final_model_path.exists():
        raise DataError(str(ws.final_model_path), "no final model: the run in this work dir has not finished")
    models = RoundModels.load(ws.final_model_path)
    return segmenter_of(cfg, models, resolve_device(cfg.device), source=str(ws.final_model_path)), cfg


def final_provenance(work_dir: Path) -> dict:
    """:func:`provenance` of the finished run in ``work_dir``, its exemplars read from its store."""
    ws = Workspace(Path(work_dir))
    cfg = load_config(ws.config_path)
    exemplar_ids = PseudoLabelStore.open(Workspace.of(cfg).store_url, mode="r").exemplars()[0]
    return {**provenance(cfg, RoundModels.load(ws.final_model_path), exemplar_ids), "work_dir": str(ws.root.resolve())}
