"""The life of a round in the store: begun, filled batch by batch by the workers, verified, committed.

A case of a round counts as finished only when its ``done`` flag is set, which :meth:`RoundRecords.write` writes
after the case's label maps and scores; a crash therefore leaves unfinished cases ``done=False`` and an
interrupted run resumes with exactly the cases in :meth:`RoundRecords.missing`. Workers only write per-case
chunks; the owner (the coordinator) alone begins and commits rounds and writes their attributes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from caudo_ray.errors import DataError, StoreError
from caudo_ray.store.layout import (
    LABEL_ARRAYS,
    READ_BLOCK,
    ROUND_ARRAYS,
    check_indices,
    jsonable,
    now,
    read_flags,
    read_rows,
    round_array_specs,
    write_rows,
)

log = logging.getLogger(__name__)


class RoundRecords:
    """The rounds of one store (``store.rounds``).

    Args:
        store: the :class:`~caudo_ray.store.PseudoLabelStore` the rounds belong to; case ids, sizes, the usable
            mask and row reads come from it.
    """

    def __init__(self, store: Any):
        self._store = store
        self._root: zarr.Group = store._root
        self._arrays_of: dict[int, dict[str, zarr.Array]] = {}

    # ------------------------------------------------------------------ owner: begin and commit

    def begin(self, r: int, params: Mapping[str, Any]) -> None:
        """Creates round ``r`` (idempotent) and records its parameters and start time. Owner only.

        Args:
            r: round number, >= 0.
            params: JSON parameters of the round (guidance strength w, calibration strength s, DDIM steps,
                model versions ...).

        Raises:
            StoreError: the round exists with different parameters.
        """
        self._store._check_writable()
        r = _round_number(r)
        params = jsonable(dict(params), f"round {r} params")
        rounds = self._root["rounds"]
        group = rounds.get(str(r))
        if group is None:
            group = rounds.create_group(str(r))
        recorded = group.attrs.get("params")
        if recorded is not None and recorded != params:
            raise StoreError(
                f"{self._store.url}: round {r} was begun with params {json.dumps(recorded, sort_keys=True)}, "
                f"now asked with {json.dumps(params, sort_keys=True)}; use a new store to change them"
            )
        # Creating any array a crashed begin left missing keeps the call idempotent.
        specs = round_array_specs(self._store.num_cases, self._store.working_size, self._store.score_names)
        for name, spec in specs.items():
            if group.get(name) is None:
                group.create_array(name, **spec)
        if recorded is None:
            started = now()
            group.attrs.update({"params": params, "started": started, "committed": False})
            summary = dict(self._root.attrs.get("rounds", {}))
            summary[str(r)] = {"params": params, "started": started, "committed": False}
            self._root.attrs.update({"rounds": summary, "updated": started})
        self._arrays_of.pop(r, None)

    def commit(self, r: int, selected: np.ndarray, summary: Mapping[str, Any]) -> None:
        """Records the selection and summary of a complete round and marks it committed. Owner only.

        Raises:
            StoreError: cases are still missing, or the round is already committed.
            DataError: ``selected`` is not a bool (N,) mask.
        """
        self._store._check_writable()
        r = _round_number(r)
        arrays = self._arrays(r)
        n = self._store.num_cases
        if self.is_committed(r):
            raise StoreError(f"{self._store.url}: round {r} is already committed")
        missing = self.missing(r)
        if missing.size:
            ids = self._store.case_ids
            first = ", ".join(ids[i] for i in missing[:5])
            raise StoreError(
                f"{self._store.url}: round {r} cannot be committed: {missing.size} of {n} cases are missing (first: {first})"
            )
        selected = np.asarray(selected)
        if selected.shape != (n,) or selected.dtype != bool:
            raise DataError(f"round {r} selected", f"must be a bool array of shape ({n},), got {selected.dtype} {selected.shape}")
        summary = jsonable(dict(summary), f"round {r} summary")
        arrays["selected"][:] = selected
        committed_at = now()
        self._root[f"rounds/{r}"].attrs.update({"committed": True, "committed_at": committed_at, "summary": summary})
        rounds = dict(self._root.attrs.get("rounds", {}))
        entry = dict(rounds.get(str(r), {}))
        entry.update({"committed": True, "committed_at": committed_at, "summary": summary})
        rounds[str(r)] = entry
        self._root.attrs.update({"rounds": rounds, "updated": committed_at})
        log.info("committed round %d of %s: %d selected", r, self._store.url, int(selected.sum()))

    # ------------------------------------------------------------------ workers: results

    def write(
        self,
        r: int,
        indices: Sequence[int] | np.ndarray,
        initial: np.ndarray,
        calibrated: np.ndarray,
        scores: Mapping[str, np.ndarray],
    ) -> None:
        """Stores the label maps and scores of a batch of cases, then marks them done.

        Touches only per-case chunks, never attributes, so several processes may call it at once for disjoint
        cases. ``done`` is written after everything else: a crash never leaves a case done with data missing.

        Args:
            r: a begun round.
            indices: case indices of the batch (any order, no repeats).
            initial: (n, H, W) integer label maps of the segmenter.
            calibrated: (n, H, W) integer calibrated label maps.
            scores: (n,) float arrays keyed by score names of the store; a score left out, or NaN, means not
                available for these cases (e.g. Dice without hidden truth) and reads NaN.

        Raises:
            StoreError: the round was not begun, or is committed and the cases are done.
            DataError: shapes, classes or scores are wrong (naming the case where one is at fault).
        """
        store = self._store
        store._check_writable()
        arrays = self._arrays(r)
        idx = check_indices(indices, store.num_cases, f"round {r} results")
        # A committed round takes writes only for cases it lost (see invalidate): results never change once done.
        if self.is_committed(r) and self.done(r)[idx].any():
            raise StoreError(f"{store.url}: round {r} is committed; its results can no longer change")
        ids = [store.case_ids[i] for i in idx]
        initial, calibrated = np.asarray(initial), np.asarray(calibrated)
        store._check_block(initial, idx, "initial")
        store._check_block(calibrated, idx, "calibrated")
        store._check_labels(initial, ids, "initial label")
        store._check_labels(calibrated, ids, "calibrated label")
        names = store.score_names
        unknown = sorted(set(scores) - set(names))
        if unknown:
            raise DataError(f"round {r} scores", f"unknown score names {unknown}; the store records {list(names)}")
        # Scores left out are written as NaN, so a recomputed case never keeps a stale score of an earlier attempt.
        score_block = np.full((len(idx), len(names)), np.nan, dtype=np.float32)
        for column, name in enumerate(names):
            if name not in scores:
                continue
            values = np.asarray(scores[name], dtype=np.float32)
            if values.shape != (len(idx),):
                raise DataError(f"round {r} score {name}", f"shape {values.shape}, expected ({len(idx)},)")
            score_block[:, column] = values
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        write_rows(arrays["initial"], sidx, initial[order].astype(np.uint8))
        write_rows(arrays["calibrated"], sidx, calibrated[order].astype(np.uint8))
        write_rows(arrays["scores"], sidx, score_block[order])
        write_rows(arrays["done"], sidx, np.ones(len(sidx), dtype=bool))

    # ------------------------------------------------------------------ state

    def numbers(self) -> list[int]:
        """Numbers of all begun rounds, ascending."""
        return sorted(int(k) for k in self._root["rounds"].group_keys())

    def committed(self) -> list[int]:
        """Numbers of the committed rounds, ascending."""
        return [r for r in self.numbers() if self.is_committed(r)]

    def is_committed(self, r: int) -> bool:
        """Whether round ``r`` exists and was committed."""
        group = self._root["rounds"].get(str(_round_number(r)))
        return bool(group is not None and group.attrs.get("committed", False))

    def done(self, r: int) -> np.ndarray:
        """Per-case done flags of round ``r`` (bool (N,)); a flag that fails to decode reads as False."""
        return read_flags(self._arrays(r)["done"])

    def missing(self, r: int) -> np.ndarray:
        """Indices of the usable cases (image loaded, not skipped) of round ``r`` not done yet."""
        return np.flatnonzero(~self.done(r) & self._store.usable_mask())

    def attrs(self, r: int) -> dict:
        """A copy of round ``r``'s attributes (params, started, committed, committed_at, summary)."""
        group = self._root["rounds"].get(str(_round_number(r)))
        if group is None:
            raise StoreError(f"{self._store.url}: round {r} was not begun")
        return group.attrs.asdict()

    def summary(self, r: int) -> dict:
        """The summary recorded when round ``r`` was committed.

        Raises:
            StoreError: the round is not committed.
        """
        if not self.is_committed(r):
            raise StoreError(f"{self._store.url}: round {r} is not committed, so it has no summary")
        return dict(self.attrs(r).get("summary", {}))

    def selected(self, r: int) -> np.ndarray:
        """The selection mask (bool (N,)) recorded when round ``r`` was committed; all False before."""
        return np.asarray(self._arrays(r)["selected"][:], dtype=bool)

    # ------------------------------------------------------------------ reading results

    def read(self, r: int, indices: Sequence[int] | np.ndarray | None = None) -> dict[str, Any]:
        """Reads round ``r``'s results for the given cases (all when None), in the order asked.

        Returns:
            ``{"initial": uint8 (n, H, W), "calibrated": uint8 (n, H, W), "scores": {name: float32 (n,)}}``.
            Label maps of cases not done read as zeros, their scores as NaN.
        """
        arrays = self._arrays(r)
        idx = check_indices(indices, self._store.num_cases, f"round {r}")
        read = self._store._read_ordered
        return {
            "initial": read(arrays["initial"], idx),
            "calibrated": read(arrays["calibrated"], idx),
            "scores": self._score_dict(read(arrays["scores"], idx)),
        }

    def scores(self, r: int) -> dict[str, np.ndarray]:
        """All cases' scores of round ``r``: ``{name: float32 (N,)}``."""
        return self._score_dict(self._store._read_ordered(self._arrays(r)["scores"], np.arange(self._store.num_cases)))

    # ------------------------------------------------------------------ integrity

    def verify(self, r: int, indices: Sequence[int] | np.ndarray | None = None) -> list[int]:
        """Reads back the done cases of round ``r`` and returns those whose chunks fail to read or decode.

        Args:
            r: the round.
            indices: cases to check (all when None); cases not done are skipped.

        Returns:
            Sorted indices of the unreadable cases, for :meth:`invalidate` and recomputation.
        """
        arrays = self._arrays(r)
        done = self.done(r)
        idx = check_indices(indices, self._store.num_cases, f"round {r} verify")
        idx = np.unique(idx[done[idx]])
        names = [*LABEL_ARRAYS, "scores"]
        bad: list[int] = []
        for start in range(0, idx.size, READ_BLOCK):
            block = idx[start : start + READ_BLOCK]
            try:
                for name in names:
                    read_rows(arrays[name], block)
                continue
            except Exception:  # noqa: BLE001 - any decode failure marks a case for recomputation
                pass
            for i in block:
                try:
                    for name in names:
                        arrays[name][int(i)]
                except Exception as err:  # noqa: BLE001
                    log.warning("round %d case %s unreadable: %s", r, self._store.case_ids[i], err)
                    bad.append(int(i))
        return bad

    def invalidate(self, r: int, indices: Sequence[int] | np.ndarray) -> None:
        """Marks the given cases of round ``r`` not done, so they are recomputed, and drops their result chunks.

        Dropping the chunks lets a corrupt chunk be rewritten: zarr reads a chunk back before a scattered write.
        A committed round keeps its selection and summary: recomputing a case with the round's saved models gives
        the same labels (labelling is deterministic), so they stay true.
        """
        self._store._check_writable()
        arrays = self._arrays(r)
        idx = np.unique(check_indices(indices, self._store.num_cases, f"round {r} invalidate"))
        write_rows(arrays["done"], idx, np.zeros(idx.size, dtype=bool))
        for name in (*LABEL_ARRAYS, "scores"):
            arr = arrays[name]
            for i in idx:
                key = arr.metadata.encode_chunk_key((int(i),) + (0,) * (arr.ndim - 1))
                sync(arr.store_path.store.delete(f"{arr.store_path.path}/{key}"))

    # ------------------------------------------------------------------ helpers

    def _arrays(self, r: int) -> dict[str, zarr.Array]:
        """The arrays of round ``r``, opened once (their metadata never changes after begin)."""
        r = _round_number(r)
        if r not in self._arrays_of:
            group = self._root["rounds"].get(str(r))
            if group is None or group.attrs.get("params") is None:
                raise StoreError(f"{self._store.url}: round {r} was not begun")
            self._arrays_of[r] = {name: group[name] for name in ROUND_ARRAYS}
        return self._arrays_of[r]

    def _score_dict(self, block: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(block[:, k]) for k, name in enumerate(self._store.score_names)}


def _round_number(r: int) -> int:
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
        raise StoreError(f"round must be an integer >= 0, got {r!r}")
    return int(r)
