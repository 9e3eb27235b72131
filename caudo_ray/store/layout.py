"""The Zarr layout of a pseudo-label store: schema, array specs, locations and row-wise chunk I/O.

Layout::

    store.zarr/                 group attrs: schema_version, config_hash, created, updated, working_size,
                                num_classes, score_names, provenance, rounds (summary per round), skipped
      cases/ids                 (N,) str             case identifiers, fixed order
      cases/geometry            (N,) str             chunk (1,), JSON of each case's Geometry dict (write-back)
      cases/images              (N, H, W) float16    chunk (1, H, W)
      cases/truth               (N, H, W) uint8      chunk (1, H, W), hidden labels of benchmark pools
                                                     (NO_TRUTH where a case has none); never used by the method
      cases/loaded              (N,) bool            chunk (1,), image written
      exemplar/ids, exemplar/images (K, H, W) float16, exemplar/labels (K, H, W) uint8
      rounds/<r>/initial        (N, H, W) uint8      chunk (1, H, W), argmax of the segmenter's probabilities
      rounds/<r>/calibrated     (N, H, W) uint8      chunk (1, H, W), argmax of the calibrated probabilities
      rounds/<r>/scores         (N, S) float32       chunk (1, S), columns named by the ``score_names`` attribute
      rounds/<r>/selected       (N,) bool            written by the owner at commit
      rounds/<r>/done           (N,) bool            chunk (1,), written last per case
                                round attrs: params, started, committed, committed_at, summary

Every per-case array is chunked one case per chunk, so workers writing disjoint cases never touch the same
chunk. All of a case's scores share one chunk: every chunk is a file (or object) of its own, and per-file
overhead, not bytes, is what a batch write costs. Chunks carry a CRC32C checksum after Blosc compression, so a
flipped bit on disk fails loudly on read (Blosc alone decodes many corruptions into silent garbage).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import FsspecStore, LocalStore

from caudo_ray.errors import DataError, StoreError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Scores a round may record; a batch may leave any of them out (they then read NaN, e.g. Dice without truth).
DEFAULT_SCORE_NAMES = (
    "reliability",
    "agreement",
    "accepted",
    "consistency",
    "confidence",
    "entropy",
    "area",
    "compactness",
    "initial_dice",
    "calibrated_dice",
)
NO_TRUTH = 255  # truth value of a case without hidden labels
LABEL_ARRAYS = ("initial", "calibrated")
ROUND_ARRAYS = (*LABEL_ARRAYS, "scores", "selected", "done")
# Verify and export read this many cases at a time: bounded memory, few zarr calls.
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
    """Opens the root group, or returns None when nothing is stored at ``url``."""
    path = local_path(url)
    if path is not None and not path.exists():
        return None
    try:
        return zarr.open_group(make_store(url, mode == "r", storage_options), mode=mode, zarr_format=3)
    except FileNotFoundError:
        return None


def create_case_arrays(root: zarr.Group, ids: list[str], geometry_text: list[str], size: tuple[int, int]) -> None:
    """The per-case arrays of a new store (images empty until written)."""
    n, (h, w) = len(ids), size
    root.create_array("cases/ids", data=np.array(ids, dtype=np.dtypes.StringDType()), chunks=(n,))
    root.create_array("cases/geometry", data=np.array(geometry_text, dtype=np.dtypes.StringDType()), chunks=(1,))
    root.create_array("cases/images", shape=(n, h, w), dtype="float16", chunks=(1, h, w), compressors=compressors(), fill_value=0)
    root.create_array(
        "cases/truth", shape=(n, h, w), dtype="uint8", chunks=(1, h, w), compressors=compressors(), fill_value=NO_TRUTH
    )
    root.create_array("cases/loaded", shape=(n,), dtype="bool", chunks=(1,), fill_value=False)
    root.create_group("rounds")


def round_array_specs(n: int, size: tuple[int, int], score_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The arrays of one round, by name: shapes, chunks (one case per chunk) and fill values."""
    h, w = size
    specs: dict[str, dict[str, Any]] = {
        name: {"shape": (n, h, w), "dtype": "uint8", "chunks": (1, h, w), "compressors": compressors(), "fill_value": 0}
        for name in LABEL_ARRAYS
    }
    specs["scores"] = {
        "shape": (n, len(score_names)),
        "dtype": "float32",
        "chunks": (1, len(score_names)),
        "fill_value": float("nan"),
        "attributes": {"score_names": list(score_names)},
        "dimension_names": ("case", "score"),
    }
    specs["selected"] = {"shape": (n,), "dtype": "bool", "chunks": (n,), "fill_value": False}
    specs["done"] = {"shape": (n,), "dtype": "bool", "chunks": (1,), "fill_value": False}
    return specs


def _runs_are_contiguous(sorted_idx: np.ndarray) -> bool:
    return sorted_idx.size > 0 and int(sorted_idx[-1]) - int(sorted_idx[0]) + 1 == sorted_idx.size


def write_rows(arr: zarr.Array, sorted_idx: np.ndarray, block: np.ndarray) -> None:
    """Writes ``block[k]`` to row ``sorted_idx[k]`` of ``arr`` in one zarr call.

    A contiguous run is a plain slice; scattered rows go through one orthogonal-index write, which zarr splits
    into the same whole-chunk writes (one chunk per case) and performs concurrently.
    """
    if sorted_idx.size == 0:
        return
    if _runs_are_contiguous(sorted_idx):
        arr[int(sorted_idx[0]) : int(sorted_idx[-1]) + 1] = block
    else:
        arr.oindex[sorted_idx] = block


def read_rows(arr: zarr.Array, sorted_idx: np.ndarray) -> np.ndarray:
    if _runs_are_contiguous(sorted_idx):
        return arr[int(sorted_idx[0]) : int(sorted_idx[-1]) + 1]
    return arr.oindex[sorted_idx]


def read_flags(arr: zarr.Array) -> np.ndarray:
    """Reads a per-case bool array; a chunk that fails to decode reads as False (the case is redone)."""
    try:
        return np.asarray(arr[:], dtype=bool)
    except Exception:  # noqa: BLE001 - any decode failure means "not known to be done"
        flags = np.zeros(arr.shape[0], dtype=bool)
        for i in range(arr.shape[0]):
            try:
                flags[i] = bool(arr[i])
            except Exception:  # noqa: BLE001
                log.warning("unreadable flag chunk %s[%d]; treating the case as not done", arr.path, i)
        return flags


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
