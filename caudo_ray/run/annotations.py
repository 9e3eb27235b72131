"""Answers to annotation queries: checked, recorded, and taken into a run's exemplars.

A person answers a query with a mask file named ``<case_id>.<ext>`` (PNG, NIfTI ...), either through
``caudo-ray annotate`` (:func:`annotate`: every file is checked before any is copied into
``<work_dir>/annotations/``, an earlier answer is replaced only when asked, and who and when go to
``annotations.jsonl``) or by dropping the file into ``annotations/`` by hand. A run takes the answers in
(:func:`take_in`) when it starts and before each round's training, so an answer given while a run goes joins its
next round: the case joins the exemplars, leaves the pool's labelling and selection, and its record (file, sha256,
annotator, time, the round it joined) goes into the store. A dropped file that fails the checks is left out with a
warning naming it and the problem, and taken in once it is fixed; the run goes on.
"""

from __future__ import annotations

import dataclasses
import fcntl
import getpass
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from caudo_ray import data as D
from caudo_ray.config import RunConfig
from caudo_ray.errors import DataError
from caudo_ray.store import PseudoLabelStore
from caudo_ray.workspace import Workspace

log = logging.getLogger(__name__)

DROPPED_BY_HAND = "unknown (dropped into annotations/)"


@dataclass(frozen=True)
class AnswerRules:
    """What an answer is checked against: the dataset's cases, the run's split and its class count."""

    cfg: RunConfig
    refs: dict[str, D.CaseRef]
    pool: frozenset[str]
    exemplars: frozenset[str]
    num_classes: int

    @classmethod
    def of(cls, cfg: RunConfig, index: D.DatasetIndex, split: D.Split, num_classes: int) -> AnswerRules:
        return cls(cfg, index.by_id(), frozenset(split.pool), frozenset(split.exemplars), num_classes)

    def check(self, path: Path) -> D.Case:
        """The answered case at the working size, its mask the answer.

        Raises:
            DataError: naming the file: not a case of the pool, unreadable, another shape or placement than the
                image, classes out of range, or no foreground (unless ``annotations.allow_empty``).
        """
        case_id = D.validate_case_id(D.file_stem(path), source=str(path))
        if case_id not in self.refs:
            raise DataError(str(path), f"names case {case_id!r}, which is not in the dataset (name answers <case_id>.<ext>)")
        if case_id in self.exemplars:
            raise DataError(str(path), f"case {case_id!r} is one of the split's exemplars: it is labelled already")
        if case_id not in self.pool:
            raise DataError(
                str(path), f"case {case_id!r} is in the validation or test split; only pool cases are queries, and an answer there would leak into evaluation"
            )
        ref = dataclasses.replace(self.refs[case_id], mask_path=path, labelled=True)
        cfg = self.cfg
        case = D.load_case(ref, cfg.data.working_size, self.num_classes, max_pixels=cfg.data.max_pixels, grayscale=not cfg.data.color)
        D.check_mask_placement(path, case.geometry)
        if not cfg.annotations.allow_empty and not case.mask.any():
            h, w = case.mask.shape
            raise DataError(str(path), f"mask is empty (no foreground at the working size {h}x{w}); set annotations.allow_empty: true to accept empty answers")
        return case


@dataclass
class Intake:
    """What one :func:`take_in` did: the cases it took in (new or replaced answers) and the files it refused."""

    taken: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # file -> problem


def answer_files(folder: Path) -> list[Path]:
    """The files of ``folder`` that may be answers, sorted; hidden files (an editor's, a copy in progress) and
    sub-folders are not."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def annotate(cfg: RunConfig, rules: AnswerRules, folder: Path, *, annotator: str | None = None, replace: bool = False) -> list[dict]:
    """Check every answer in ``folder``, then copy them into the work dir's ``annotations/`` and log who and when.

    Safe while a run goes: it writes files only (never the store), each under a hidden name first and then renamed
    into place, so a run never takes in half a file; the run takes them in before its next round's training. Two
    ``annotate`` calls on one work dir take turns (a lock file in ``annotations/``): the later one checks against
    the earlier one's answers, so neither overwrites the other's.

    Args:
        cfg: the run's config.
        rules: what answers are checked against (:meth:`AnswerRules.of`).
        folder: masks named ``<case_id>.<ext>``, such as the ``masks/`` of ``caudo-ray queries --export``.
        annotator: who answered (default: the user name of this process).
        replace: replace earlier answers for the same cases; the old files move to ``annotations_replaced/``
            and the store keeps their records.

    Returns:
        One record per answer copied: case id, file, source, sha256, annotator, time, replaced (the earlier
        answer's file or None).

    Raises:
        DataError: naming the file, for the first answer that fails a check, or that answers a case answered
            already without ``replace``; nothing is copied then.
    """
    ws = Workspace.of(cfg)
    files = answer_files(folder)
    if not files:
        raise DataError(str(folder), "holds no answers: masks named <case_id>.<ext> (.png, .nii.gz ...)")
    with _one_annotate_at_a_time(ws):
        return _check_and_copy(ws, rules, files, annotator, replace)


@contextmanager
def _one_annotate_at_a_time(ws: Workspace) -> Iterator[None]:
    """Hold the work dir's annotate lock (``annotations/.annotate.lock``, hidden from :func:`answer_files`),
    waiting for another ``annotate`` to finish; the kernel lets it go if the holder dies."""
    ws.annotations_dir.mkdir(parents=True, exist_ok=True)
    with (ws.annotations_dir / ".annotate.lock").open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _check_and_copy(ws: Workspace, rules: AnswerRules, files: list[Path], annotator: str | None, replace: bool) -> list[dict]:
    earlier = {D.file_stem(p): p for p in answer_files(ws.annotations_dir)}
    seen: dict[str, Path] = {}
    for path in files:
        rules.check(path)
        case_id = D.file_stem(path)
        if case_id in seen:
            raise DataError(str(path), f"a second answer for case {case_id!r} (the first: {seen[case_id].name})")
        seen[case_id] = path
        if case_id in earlier and not replace:
            raise DataError(str(path), f"case {case_id!r} was answered already ({earlier[case_id]}); pass --replace to replace that answer (its record is kept)")
    who = annotator or getpass.getuser()
    records = []
    for case_id, path in seen.items():
        when = datetime.now(UTC).isoformat(timespec="seconds")
        old = earlier.get(case_id)
        if old is not None:
            ws.replaced_annotations_dir.mkdir(exist_ok=True)
            stamp = when.replace(":", "").replace("+0000", "Z")
            old.replace(ws.replaced_annotations_dir / f"{case_id}.{stamp}{D.file_extension(old)}")
        target = ws.annotations_dir / f"{case_id}{D.file_extension(path)}"
        partial = target.with_name(f".{target.name}.partial")
        shutil.copyfile(path, partial)
        os.replace(partial, target)
        record = {
            "case_id": case_id,
            "file": target.name,
            "source": str(path.resolve()),
            "sha256": sha256(target),
            "annotator": who,
            "time": when,
            "replaced": old.name if old is not None else None,
        }
        with ws.annotation_log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
    return records


def take_in(store: PseudoLabelStore, rules: AnswerRules, ws: Workspace, joining_round: int) -> Intake:
    """Bring the answers in ``annotations/`` that the store does not hold yet into its exemplars. Owner only.

    An answer is new when the store has no record of its case, or a record of another file content (a replaced
    answer: its record moves to the store's ``annotations_replaced``). A file that fails the checks is refused,
    with a warning naming it, and the store keeps any earlier answer for the case.

    Args:
        store: the store, through its owner.
        rules: what answers are checked against.
        ws: the run's work dir.
        joining_round: the first round whose training the answers join (recorded with each).
    """
    records = store.annotations
    logged = _logged(ws)
    new: dict[str, tuple[dict, D.Case]] = {}
    intake = Intake()
    for path in answer_files(ws.annotations_dir):
        digest = sha256(path)
        case_id = D.file_stem(path)
        if case_id in records and records[case_id]["sha256"] == digest:
            continue
        try:
            if case_id in new:
                raise DataError(str(path), f"a second answer for case {case_id!r} (the first: {new[case_id][0]['file']})")
            case = rules.check(path)
        except DataError as err:
            intake.refused[str(path)] = err.problem
            log.warning("annotation %s refused, the run goes on without it (fix or remove the file): %s", path, err.problem)
            continue
        given = logged.get((case_id, digest)) or {
            "annotator": DROPPED_BY_HAND,
            "time": datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds"),
        }
        record = {"case_id": case_id, "file": path.name, "sha256": digest, "annotator": given["annotator"], "time": given["time"], "round": joining_round}
        new[case_id] = (record, case)
    if not new:
        return intake
    ids, images, labels = store.exemplars()
    pairs = {cid: (image, label) for cid, image, label in zip(ids, images, labels)}
    replaced = [records[cid] for cid in sorted(new) if cid in records]
    for cid, (record, case) in new.items():
        records[cid] = record
        pairs[cid] = (case.image, case.mask)
    # The split's exemplars first, then the answers by case id: the same set gives the same order on resume.
    order = [cid for cid in ids if cid not in records] + sorted(records)
    store.set_exemplars(
        order,
        np.stack([pairs[cid][0] for cid in order]),
        np.stack([pairs[cid][1] for cid in order]),
        annotations=records,
        replaced=replaced,
    )
    intake.taken = sorted(new)
    log.info("annotations taken in for round %d: %s (%d in use)", joining_round, intake.taken, len(records))
    return intake


def _logged(ws: Workspace) -> dict[tuple[str, str], dict]:
    """``annotate``'s records by (case id, sha256), the latest of each."""
    if not ws.annotation_log_path.exists():
        return {}
    out = {}
    for number, line in enumerate(ws.annotation_log_path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            out[(record["case_id"], record["sha256"])] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            # A line cut short (a full disk): its answer is taken in as one dropped by hand, not lost.
            log.warning("%s line %d is not an annotation record; ignored", ws.annotation_log_path, number)
    return out
