"""The Zarr layout of a pseudo-label store: schema, array specs, locations and chunk-aligned row I/O.

Layout (schema version 2)::

    store.zarr/                 group attrs: schema_version, config_hash, created, updated, working_size,
                                num_classes, score_names, chunk_size, provenance, rounds (summary per round),
                                skipped
      .lock                     the single-writer lock (lock.py), not part of the Zarr hierarchy
      cases/ids                 (N,) str             case identifiers, fixed order, one chunk
      cases/geometry            (N,) str             JSON of each case's Geometry dict (write-back)
      cases/images              (N, H, W) float16
      cases/truth               (N, H, W) uint8      hidden labels of benchmark pools (NO_TRUTH where a case has
                                                     none); never used by the method
      cases/loaded              (N,) bool            image written
      exemplar/ids, exemplar/images (K, H, W) float16, exemplar/labels (K, H, W) uint8
      rounds/<r>/labels         (N, 2, H, W) uint8   [:, 0] initial (argmax of the segmenter's probabilities),
                                                     [:, 1] calibrated (argmax of the calibrated probabilities)
      rounds/<r>/scores         (N, S) float32       columns named by the ``score_names`` attribute
      rounds/<r>/done           (N,) bool            written last, after a batch's labels and scores
      rounds/<r>/selected       (N,) bool            one chunk, written by the owner at commit
                                round attrs: params, chunk_size, started, committed, committed_at, summary

Every per-case array is chunked along the case axis in chunks of ``chunk_size`` cases: the store's (the
coordinator's batch size when it was created) for ``cases/*``, the round's (its batch size when it was begun) for
``rounds/<r>/*``. The coordinator hands out batches aligned to a round's chunks (:func:`chunk_batches`), so each
chunk of a round has exactly one writer, and a batch costs three chunk writes (labels, scores, done) however many
cases it holds: every chunk is a file (or object) of its own, and per-file overhead, not bytes, is what a small
write costs. Chunks carry a CRC32C checksum after Blosc compression, so a flipped bit on disk fails loudly on
read (Blosc alone decodes many corruptions into silent garbage); a corrupt chunk costs its whole batch.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import FsspecStore, LocalStore

from caudo_ray.errors import DataError, StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
# Scores a round may record; a batch may leave any of them out (they then read NaN, e.g. Dice without truth).
DEFAULT_SCORE_NAMES = (
    "reliability",
    "agreement",
    "accepted",
    "consistency",
    "confidence",
    "entropy",
    "area",
    "shape",
    "initial_dice",
    "calibrated_dice",
)
NO_TRUTH = 255  # truth value of a case without hidden labels
# The label maps of ``rounds/<r>/labels``, in axis-1 order: the segmenter's, the kept (calibrated) one, and what the
# calibrator proposed before the rules that guard the kept one (where the two differ, the label is disputed).
LABEL_KINDS = ("initial", "calibrated", "proposed")
RESULT_ARRAYS = ("labels", "scores")  # what a batch writes before its ``done`` flags
ROUND_ARRAYS = (*RESULT_ARRAYS, "done", "selected")
DEFAULT_CHUNK_SIZE = 16
# Verify and export read at least this many cases at a time (whole chunks): bounded memory, few zarr calls.
READ_BLOCK = 64

_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def jsonable(value: Any, what: str) -> Any:
    """Returns ``value`` as it will read back from the store's JSON attributes (tuples become lists)."""
    try:
        return json.loads(json.dumps(value, default=_json_default, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise StoreError(f"{what} must be JSON serialisable: {err}") from err


def geometry_json(geometry: Mapping[str, Any], case_id: str) -> str:
    return json.dumps(jsonable(dict(geometry), f"geometry of {case_id}"), sort_keys=True)


def compressors() -> list:
    return [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()]


def validate_names(names: Sequence[str], source: str, what: str = "case id") -> list[str]:
    """Case ids or score names that are safe as store keys and file names, without repeats."""
    names = [str(i) for i in names]
    seen: set[str] = set()
    for name in names:
        if not _SAFE_NAME.fullmatch(name) or name.startswith("."):
            raise DataError(
                name, f"unsafe {what} in {source}: use only letters, digits, '.', '_', '-' and do not start with '.'"
            )
        if name in seen:
            raise DataError(name, f"duplicate {what} in {source}")
        seen.add(name)
    return names


def check_chunk_size(chunk_size: int, what: str) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise DataError(what, f"chunk size must be a whole number >= 1, got {chunk_size!r}")
    return int(chunk_size)


def local_path(url: str) -> Path | None:
    """The filesystem path of a local store, or None for a remote (fsspec) URL."""
    if url.startswith("file://"):
        return Path(url[len("file://") :])
    if "://" in url:
        return None
    return Path(url)


def make_store(url: str, read_only: bool, storage_options: dict | None) -> LocalStore | FsspecStore:
    path = local_path(url)
    if path is not None:
        return LocalStore(path, read_only=read_only)
    return FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)


def open_root(url: str, mode: str, storage_options: dict | None) -> zarr.Group | None:
    """Opens the root group, or returns None when no Zarr group is stored at ``url`` (a lock alone is none)."""
    path = local_path(url)
    if path is not None and not (path / "zarr.json").exists():
        return None
    try:
        return zarr.open_group(make_store(url, mode == "r", storage_options), mode=mode, zarr_format=3)
    except FileNotFoundError:
        return None


def create_case_arrays(
    root: zarr.Group, ids: list[str], geometry_text: list[str], size: tuple[int, int], chunk_size: int
) -> None:
    """The per-case arrays of a new store (images empty until written), chunked ``chunk_size`` cases a chunk."""
    n, (h, w), c = len(ids), size, chunk_size
    root.create_array("cases/ids", data=np.array(ids, dtype=np.dtypes.StringDType()), chunks=(n,))
    root.create_array("cases/geometry", data=np.array(geometry_text, dtype=np.dtypes.StringDType()), chunks=(c,))
    root.create_array("cases/images", shape=(n, h, w), dtype="float16", chunks=(c, h, w), compressors=compressors(), fill_value=0)
    root.create_array(
        "cases/truth", shape=(n, h, w), dtype="uint8", chunks=(c, h, w), compressors=compressors(), fill_value=NO_TRUTH
    )
    root.create_array("cases/loaded", shape=(n,), dtype="bool", chunks=(c,), fill_value=False)
    root.create_group("rounds")


def round_array_specs(n: int, size: tuple[int, int], score_names: Sequence[str], chunk_size: int) -> dict[str, dict[str, Any]]:
    """The arrays of one round, by name: shapes, chunks (``chunk_size`` cases each) and fill values."""
    h, w = size
    c = chunk_size
    return {
        "labels": {
            "shape": (n, len(LABEL_KINDS), h, w),
            "dtype": "uint8",
            "chunks": (c, len(LABEL_KINDS), h, w),
            "compressors": compressors(),
            "fill_value": 0,
            "attributes": {"label_kinds": list(LABEL_KINDS)},
            "dimension_names": ("case", "kind", "y", "x"),
        },
        "scores": {
            "shape": (n, len(score_names)),
            "dtype": "float32",
            "chunks": (c, len(score_names)),
            "compressors": compressors(),
            "fill_value": float("nan"),
            "attributes": {"score_names": list(score_names)},
            "dimension_names": ("case", "score"),
        },
        "done": {"shape": (n,), "dtype": "bool", "chunks": (c,), "fill_value": False},
        "selected": {"shape": (n,), "dtype": "bool", "chunks": (n,), "fill_value": False},
    }


def chunk_batches(indices: np.ndarray, chunk_size: int) -> Iterator[np.ndarray]:
    """Groups case indices by the chunk that holds them, in ascending order: one batch per chunk.

    A batch never spans two chunks, so a coordinator that hands each batch to one worker gives each chunk exactly
    one writer. A chunk with cases already done (a resumed round) yields only its other cases.
    """
    idx = np.unique(np.asarray(indices, dtype=np.int64))
    if idx.size == 0:
        return
    chunk = idx // chunk_size
    bounds = np.flatnonzero(np.diff(chunk)) + 1
    yield from np.split(idx, bounds)


def chunk_span(indices: np.ndarray, chunk_size: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The chunks that hold ``indices`` and every case index (below ``n``) in them, both ascending."""
    chunks = np.unique(np.asarray(indices, dtype=np.int64) // chunk_size)
    cases = (chunks[:, None] * chunk_size + np.arange(chunk_size)[None, :]).ravel()
    return chunks, cases[cases < n]


def _contiguous(sorted_idx: np.ndarray) -> slice | None:
    if sorted_idx.size and int(sorted_idx[-1]) - int(sorted_idx[0]) + 1 == sorted_idx.size:
        return slice(int(sorted_idx[0]), int(sorted_idx[-1]) + 1)
    return None


def _concurrently(calls: Sequence[Callable[[], Any]]) -> list[Any]:
    """Runs zarr calls side by side and returns their results in order.

    Each synchronous zarr call hands its I/O to zarr's own event loop and waits; calling from one thread per
    array lets those loop tasks overlap, so several arrays' rows cost one round trip rather than one each. This
    uses zarr's public synchronous API only (its event-loop helper ``zarr.core.sync`` is private).
    """
    if len(calls) == 1:
        return [calls[0]()]
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def _write_in_order(steps: Sequence[Sequence[tuple[zarr.Array, np.ndarray]]], run: slice) -> None:
    for step in steps:
        _concurrently([partial(arr.__setitem__, run, block) for arr, block in step])


def write_rows_in_steps(steps: Sequence[Sequence[tuple[zarr.Array, np.ndarray]]], sorted_idx: np.ndarray) -> None:
    """Writes rows ``sorted_idx`` of several arrays: each step's writes concurrently, the steps in order.

    A contiguous run of rows (a whole batch, the common case) goes to zarr's I/O loop in one round trip, so a
    batch pays one hand-over between threads rather than one per array; a later step starts only once every
    write of the one before it is stored (``done`` after the labels). Scattered rows (a resumed chunk that keeps
    some done cases) go through orthogonal-index writes, which zarr turns into read-modify-writes of their chunks.
    """
    if sorted_idx.size == 0:
        return
    run = _contiguous(sorted_idx)
    if run is None:
        for step in steps:
            for arr, block in step:
                arr.oindex[sorted_idx] = block
        return
    _write_in_order(steps, run)


def write_rows_unless_flagged(
    steps: Sequence[Sequence[tuple[zarr.Array, np.ndarray]]], flags: zarr.Array, sorted_idx: np.ndarray
) -> bool:
    """:func:`write_rows_in_steps` if none of the rows is set in ``flags``, read just before.

    Returns:
        True when written; False, writing nothing, when a row is flagged or the rows are not contiguous (the
        caller then decides, and writes with :func:`write_rows_in_steps`).
    """
    run = _contiguous(sorted_idx)
    if run is None or np.asarray(flags[run]).any():
        return False
    _write_in_order(steps, run)
    return True


def read_rows_of(arrays: Sequence[zarr.Array], sorted_idx: np.ndarray) -> list[np.ndarray]:
    """Rows ``sorted_idx`` of several arrays, read concurrently in one round trip when the rows are contiguous."""
    run = _contiguous(sorted_idx)
    if run is None:
        return [arr.oindex[sorted_idx] for arr in arrays]
    return [np.asarray(a) for a in _concurrently([partial(arr.__getitem__, run) for arr in arrays])]


def read_flags(arr: zarr.Array, unreadable: list[int] | None = None) -> np.ndarray:
    """Reads a per-case bool array; a chunk that fails to decode reads as False (its cases are redone).

    Args:
        arr: the array.
        unreadable: when given, the indices of the chunks that failed to decode are appended to it.
    """
    try:
        return np.asarray(arr[:], dtype=bool)
    except Exception:  # noqa: BLE001 - any decode failure means "not known to be done"
        n, size = arr.shape[0], arr.chunks[0]
        flags = np.zeros(n, dtype=bool)
        for start in range(0, n, size):
            try:
                flags[start : start + size] = arr[start : start + size]
            except Exception:  # noqa: BLE001
                log.warning("unreadable flag chunk %s[%d:%d]; treating its cases as not done", arr.path, start, start + size)
                if unreadable is not None:
                    unreadable.append(start // size)
        return flags


def delete_chunks(arr: zarr.Array, chunks: Sequence[int]) -> None:
    """Drops chunks (by index along the case axis) of ``arr``: they read as the fill value until written again.

    A corrupt chunk must go before it can be rewritten in part: zarr reads a chunk back before a partial write.
    Writing the fill value over a whole chunk is that drop: zarr never reads a chunk it overwrites whole, and it
    deletes a chunk that holds only the fill value rather than store it (zarr's default ``write_empty_chunks``
    false, which the store never changes).
    """
    size, n = arr.chunks[0], arr.shape[0]
    for c in chunks:
        arr[int(c) * size : min((int(c) + 1) * size, n)] = arr.fill_value


def check_indices(indices: Sequence[int] | np.ndarray | None, n: int, what: str) -> np.ndarray:
    """Case indices as int64, all of ``range(n)`` for None; refuses repeats and out-of-range values."""
    if indices is None:
        return np.arange(n)
    idx = np.asarray(indices)
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise DataError(what, f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
    if idx.min() < 0 or idx.max() >= n:
        raise DataError(what, f"indices must be in 0..{n - 1}, got {idx.min()}..{idx.max()}")
    if np.unique(idx).size != idx.size:
        raise DataError(what, "indices repeat")
    return idx.astype(np.int64)
