"""The life of a round in the store: begun, filled batch by batch by the workers, verified, committed.

A round's arrays are chunked by its batch size (``chunk_size``, recorded when the round is begun), and the
coordinator hands out batches aligned to those chunks, so each chunk has exactly one writer. A case counts as
finished only when its ``done`` flag is set, which :meth:`RoundRecords.write` writes after the batch's label maps
and scores; a crash therefore leaves unfinished cases ``done=False`` and an interrupted run resumes with exactly
the cases in :meth:`RoundRecords.missing`. Integrity is checked and repaired a chunk (a batch) at a time. Workers
only write the chunks of their batch; the owner (the coordinator) alone begins and commits rounds and writes
their attributes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from caudo_ray.errors import DataError, StoreError
from caudo_ray.store.layout import (
    LABEL_KINDS,
    READ_BLOCK,
    RESULT_ARRAYS,
    ROUND_ARRAYS,
    check_chunk_size,
    check_indices,
    chunk_span,
    delete_chunks,
    jsonable,
    now,
    read_flags,
    read_rows_of,
    round_array_specs,
    write_rows_in_steps,
    write_rows_unless_flagged,
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

    def begin(self, r: int, params: Mapping[str, Any], chunk_size: int | None = None) -> int:
        """Creates round ``r`` (idempotent) and records its parameters, chunk size and start time. Owner only.

        Args:
            r: round number, >= 0.
            params: JSON parameters of the round (guidance strength w, calibration strength s, DDIM steps,
                model versions ...).
            chunk_size: cases per chunk of the round's arrays: the batch size the coordinator streams the round
                with. None takes the store's. A round begun earlier keeps the chunk size it was begun with.

        Returns:
            The round's chunk size: batches of the round must be aligned to it (``layout.chunk_batches``).

        Raises:
            StoreError: the round exists with different parameters.
        """
        store = self._store
        store._check_writable()
        r = _round_number(r)
        requested = check_chunk_size(chunk_size if chunk_size is not None else store.chunk_size, f"round {r} chunk_size")
        params = jsonable(dict(params), f"round {r} params")
        rounds = self._root["rounds"]
        group = rounds.get(str(r))
        if group is None:
            group = rounds.create_group(str(r))
        recorded = group.attrs.get("params")
        if recorded is not None and recorded != params:
            raise StoreError(
                f"{store.url}: round {r} was begun with params {json.dumps(recorded, sort_keys=True)}, "
                f"now asked with {json.dumps(params, sort_keys=True)}; use a new store to change them"
            )
        # An array a crashed begin left behind fixes the chunk size; creating the missing ones keeps begin idempotent.
        existing = {name: group.get(name) for name in ROUND_ARRAYS}
        found = [a.chunks[0] for name, a in existing.items() if a is not None and name != "selected"]
        size = int(group.attrs.get("chunk_size", found[0] if found else requested))
        specs = round_array_specs(store.num_cases, store.working_size, store.score_names, size)
        for name, spec in specs.items():
            if existing[name] is None:
                group.create_array(name, **spec)
        if recorded is None:
            started = now()
            group.attrs.update({"params": params, "chunk_size": size, "started": started, "committed": False})
            summary = dict(self._root.attrs.get("rounds", {}))
            summary[str(r)] = {"params": params, "chunk_size": size, "started": started, "committed": False}
            self._root.attrs.update({"rounds": summary, "updated": started})
        elif size != requested:
            log.info("round %d of %s keeps the batch size it was begun with (%d, not %d)", r, store.url, size, requested)
        self._arrays_of.pop(r, None)
        return self.chunk_size(r)

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
        proposed: np.ndarray | None = None,
    ) -> None:
        """Stores the label maps and scores of a batch of cases, then marks them done.

        Touches only the round's chunks that hold the batch, never attributes, so several processes may call it
        at once for batches of disjoint chunks (what ``layout.chunk_batches`` gives). The labels and scores of a
        whole batch go to zarr in one call and ``done`` after them: a crash never leaves a case done with data
        missing.

        Args:
            r: a begun round.
            indices: case indices of the batch (any order, no repeats).
            initial: (n, H, W) integer label maps of the segmenter.
            calibrated: (n, H, W) integer calibrated label maps (what the round keeps).
            scores: (n,) float arrays keyed by score names of the store; a score left out, or NaN, means not
                available for these cases (e.g. Dice without hidden truth) and reads NaN.
            proposed: (n, H, W) the calibrator's unguarded labels; None: the calibrated ones (nothing disputed).

        Raises:
            StoreError: the round was not begun, or is committed and the cases are done.
            DataError: shapes, classes or scores are wrong (naming the case where one is at fault).
        """
        store = self._store
        store._check_writable()
        arrays = self._arrays(r)
        idx = check_indices(indices, store.num_cases, f"round {r} results")
        ids = [store.case_ids[i] for i in idx]
        maps = {"initial": np.asarray(initial), "calibrated": np.asarray(calibrated)}
        maps["proposed"] = maps["calibrated"] if proposed is None else np.asarray(proposed)
        for kind, block in maps.items():
            store._check_block(block, idx, kind)
            store._check_labels(block, ids, f"{kind} label")
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
        labels = np.stack([maps[kind][order] for kind in LABEL_KINDS], axis=1).astype(np.uint8)
        steps = [[(arrays["labels"], labels), (arrays["scores"], score_block[order])], [(arrays["done"], np.ones(len(sidx), bool))]]
        # A committed round takes writes only for cases it lost (see invalidate): results never change once done.
        # The usual batch has none of its cases done, so the round's attributes are read only when one is.
        if write_rows_unless_flagged(steps, arrays["done"], sidx):
            return
        if self.is_committed(r) and read_rows_of([arrays["done"]], sidx)[0].any():
            raise StoreError(f"{store.url}: round {r} is committed; its results can no longer change")
        write_rows_in_steps(steps, sidx)

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

    def chunk_size(self, r: int) -> int:
        """Cases per chunk of round ``r``'s arrays: its batches must not cross a multiple of it."""
        return int(self._arrays(r)["done"].chunks[0])

    def done(self, r: int) -> np.ndarray:
        """Per-case done flags of round ``r`` (bool (N,)); a flag chunk that fails to decode reads as False."""
        return read_flags(self._arrays(r)["done"])

    def missing(self, r: int) -> np.ndarray:
        """Indices of the usable cases (image loaded, not skipped) of round ``r`` not done yet."""
        return np.flatnonzero(~self.done(r) & self._store.usable_mask())

    def attrs(self, r: int) -> dict:
        """A copy of round ``r``'s attributes (params, chunk_size, started, committed, committed_at, summary)."""
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
        labels, scores = self._store._read_ordered_of([arrays["labels"], arrays["scores"]], idx)
        out: dict[str, Any] = {kind: np.ascontiguousarray(labels[:, k]) for k, kind in enumerate(LABEL_KINDS)}
        out["scores"] = self._score_dict(scores)
        return out

    def scores(self, r: int) -> dict[str, np.ndarray]:
        """All cases' scores of round ``r``: ``{name: float32 (N,)}``."""
        return self._score_dict(self._store._read_ordered(self._arrays(r)["scores"], np.arange(self._store.num_cases)))

    # ------------------------------------------------------------------ integrity

    def verify(self, r: int, indices: Sequence[int] | np.ndarray | None = None) -> list[int]:
        """Reads back round ``r``'s chunks that hold done cases and returns the cases of those that fail to decode.

        A chunk whose ``done`` flags themselves fail to decode is reported whole: which of its cases were done is
        unknown. Chunks are read a block of them at a time, and one by one only inside a block that fails.

        Args:
            r: the round.
            indices: cases to check (all when None); cases not done are skipped.

        Returns:
            Sorted indices of the cases held by corrupt chunks (the done ones among ``indices``), for
            :meth:`invalidate` and recomputation.
        """
        arrays = self._arrays(r)
        n, size = self._store.num_cases, self.chunk_size(r)
        unreadable: list[int] = []
        done = read_flags(arrays["done"], unreadable)
        idx = check_indices(indices, n, f"round {r} verify")
        wanted = np.zeros(n, dtype=bool)
        wanted[idx] = True
        flagged = np.zeros(n, dtype=bool)
        for c in unreadable:
            flagged[c * size : (c + 1) * size] = True
        check = wanted & (done | flagged)
        chunks = np.unique(np.flatnonzero(check) // size)
        step = max(1, READ_BLOCK // size)
        corrupt = set(unreadable)
        for start in range(0, chunks.size, step):
            group = chunks[start : start + step]
            if not self._chunks_read(arrays, group, size, n):
                corrupt.update(int(c) for c in group if not self._chunks_read(arrays, np.array([c]), size, n))
        bad: list[int] = []
        for c in sorted(corrupt):
            cases = np.flatnonzero(check[c * size : (c + 1) * size]) + c * size
            log.warning(
                "round %d: the chunk of cases %d..%d is unreadable; its stored cases: %s",
                r, c * size, min((c + 1) * size, n) - 1, [self._store.case_ids[i] for i in cases],
            )  # fmt: skip
            bad.extend(int(i) for i in cases)
        return bad

    def invalidate(self, r: int, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Marks every case of the chunks holding ``indices`` not done, so they are recomputed, and drops those chunks.

        A chunk is one batch's unit of writing and checking, so a corrupt case costs its chunk: its labels, scores
        and done flags are deleted and the whole chunk is labelled again, by one writer, as a batch. A committed
        round keeps its selection and summary: recomputing cases with the round's saved models gives the same
        labels (labelling is deterministic), so they stay true.

        Returns:
            The cases made not done, sorted.
        """
        self._store._check_writable()
        arrays = self._arrays(r)
        idx = check_indices(indices, self._store.num_cases, f"round {r} invalidate")
        chunks, cases = chunk_span(idx, self.chunk_size(r), self._store.num_cases)
        # ``done`` first: a crash in between leaves chunks not done, which are relabelled whatever they hold.
        for name in ("done", *RESULT_ARRAYS):
            delete_chunks(arrays[name], chunks)
        return cases

    # ------------------------------------------------------------------ helpers

    def _chunks_read(self, arrays: dict[str, zarr.Array], chunks: np.ndarray, size: int, n: int) -> bool:
        """Whether the result chunks ``chunks`` (ascending) all decode, read together where they are adjacent."""
        rows = np.concatenate([np.arange(c * size, min((c + 1) * size, n)) for c in chunks])
        try:
            read_rows_of([arrays[name] for name in RESULT_ARRAYS], rows)
        except Exception:  # noqa: BLE001 - any decode failure marks the chunks for recomputation
            return False
        return True

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
