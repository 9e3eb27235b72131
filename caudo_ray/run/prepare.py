"""Bringing a run's work dir to the point where rounds can start: config, split, pool in the store, exemplars.

``prepare_run`` does it idempotently: a rerun of the same command finds the saved split, the store and the images
already loaded, and only checks them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from caudo_ray import data as D
from caudo_ray.config import ConfigError, RunConfig, load_config, save_config
from caudo_ray.errors import DataError, StoreError
from caudo_ray.run.annotations import AnswerRules, take_in
from caudo_ray.run.logs import attach_file_log
from caudo_ray.store import NO_TRUTH, PseudoLabelStore, StoreLock
from caudo_ray.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class PreparedRun:
    """Everything a round needs, with the pool living in the store rather than in memory."""

    cfg: RunConfig
    workspace: Workspace
    data_root: Path
    index: D.DatasetIndex
    split: D.Split
    store: PseudoLabelStore
    lock: StoreLock
    num_classes: int
    answers: AnswerRules  # what answers to annotation queries are checked against
    skipped: dict[str, str] = field(default_factory=dict)  # case id or file -> reason


def prepare_run(
    cfg: RunConfig,
    *,
    progress: bool = True,
    on_skip: Callable[[str, str], None] | None = None,
    purpose: str = "run",
    log_to_work_dir: bool = False,
) -> PreparedRun:
    """Create or reopen the work dir of ``cfg`` and load the pool into its store.

    The store's single-writer lock is taken first, before anything is written, so of two runs started at once on
    one work dir (or one store) only one writes; the caller releases it (``prepared.lock.release()``), and a
    failure here releases it too.

    Args:
        cfg: the validated run config.
        progress: show a progress bar while the pool loads.
        on_skip: called with (file, reason) for every input file left out.
        purpose: what holds the lock (``run``, ``tune``), named to anyone refused.
        log_to_work_dir: from the moment the lock is held, also write this process's log to the work dir's
            ``run.log``.

    Raises:
        DataError: an exemplar or a validation case is unusable (the pool skips bad files instead).
        StoreError: the work dir holds a store written under another config, or another run holds its lock.
    """
    ws = Workspace.of(cfg)
    lock = StoreLock(ws.store_url, lease_s=cfg.runtime.lock_lease_s)
    lock.acquire(owner=f"caudo-ray {purpose} {ws.root.resolve()}")
    try:
        if log_to_work_dir:
            ws.root.mkdir(parents=True, exist_ok=True)
            attach_file_log(ws.log_path)
        return _prepare(cfg, ws, lock, progress, on_skip)
    except BaseException:
        lock.release()
        raise


def _prepare(cfg: RunConfig, ws: Workspace, lock: StoreLock, progress: bool, on_skip) -> PreparedRun:
    ws.root.mkdir(parents=True, exist_ok=True)
    ws.models_dir.mkdir(exist_ok=True)
    ws.annotations_dir.mkdir(exist_ok=True)
    _check_saved_config(cfg, ws)

    data_root = Path(cfg.data.path) if cfg.data.path else ws.phantom_dir
    if cfg.data.path is None and not (data_root / "images").is_dir():
        D.write_phantom_dataset(data_root, cfg.data.phantom)
    index = index_of(cfg, data_root)
    num_classes = cfg.data.num_classes or D.discover_num_classes(index)
    split = _load_or_make_split(cfg, ws, index)

    skipped: dict[str, str] = {}

    def skip(source: str, reason: str, *, said: bool = False) -> None:
        skipped[source] = reason
        if not said:
            log.warning("skipped %s: %s", source, reason)
        if on_skip is not None:
            on_skip(source, reason)

    for source, problem in index.problems:
        skip(str(source), problem)

    refs = {r.case_id: r for r in index.labelled + index.unlabelled}
    pool_refs = [refs[cid] for cid in split.pool]
    store = PseudoLabelStore.open_or_create(
        ws.store_url,
        case_ids=[r.case_id for r in pool_refs],
        working_size=tuple(cfg.data.working_size),
        num_classes=num_classes,
        config_hash=cfg.method_hash(),
        provenance={"data": str(cfg.data.path or "phantoms"), "config": cfg.to_dict()},
        chunk_size=cfg.runtime.batch_size,
    )

    load_pool(store, pool_refs, cfg, num_classes, skip, progress)
    _load_exemplars(store, [refs[c] for c in split.exemplars], cfg, num_classes)
    answers = AnswerRules.of(cfg, index, split, num_classes)
    for source, problem in take_in(store, answers, ws, ws.next_round(cfg.rounds)).refused.items():
        skip(source, f"annotation refused: {problem}", said=True)  # take_in has warned, naming the file
    return PreparedRun(cfg, ws, data_root, index, split, store, lock, num_classes, answers, skipped)


def answer_rules(cfg: RunConfig) -> AnswerRules:
    """What answers to the queries of a prepared work dir are checked against, read without taking its lock (a
    run may hold it: answers given while it goes join its next round).

    Raises:
        StoreError: the work dir was never prepared (no split or store).
    """
    ws = Workspace.of(cfg)
    if not ws.split_path.exists():
        raise StoreError(f"{ws.root} has no split.json: start a run on it first")
    store = PseudoLabelStore.open(ws.store_url, mode="r")
    index = index_of(cfg, Path(cfg.data.path) if cfg.data.path else ws.phantom_dir)
    return AnswerRules.of(cfg, index, D.Split.from_json(ws.split_path), store.num_classes)


def index_of(cfg: RunConfig, data_root: Path) -> D.DatasetIndex:
    """The dataset folder's cases as the config reads them (groups, volumes, a predefined split)."""
    return D.index_dataset(
        data_root,
        group_column=cfg.data.group_column,
        nifti_axis=cfg.data.nifti_axis,
        split_column=cfg.split.column,
        datalist=cfg.split.datalist,
        volume_column=cfg.data.volume_column,
        slice_column=cfg.data.slice_column,
    )


def load_labelled(prepared: PreparedRun, case_ids: list[str], *, skip_bad: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images and masks of labelled cases (validation, test) at the working size.

    Args:
        skip_bad: leave out cases that cannot be loaded, recording each in ``prepared.skipped`` and the log
            (a run validates on the remaining cases); False raises the first :class:`DataError`.
    """
    refs = {r.case_id: r for r in prepared.index.labelled}
    cases = []
    for c in case_ids:
        try:
            cases.append(load_case(refs[c], prepared.cfg, prepared.num_classes))
        except DataError as err:
            if not skip_bad:
                raise
            prepared.skipped[err.source] = err.problem
            log.warning("skipped %s: %s", err.source, err.problem)
    if not cases:
        h, w = prepared.cfg.data.working_size
        return np.zeros((0, h, w), np.float32), np.zeros((0, h, w), np.uint8)
    return np.stack([c.image for c in cases]), np.stack([c.mask for c in cases])


def load_case(ref: D.CaseRef, cfg: RunConfig, num_classes: int) -> D.Case:
    """A case at the config's working size, with its input limits (``data.max_pixels``, ``data.color``)."""
    return D.load_case(ref, cfg.data.working_size, num_classes, max_pixels=cfg.data.max_pixels, grayscale=not cfg.data.color)


def _check_saved_config(cfg: RunConfig, ws: Workspace) -> None:
    if ws.config_path.exists():
        saved = load_config(ws.config_path)
        if saved.method_hash() != cfg.method_hash():
            raise StoreError(
                f"{ws.root} holds a run made with a different config ({ws.config_path}); "
                "use a new work_dir, or the same config to resume"
            )
    save_config(cfg, ws.config_path)


def _load_or_make_split(cfg: RunConfig, ws: Workspace, index: D.DatasetIndex) -> D.Split:
    if ws.split_path.exists():
        return D.Split.from_json(ws.split_path)
    s = cfg.split
    try:
        split = D.make_split(
            index,
            seed=s.seed,
            val_fraction=s.val_fraction,
            test_fraction=s.test_fraction,
            exemplars=s.exemplars,
            num_exemplars=s.num_exemplars,
            labelled_groups=s.labelled_groups,
            num_labelled_groups=s.num_labelled_groups,
        )
    except DataError as err:
        if err.source.startswith("split."):
            # The split's settings cannot work with this data set: a config error, refused before any work.
            raise ConfigError(err.source, err.problem) from None
        raise
    split.to_json(ws.split_path)
    return split


def load_pool(store: PseudoLabelStore, pool_refs, cfg: RunConfig, num_classes: int, skip, progress: bool) -> None:
    """Read, preprocess and store every pool image not yet in the store; bad files are skipped, not fatal."""
    already = store.skipped
    # Files an earlier invocation skipped stay skipped; a resumed run reports them again (exit status 3, MLflow).
    for ref in pool_refs:
        if ref.case_id in already:
            skip(str(ref.image_path), already[ref.case_id])
    todo = [int(i) for i in store.images_missing() if store.case_ids[int(i)] not in already]
    if not todo:
        return
    batch: list[tuple[int, D.Case]] = []

    def flush() -> None:
        if not batch:
            return
        idx = np.array([i for i, _ in batch])
        truth = np.stack([c.mask if c.mask is not None else np.full_like(c.image, NO_TRUTH, np.uint8) for _, c in batch])
        store.write_cases(
            idx,
            images=np.stack([c.image for _, c in batch]),
            truth=truth,
            geometries=[c.geometry.to_dict() for _, c in batch],
        )
        batch.clear()

    for i in tqdm(todo, desc="loading pool", unit="case", disable=not progress):
        ref = pool_refs[i]
        try:
            case = load_case(ref, cfg, num_classes)
        except DataError as err:
            store.mark_skipped(i, err.problem)
            skip(err.source, err.problem)
            continue
        batch.append((i, case))
        if len(batch) >= 64:
            flush()
    flush()


def _load_exemplars(store: PseudoLabelStore, refs: list[D.CaseRef], cfg: RunConfig, num_classes: int) -> None:
    """The split's exemplars into the store, once (answers taken in since stay beside them)."""
    ids = [r.case_id for r in refs]
    current, _, _ = store.exemplars()
    answered = store.annotations
    if [c for c in current if c not in answered] == ids:
        return
    cases = D.check_exemplar_set([load_case(r, cfg, num_classes) for r in refs])
    store.set_exemplars(ids, np.stack([c.image for c in cases]), np.stack([c.mask for c in cases]))
