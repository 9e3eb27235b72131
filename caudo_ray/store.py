"""PseudoLabelStore: the resumable record of a self-training run, on Zarr v3.

Every per-case array is chunked one case per chunk, so workers writing disjoint cases never touch the same
chunk and need no coordination. Only the owner (the coordinator) writes group attributes and the few arrays
chunked as a whole (case ids, the selection mask of a round). A case of a round counts as finished
only when its ``done`` flag is set, which :meth:`PseudoLabelStore.write_results` writes after the case's label
maps and scores; a crash therefore leaves unfinished cases ``done=False`` and an interrupted run resumes with
exactly the cases in :meth:`PseudoLabelStore.missing`.

Layout::

    store.zarr/                 group attrs: schema_version, config_hash, created, updated, working_size,
                                num_classes, score_names, provenance, rounds (summary per round)
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

Cases that could not be loaded are recorded by the owner in the root attribute ``skipped`` (case id -> reason)
and left out of :meth:`PseudoLabelStore.usable_mask`.

All of a case's scores share one chunk: every chunk is a file (or object) of its own, and per-file overhead, not
bytes, is what a batch write costs, so one score array per name would multiply it by the number of scores.

Chunks carry a CRC32C checksum after Blosc compression, so a flipped bit on disk fails loudly on read
(Blosc alone decodes many corruptions into silent garbage) and :meth:`PseudoLabelStore.verify` finds it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync
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

_CASE_ID = re.compile(r"[A-Za-z0-9._-]+")
_LABEL_ARRAYS = ("initial", "calibrated")
# Verify and export read this many cases at a time: bounded memory, few zarr calls.
_READ_BLOCK = 64
# Label maps of JPEG and DICOM sources are written as PNG: JPEG's lossy coding would corrupt class indices.
_EXPORT_EXTENSIONS = {"png": ".png", "jpeg": ".png", "dicom": ".png", "nifti": ".nii.gz"}

RestoreFn = Callable[[np.ndarray, dict], np.ndarray]
WriterFn = Callable[[np.ndarray, dict, Path], "Path | None"]


class StoreNotFoundError(StoreError, FileNotFoundError):
    """Nothing is stored at the URL (also a FileNotFoundError, so callers can create the store instead)."""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _jsonable(value: Any, what: str) -> Any:
    """Returns ``value`` as it will read back from the store's JSON attributes (tuples become lists)."""
    try:
        return json.loads(json.dumps(value, default=_json_default, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise StoreError(f"{what} must be JSON serialisable: {err}") from err


def _geometry_json(geometry: Mapping[str, Any], case_id: str) -> str:
    return json.dumps(_jsonable(dict(geometry), f"geometry of {case_id}"), sort_keys=True)


def _compressors() -> list:
    return [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()]


def _validate_case_ids(ids: Sequence[str], source: str) -> list[str]:
    ids = [str(i) for i in ids]
    seen: set[str] = set()
    for case_id in ids:
        if not _CASE_ID.fullmatch(case_id) or case_id.startswith("."):
            raise DataError(
                case_id, f"unsafe case id in {source}: use only letters, digits, '.', '_', '-' and do not start with '.'"
            )
        if case_id in seen:
            raise DataError(case_id, f"duplicate case id in {source}")
        seen.add(case_id)
    return ids


def _local_path(url: str) -> Path | None:
    """The filesystem path of a local store, or None for a remote (fsspec) URL."""
    if url.startswith("file://"):
        return Path(url[len("file://") :])
    if "://" in url:
        return None
    return Path(url)


def _make_store(url: str, read_only: bool, storage_options: dict | None) -> LocalStore | FsspecStore:
    path = _local_path(url)
    if path is not None:
        return LocalStore(path, read_only=read_only)
    return FsspecStore.from_url(url, storage_options=storage_options, read_only=read_only)


def _open_root(url: str, mode: str, storage_options: dict | None) -> zarr.Group | None:
    """Opens the root group, or returns None when nothing is stored at ``url``."""
    path = _local_path(url)
    if path is not None and not path.exists():
        return None
    try:
        return zarr.open_group(_make_store(url, mode == "r", storage_options), mode=mode, zarr_format=3)
    except FileNotFoundError:
        return None


def _runs_are_contiguous(sorted_idx: np.ndarray) -> bool:
    return sorted_idx.size > 0 and int(sorted_idx[-1]) - int(sorted_idx[0]) + 1 == sorted_idx.size


def _write_rows(arr: zarr.Array, sorted_idx: np.ndarray, block: np.ndarray) -> None:
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


def _read_rows(arr: zarr.Array, sorted_idx: np.ndarray) -> np.ndarray:
    if _runs_are_contiguous(sorted_idx):
        return arr[int(sorted_idx[0]) : int(sorted_idx[-1]) + 1]
    return arr.oindex[sorted_idx]


def _read_flags(arr: zarr.Array) -> np.ndarray:
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PseudoLabelStore:
    """Zarr v3 store of one self-training run: images, exemplars and the pseudo labels of every round.

    Make one with :meth:`create`, :meth:`open` or :meth:`open_or_create`, never the constructor. A store
    pickles as its URL, so it can be handed to Ray tasks and actors, which reopen it.
    """

    def __init__(self, url: str, root: zarr.Group, mode: str, storage_options: dict | None = None):
        self._url = url
        self._root = root
        self._mode = mode
        self._storage_options = storage_options
        attrs = root.attrs.asdict()
        self._working_size = (int(attrs["working_size"][0]), int(attrs["working_size"][1]))
        self._num_classes = int(attrs["num_classes"])
        self._config_hash = str(attrs["config_hash"])
        self._score_names = tuple(attrs["score_names"])
        self._case_ids = [str(s) for s in root["cases/ids"][:]]
        self._images = root["cases/images"]
        self._loaded = root["cases/loaded"]
        self._round_arrays: dict[int, dict[str, zarr.Array]] = {}
        self._lock: dict | None = None

    def __reduce__(self):
        return (_reopen, (self._url, self._mode, self._storage_options))

    def __repr__(self) -> str:
        return f"PseudoLabelStore({self._url!r}, cases={self.num_cases}, mode={self._mode!r})"

    # ------------------------------------------------------------------ creation and opening

    @classmethod
    def create(
        cls,
        url: str | os.PathLike,
        *,
        case_ids: Sequence[str],
        geometries: Sequence[Mapping[str, Any]] | None = None,
        working_size: tuple[int, int],
        num_classes: int,
        config_hash: str,
        provenance: dict | None = None,
        score_names: Sequence[str] = DEFAULT_SCORE_NAMES,
        storage_options: dict | None = None,
    ) -> PseudoLabelStore:
        """Creates a new, empty store; refuses to write where anything already exists.

        Args:
            url: a local path or an fsspec URL (``memory://run``, ``s3://bucket/run.zarr``).
            case_ids: the pool's case identifiers, in the order every per-case array uses.
            geometries: one Geometry dict per case (original shape, format, source) for write-back; None when
                they are only known once the images are read (then given to :meth:`write_cases`).
            working_size: (H, W) of the stored images and label maps.
            num_classes: number of label classes including background.
            config_hash: hash of the method configuration; :meth:`open` refuses a different one.
            provenance: free-form JSON record (model versions, data source ...).
            score_names: the per-case scores every round records.
            storage_options: passed to fsspec for remote URLs (credentials, endpoint).

        Returns:
            The store, opened for writing.

        Raises:
            StoreError: something already exists at ``url``.
            DataError: a case id is unsafe or duplicated, or the arguments disagree in length.
        """
        url = str(url)
        ids = _validate_case_ids(case_ids, "case_ids")
        if not ids:
            raise DataError("case_ids", "a store needs at least one case")
        if geometries is None:
            geometries = [{} for _ in ids]
        if len(geometries) != len(ids):
            raise DataError("geometries", f"got {len(geometries)} geometries for {len(ids)} cases")
        h, w = (int(s) for s in working_size)
        if h < 1 or w < 1:
            raise DataError("working_size", f"must be positive, got {list(working_size)}")
        if not 2 <= int(num_classes) <= 255:
            raise DataError("num_classes", f"must be in 2..255 to fit uint8 label maps, got {num_classes}")
        score_names = tuple(str(s) for s in score_names)
        for name in score_names:
            if not _CASE_ID.fullmatch(name) or name.startswith("."):
                raise DataError(name, "unsafe score name")
        geometry_json = [_geometry_json(g, cid) for g, cid in zip(geometries, ids)]

        path = _local_path(url)
        if path is not None and path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise StoreError(f"{url}: already exists; open it with PseudoLabelStore.open or choose a new location")
        try:
            root = zarr.open_group(_make_store(url, False, storage_options), mode="w-", zarr_format=3)
        except FileExistsError as err:
            raise StoreError(f"{url}: already exists; open it with PseudoLabelStore.open or choose a new location") from err

        n = len(ids)
        root.create_array("cases/ids", data=np.array(ids, dtype=np.dtypes.StringDType()), chunks=(n,))
        root.create_array("cases/geometry", data=np.array(geometry_json, dtype=np.dtypes.StringDType()), chunks=(1,))
        root.create_array(
            "cases/images", shape=(n, h, w), dtype="float16", chunks=(1, h, w), compressors=_compressors(), fill_value=0
        )
        root.create_array(
            "cases/truth", shape=(n, h, w), dtype="uint8", chunks=(1, h, w), compressors=_compressors(), fill_value=NO_TRUTH
        )
        root.create_array("cases/loaded", shape=(n,), dtype="bool", chunks=(1,), fill_value=False)
        root.create_group("rounds")
        now = _now()
        # Attributes last: a creation interrupted before this point leaves no schema_version, which open refuses.
        root.attrs.update(
            {
                "schema_version": SCHEMA_VERSION,
                "config_hash": str(config_hash),
                "created": now,
                "updated": now,
                "working_size": [h, w],
                "num_classes": int(num_classes),
                "score_names": list(score_names),
                "provenance": _jsonable(provenance or {}, "provenance"),
                "rounds": {},
                "skipped": {},
            }
        )
        log.info("created store %s with %d cases at %dx%d", url, n, h, w)
        return cls(url, root, "r+", storage_options)

    @classmethod
    def open(
        cls,
        url: str | os.PathLike,
        *,
        config_hash: str | None = None,
        mode: str = "r+",
        storage_options: dict | None = None,
    ) -> PseudoLabelStore:
        """Opens an existing store, refusing one of another schema version or configuration.

        Args:
            url: a local path or an fsspec URL.
            config_hash: when given, the store must have been created with this hash.
            mode: ``"r+"`` to write, ``"r"`` to read only.
            storage_options: passed to fsspec for remote URLs.

        Returns:
            The store.

        Raises:
            StoreNotFoundError: nothing is stored at ``url`` (a StoreError and a FileNotFoundError).
            StoreError: the store's schema version or config hash differ.
        """
        url = str(url)
        if mode not in ("r", "r+"):
            raise StoreError(f"{url}: mode must be 'r' or 'r+', got {mode!r}")
        root = _open_root(url, mode, storage_options)
        if root is None:
            raise StoreNotFoundError(f"{url}: no pseudo-label store there")
        attrs = root.attrs.asdict()
        found = attrs.get("schema_version")
        if found is None:
            raise StoreError(
                f"{url}: not a caudo-ray pseudo-label store, or its creation was interrupted (no schema_version); "
                "delete it or choose another location"
            )
        if found != SCHEMA_VERSION:
            raise StoreError(
                f"{url}: store has schema_version {found}, this caudo-ray reads schema_version {SCHEMA_VERSION}; "
                "use a new store location"
            )
        if config_hash is not None and attrs.get("config_hash") != config_hash:
            raise StoreError(
                f"{url}: store was written with config hash {attrs.get('config_hash')}, this run has config hash "
                f"{config_hash}; resuming would mix results of different methods, so use a new store location"
            )
        return cls(url, root, mode, storage_options)

    @classmethod
    def open_or_create(cls, url: str | os.PathLike, **create_kwargs: Any) -> PseudoLabelStore:
        """Opens the store at ``url`` if one is there (resume), else creates it.

        An existing store must match the configuration hash, case ids, working size and class count given,
        since resuming over a different pool would silently misalign every per-case array.

        Args:
            url: a local path or an fsspec URL.
            **create_kwargs: the keyword arguments of :meth:`create`.

        Returns:
            The store, opened for writing.

        Raises:
            StoreError: an existing store does not match.
        """
        url = str(url)
        storage_options = create_kwargs.get("storage_options")
        if _open_root(url, "r", storage_options) is None:
            return cls.create(url, **create_kwargs)
        store = cls.open(url, config_hash=create_kwargs.get("config_hash"), storage_options=storage_options)
        expected_ids = [str(i) for i in create_kwargs.get("case_ids", store.case_ids)]
        if expected_ids != store.case_ids:
            raise StoreError(f"{url}: the store's {store.num_cases} case ids differ from this run's {len(expected_ids)}")
        size = tuple(int(s) for s in create_kwargs.get("working_size", store.working_size))
        if size != store.working_size:
            raise StoreError(f"{url}: store working size {list(store.working_size)} differs from this run's {list(size)}")
        classes = int(create_kwargs.get("num_classes", store.num_classes))
        if classes != store.num_classes:
            raise StoreError(f"{url}: store has {store.num_classes} classes, this run {classes}")
        return store

    # ------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        """The location the store was opened from."""
        return self._url

    @property
    def case_ids(self) -> list[str]:
        """Case identifiers in the order of every per-case array."""
        return list(self._case_ids)

    @property
    def num_cases(self) -> int:
        """Number of cases N."""
        return len(self._case_ids)

    @property
    def working_size(self) -> tuple[int, int]:
        """(H, W) of the stored images and label maps."""
        return self._working_size

    @property
    def num_classes(self) -> int:
        """Number of label classes including background."""
        return self._num_classes

    @property
    def config_hash(self) -> str:
        """The configuration hash the store was created with."""
        return self._config_hash

    @property
    def score_names(self) -> tuple[str, ...]:
        """Names of the per-case scores every round records."""
        return self._score_names

    @property
    def attrs(self) -> dict:
        """A copy of the root attributes."""
        return self._root.attrs.asdict()

    def geometries(self, indices: Sequence[int] | np.ndarray | None = None) -> list[dict]:
        """The Geometry dicts of the given cases (all when ``indices`` is None)."""
        idx = self._indices(indices, "geometries")
        raw = self._read_ordered(self._root["cases/geometry"], idx)
        return [json.loads(str(g) or "{}") for g in raw]

    def update_provenance(self, entries: Mapping[str, Any]) -> None:
        """Merges ``entries`` into the root provenance record. Owner only."""
        self._check_writable()
        provenance = dict(self._root.attrs.get("provenance", {}))
        provenance.update(_jsonable(dict(entries), "provenance"))
        self._root.attrs.update({"provenance": provenance, "updated": _now()})

    # ------------------------------------------------------------------ images and exemplars

    def write_cases(
        self,
        indices: Sequence[int] | np.ndarray,
        *,
        images: np.ndarray,
        truth: np.ndarray | None = None,
        geometries: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Stores preprocessed images, and optionally hidden truth and geometries, then marks the cases loaded.

        Safe to call concurrently for disjoint cases (every array written is chunked per case).

        Args:
            indices: case indices (any order, no repeats).
            images: (n, H, W) float images at the working size.
            truth: (n, H, W) integer hidden labels, NO_TRUTH where a case has none; None leaves them unset.
            geometries: one Geometry dict per case, replacing those given at creation; None keeps them.

        Raises:
            DataError: wrong shape, non-finite image values or truth classes out of range (naming the case).
        """
        self._check_writable()
        idx = self._indices(indices, "write_cases")
        ids = [self._case_ids[i] for i in idx]
        images = np.asarray(images)
        self._check_block(images, idx, "images")
        finite = np.isfinite(images.reshape(len(idx), -1)).all(axis=1)
        if not finite.all():
            raise DataError(ids[int(np.argmin(finite))], "image has non-finite values")
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        if truth is not None:
            truth = np.asarray(truth)
            self._check_block(truth, idx, "truth")
            known = np.where(truth == NO_TRUTH, 0, truth)
            self._check_labels(known, ids, "truth label")
            _write_rows(self._root["cases/truth"], sidx, truth[order].astype(np.uint8))
        if geometries is not None:
            if len(geometries) != len(idx):
                raise DataError("geometries", f"got {len(geometries)} geometries for {len(idx)} cases")
            text = np.array([_geometry_json(geometries[k], ids[k]) for k in order], dtype=np.dtypes.StringDType())
            _write_rows(self._root["cases/geometry"], sidx, text)
        _write_rows(self._images, sidx, images[order].astype(np.float16))
        _write_rows(self._loaded, sidx, np.ones(len(sidx), dtype=bool))

    def write_images(self, indices: Sequence[int] | np.ndarray, images: np.ndarray) -> None:
        """Stores preprocessed images (float, (n, H, W)) for the given cases, then marks them loaded.

        Safe to call concurrently for disjoint cases.

        Raises:
            DataError: wrong shape or non-finite values (naming the case).
        """
        self.write_cases(indices, images=images)

    def read_images(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Returns the stored images of the given cases (all when None) as float32 (n, H, W), in the order asked."""
        idx = self._indices(indices, "read_images")
        return self._read_ordered(self._images, idx).astype(np.float32)

    def read_truth(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Hidden truth of the given cases (all when None), uint8 (n, H, W); NO_TRUTH where a case has none."""
        idx = self._indices(indices, "read_truth")
        return self._read_ordered(self._root["cases/truth"], idx)

    def images_missing(self) -> np.ndarray:
        """Indices of cases whose image was never written (skipped cases included)."""
        return np.flatnonzero(~_read_flags(self._loaded))

    @property
    def skipped(self) -> dict[str, str]:
        """Cases that could not be loaded: case id -> reason."""
        return dict(self._root.attrs.get("skipped", {}))

    def mark_skipped(self, index: int, reason: str) -> None:
        """Records that case ``index`` could not be loaded, so it is left out of every round. Owner only."""
        self._check_writable()
        idx = self._indices([index], "mark_skipped")
        skipped = self.skipped
        skipped[self._case_ids[int(idx[0])]] = str(reason)
        self._root.attrs.update({"skipped": skipped, "updated": _now()})

    def usable_mask(self) -> np.ndarray:
        """Cases with a stored image and not skipped (bool (N,)): the ones rounds select from."""
        skipped = self.skipped
        usable = _read_flags(self._loaded)
        usable &= np.array([cid not in skipped for cid in self._case_ids], dtype=bool)
        return usable

    def set_exemplars(self, ids: Sequence[str], images: np.ndarray, labels: np.ndarray) -> None:
        """Stores (replacing any earlier set) the labelled exemplars. Owner only.

        Args:
            ids: exemplar case ids.
            images: (K, H, W) float images at the working size.
            labels: (K, H, W) integer label maps with classes 0..C-1.
        """
        self._check_writable()
        ids = _validate_case_ids(ids, "exemplar ids")
        images = np.asarray(images)
        labels = np.asarray(labels)
        k = len(ids)
        if k == 0:
            raise DataError("exemplars", "need at least one exemplar")
        shape = (k, *self._working_size)
        if images.shape != shape or labels.shape != shape:
            raise DataError("exemplars", f"images {images.shape} and labels {labels.shape} must both be {shape}")
        if not np.isfinite(images).all():
            raise DataError("exemplars", "images have non-finite values")
        self._check_labels(labels, ids, "exemplar label")
        h, w = self._working_size
        self._root.create_array(
            "exemplar/ids", data=np.array(ids, dtype=np.dtypes.StringDType()), chunks=(k,), overwrite=True
        )
        self._root.create_array(
            "exemplar/images", data=images.astype(np.float16), chunks=(1, h, w), compressors=_compressors(), overwrite=True
        )
        self._root.create_array(
            "exemplar/labels", data=labels.astype(np.uint8), chunks=(1, h, w), compressors=_compressors(), overwrite=True
        )
        self._root.attrs.update({"updated": _now()})

    def exemplars(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Returns (ids, images float32 (K, H, W), labels uint8 (K, H, W)); K = 0 before any were stored."""
        if self._root.get("exemplar") is None:
            empty = np.zeros((0, *self._working_size))
            return [], empty.astype(np.float32), empty.astype(np.uint8)
        ids = [str(s) for s in self._root["exemplar/ids"][:]]
        images = self._root["exemplar/images"][:].astype(np.float32)
        labels = self._root["exemplar/labels"][:].astype(np.uint8)
        return ids, images, labels

    # ------------------------------------------------------------------ rounds

    def begin_round(self, r: int, params: Mapping[str, Any]) -> None:
        """Creates round ``r`` (idempotent) and records its parameters and start time. Owner only.

        Args:
            r: round number, >= 0.
            params: JSON parameters of the round (guidance strength w, calibration strength s, DDIM steps,
                model versions ...).

        Raises:
            StoreError: the round exists with different parameters.
        """
        self._check_writable()
        r = self._round_number(r)
        params = _jsonable(dict(params), f"round {r} params")
        rounds = self._root["rounds"]
        group = rounds.get(str(r))
        if group is None:
            group = rounds.create_group(str(r))
        recorded = group.attrs.get("params")
        if recorded is not None and recorded != params:
            raise StoreError(
                f"{self._url}: round {r} was begun with params {json.dumps(recorded, sort_keys=True)}, "
                f"now asked with {json.dumps(params, sort_keys=True)}; use a new store to change them"
            )
        n = self.num_cases
        h, w = self._working_size
        # Creating any array a crashed begin_round left missing keeps the call idempotent.
        specs: dict[str, dict[str, Any]] = {
            name: {"shape": (n, h, w), "dtype": "uint8", "chunks": (1, h, w), "compressors": _compressors(), "fill_value": 0}
            for name in _LABEL_ARRAYS
        }
        num_scores = len(self._score_names)
        specs["scores"] = {
            "shape": (n, num_scores),
            "dtype": "float32",
            "chunks": (1, num_scores),
            "fill_value": float("nan"),
            "attributes": {"score_names": list(self._score_names)},
            "dimension_names": ("case", "score"),
        }
        specs["selected"] = {"shape": (n,), "dtype": "bool", "chunks": (n,), "fill_value": False}
        specs["done"] = {"shape": (n,), "dtype": "bool", "chunks": (1,), "fill_value": False}
        for name, spec in specs.items():
            if group.get(name) is None:
                group.create_array(name, **spec)
        if recorded is None:
            started = _now()
            group.attrs.update({"params": params, "started": started, "committed": False})
            summary = dict(self._root.attrs.get("rounds", {}))
            summary[str(r)] = {"params": params, "started": started, "committed": False}
            self._root.attrs.update({"rounds": summary, "updated": started})
        self._round_arrays.pop(r, None)

    def write_results(
        self,
        r: int,
        indices: Sequence[int] | np.ndarray,
        initial: np.ndarray,
        calibrated: np.ndarray,
        scores: Mapping[str, np.ndarray],
    ) -> None:
        """Stores the label maps and scores of a batch of cases, then marks them done.

        Touches only per-case chunks, never attributes, so several processes may call it at once for
        disjoint cases. ``done`` is written after everything else: a crash never leaves a case done with
        data missing.

        Args:
            r: a begun, uncommitted round.
            indices: case indices of the batch (any order, no repeats).
            initial: (n, H, W) integer label maps of the segmenter.
            calibrated: (n, H, W) integer calibrated label maps.
            scores: (n,) float arrays keyed by score names of the store; a score left out, or NaN, means
                not available for these cases (e.g. Dice without hidden truth) and reads NaN.

        Raises:
            StoreError: the round was not begun or is already committed.
            DataError: shapes, classes or scores are wrong (naming the case where one is at fault).
        """
        self._check_writable()
        arrays = self._arrays(r)
        idx = self._indices(indices, f"round {r} results")
        # A committed round takes writes only for cases it lost (see invalidate): results never change once done.
        if self.is_committed(r) and self.done(r)[idx].any():
            raise StoreError(f"{self._url}: round {r} is committed; its results can no longer change")
        initial = np.asarray(initial)
        calibrated = np.asarray(calibrated)
        self._check_block(initial, idx, "initial")
        self._check_block(calibrated, idx, "calibrated")
        self._check_labels(initial, [self._case_ids[i] for i in idx], "initial label")
        self._check_labels(calibrated, [self._case_ids[i] for i in idx], "calibrated label")
        unknown = sorted(set(scores) - set(self._score_names))
        if unknown:
            raise DataError(
                f"round {r} scores", f"unknown score names {unknown}; the store records {list(self._score_names)}"
            )
        # Scores left out are written as NaN, so a recomputed case never keeps a stale score of an earlier attempt.
        score_block = np.full((len(idx), len(self._score_names)), np.nan, dtype=np.float32)
        for column, name in enumerate(self._score_names):
            if name not in scores:
                continue
            values = np.asarray(scores[name], dtype=np.float32)
            if values.shape != (len(idx),):
                raise DataError(f"round {r} score {name}", f"shape {values.shape}, expected ({len(idx)},)")
            score_block[:, column] = values
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        _write_rows(arrays["initial"], sidx, initial[order].astype(np.uint8))
        _write_rows(arrays["calibrated"], sidx, calibrated[order].astype(np.uint8))
        _write_rows(arrays["scores"], sidx, score_block[order])
        _write_rows(arrays["done"], sidx, np.ones(len(sidx), dtype=bool))

    def done(self, r: int) -> np.ndarray:
        """Per-case done flags of round ``r`` (bool (N,)); a flag that fails to decode reads as False."""
        return _read_flags(self._arrays(r)["done"])

    def missing(self, r: int) -> np.ndarray:
        """Indices of the usable cases (image loaded, not skipped) of round ``r`` not done yet."""
        return np.flatnonzero(~self.done(r) & self.usable_mask())

    def is_committed(self, r: int) -> bool:
        """Whether round ``r`` exists and was committed."""
        group = self._root["rounds"].get(str(self._round_number(r)))
        return bool(group is not None and group.attrs.get("committed", False))

    def rounds(self) -> list[int]:
        """Numbers of all begun rounds, ascending."""
        return sorted(int(k) for k in self._root["rounds"].group_keys())

    def committed_rounds(self) -> list[int]:
        """Numbers of the committed rounds, ascending."""
        return [r for r in self.rounds() if self.is_committed(r)]

    def round_attrs(self, r: int) -> dict:
        """A copy of round ``r``'s attributes (params, started, committed, committed_at, summary)."""
        group = self._root["rounds"].get(str(self._round_number(r)))
        if group is None:
            raise StoreError(f"{self._url}: round {r} was not begun")
        return group.attrs.asdict()

    def read_round(self, r: int, indices: Sequence[int] | np.ndarray | None = None) -> dict[str, Any]:
        """Reads round ``r``'s results for the given cases (all when None), in the order asked.

        Returns:
            ``{"initial": uint8 (n, H, W), "calibrated": uint8 (n, H, W), "scores": {name: float32 (n,)}}``.
            Label maps of cases not done read as zeros, their scores as NaN.
        """
        arrays = self._arrays(r)
        idx = self._indices(indices, f"round {r}")
        return {
            "initial": self._read_ordered(arrays["initial"], idx),
            "calibrated": self._read_ordered(arrays["calibrated"], idx),
            "scores": self._score_dict(self._read_ordered(arrays["scores"], idx)),
        }

    def read_scores(self, r: int) -> dict[str, np.ndarray]:
        """All cases' scores of round ``r``: ``{name: float32 (N,)}``."""
        return self._score_dict(self._read_ordered(self._arrays(r)["scores"], np.arange(self.num_cases)))

    def round_summary(self, r: int) -> dict:
        """The summary recorded when round ``r`` was committed.

        Raises:
            StoreError: the round is not committed.
        """
        if not self.is_committed(r):
            raise StoreError(f"{self._url}: round {r} is not committed, so it has no summary")
        return dict(self.round_attrs(r).get("summary", {}))

    def selected(self, r: int) -> np.ndarray:
        """The selection mask (bool (N,)) recorded when round ``r`` was committed; all False before."""
        return np.asarray(self._arrays(r)["selected"][:], dtype=bool)

    def commit_round(self, r: int, selected: np.ndarray, summary: Mapping[str, Any]) -> None:
        """Records the selection and summary of a complete round and marks it committed. Owner only.

        Raises:
            StoreError: cases are still missing, or the round is already committed.
            DataError: ``selected`` is not a bool (N,) mask.
        """
        self._check_writable()
        r = self._round_number(r)
        arrays = self._arrays(r)
        if self.is_committed(r):
            raise StoreError(f"{self._url}: round {r} is already committed")
        missing = self.missing(r)
        if missing.size:
            first = ", ".join(self._case_ids[i] for i in missing[:5])
            raise StoreError(
                f"{self._url}: round {r} cannot be committed: {missing.size} of {self.num_cases} cases are missing "
                f"(first: {first})"
            )
        selected = np.asarray(selected)
        if selected.shape != (self.num_cases,) or selected.dtype != bool:
            raise DataError(
                f"round {r} selected",
                f"must be a bool array of shape ({self.num_cases},), got {selected.dtype} {selected.shape}",
            )
        summary = _jsonable(dict(summary), f"round {r} summary")
        arrays["selected"][:] = selected
        committed_at = _now()
        group = self._root[f"rounds/{r}"]
        group.attrs.update({"committed": True, "committed_at": committed_at, "summary": summary})
        rounds = dict(self._root.attrs.get("rounds", {}))
        entry = dict(rounds.get(str(r), {}))
        entry.update({"committed": True, "committed_at": committed_at, "summary": summary})
        rounds[str(r)] = entry
        self._root.attrs.update({"rounds": rounds, "updated": committed_at})
        log.info("committed round %d of %s: %d selected", r, self._url, int(selected.sum()))

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
        idx = np.arange(self.num_cases) if indices is None else self._indices(indices, f"round {r} verify")
        idx = np.unique(idx[done[idx]])
        names = [*_LABEL_ARRAYS, "scores"]
        bad: list[int] = []
        for start in range(0, idx.size, _READ_BLOCK):
            block = idx[start : start + _READ_BLOCK]
            try:
                for name in names:
                    _read_rows(arrays[name], block)
                continue
            except Exception:  # noqa: BLE001 - any decode failure marks a case for recomputation
                pass
            for i in block:
                try:
                    for name in names:
                        arrays[name][int(i)]
                except Exception as err:  # noqa: BLE001
                    log.warning("round %d case %s unreadable: %s", r, self._case_ids[i], err)
                    bad.append(int(i))
        return bad

    def invalidate(self, r: int, indices: Sequence[int] | np.ndarray) -> None:
        """Marks the given cases of round ``r`` not done, so they are recomputed, and drops their result chunks.

        Dropping the chunks lets a corrupt chunk be rewritten: zarr reads a chunk back before a scattered write.
        A committed round keeps its selection and summary: recomputing a case with the round's saved models gives
        the same labels (labelling is deterministic), so they stay true.
        """
        self._check_writable()
        arrays = self._arrays(r)
        idx = np.unique(self._indices(indices, f"round {r} invalidate"))
        _write_rows(arrays["done"], idx, np.zeros(idx.size, dtype=bool))
        for name in (*_LABEL_ARRAYS, "scores"):
            arr = arrays[name]
            for i in idx:
                key = arr.metadata.encode_chunk_key((int(i),) + (0,) * (arr.ndim - 1))
                sync(arr.store_path.store.delete(f"{arr.store_path.path}/{key}"))

    # ------------------------------------------------------------------ export

    def export_round(
        self,
        r: int,
        out_dir: str | os.PathLike,
        *,
        which: str = "calibrated",
        fmt: str = "png",
        restore: RestoreFn | None = None,
        writer: WriterFn | None = None,
        selected_only: bool = False,
    ) -> list[Path]:
        """Writes each done case's label map of round ``r`` at its original geometry.

        Args:
            r: the round.
            out_dir: folder for the files, named ``<case_id><ext>``.
            which: ``"calibrated"`` or ``"initial"`` label maps.
            fmt: ``"png"``, ``"nifti"`` (``.nii.gz``) or ``"source"`` (the format the case came from).
            restore: ``(mask_working, geometry_dict) -> mask_original``; default: the data layer's
                ``restore_mask``.
            writer: ``(mask_original, geometry_dict, path)``; default: the data layer's ``write_mask``, which
                may change the extension (e.g. a JPEG source gets a PNG mask) and returns the path written.
            selected_only: export only the cases selected when the round was committed.

        Returns:
            The written paths, in case order.

        Raises:
            StoreError: unknown ``which``/``fmt``, or a path that would leave ``out_dir``.
        """
        if which not in _LABEL_ARRAYS:
            raise StoreError(f"which must be one of {list(_LABEL_ARRAYS)}, got {which!r}")
        if fmt not in ("png", "nifti", "source"):
            raise StoreError(f"fmt must be 'png', 'nifti' or 'source', got {fmt!r}")
        if restore is None or writer is None:
            from caudo_ray.data import Geometry, restore_mask, write_mask

            if restore is None:
                restore = lambda mask, geometry: restore_mask(mask, Geometry.from_dict(geometry))
            if writer is None:
                writer = lambda mask, geometry, path: write_mask(mask, Geometry.from_dict(geometry), path)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        root_dir = out.resolve()
        arrays = self._arrays(r)
        keep = self.done(r)
        if selected_only:
            keep &= self.selected(r)
        idx = np.flatnonzero(keep)
        written: list[Path] = []
        for start in range(0, idx.size, _READ_BLOCK):
            block = idx[start : start + _READ_BLOCK]
            masks = _read_rows(arrays[which], block)
            for i, mask, geometry in zip(block, masks, self.geometries(block)):
                case_id = self._case_ids[i]
                path = out / f"{case_id}{self._export_extension(fmt, geometry, case_id)}"
                if not path.resolve().is_relative_to(root_dir):
                    raise StoreError(f"{case_id}: export path {path} would leave {out}")
                actual = writer(restore(mask, geometry), geometry, path)
                written.append(Path(actual) if actual is not None else path)
        log.info("exported %d %s label maps of round %d to %s", len(written), which, r, out)
        return written

    @staticmethod
    def _export_extension(fmt: str, geometry: Mapping[str, Any], case_id: str) -> str:
        name = str(geometry.get("format", "")).lower() if fmt == "source" else fmt
        if name not in _EXPORT_EXTENSIONS:
            raise StoreError(f"{case_id}: cannot write label maps in source format {name!r}; use fmt='png' or 'nifti'")
        return _EXPORT_EXTENSIONS[name]

    # ------------------------------------------------------------------ owner lock

    def acquire_lock(self, owner: str) -> bool:
        """Takes the advisory single-writer lock ``<store>/.lock`` for ``owner``.

        A lock left by a dead process on this host is taken over. Re-acquiring a lock this process already
        holds for the same owner succeeds.

        Args:
            owner: who holds it (run name or id), shown to anyone refused.

        Returns:
            True when the lock is held; False for a remote store, where no lock file can be made atomically.

        Raises:
            StoreError: another owner holds the lock (naming it, its pid, host and start time).
        """
        path = _local_path(self._url)
        if path is None:
            log.warning("%s is not a local store; no single-writer lock is taken", self._url)
            return False
        lock_path = path / ".lock"
        me = {"owner": str(owner), "pid": os.getpid(), "hostname": socket.gethostname(), "time": _now()}
        for _ in range(3):
            try:
                fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder_text = self._read_text(lock_path)
                if holder_text is None:
                    continue  # released between our attempt and the read
                holder = self._parse_lock(holder_text, lock_path)
                same_host = holder.get("hostname") == me["hostname"]
                if same_host and holder.get("pid") == me["pid"] and holder.get("owner") == me["owner"]:
                    self._lock = holder
                    return True
                if same_host and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
                    log.warning("taking over stale lock of %s (pid %s is gone)", holder.get("owner"), holder["pid"])
                    self._remove_stale(lock_path, holder_text)
                    continue
                raise StoreError(
                    f"{self._url} is in use by {holder.get('owner')!r} (pid {holder.get('pid')} on "
                    f"{holder.get('hostname')}, since {holder.get('time')}); wait for that run to finish, or remove "
                    f"{lock_path} if it is certainly not running"
                )
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._lock = me
            return True
        raise StoreError(f"{self._url}: could not take the lock {lock_path} (contended); try again")

    def release_lock(self) -> None:
        """Releases the lock if this store object holds it; otherwise does nothing."""
        if self._lock is None:
            return
        path = _local_path(self._url)
        assert path is not None  # a lock is only ever held on a local store
        lock_path = path / ".lock"
        text = self._read_text(lock_path)
        if text is not None and json.loads(text) == self._lock:
            lock_path.unlink(missing_ok=True)
        self._lock = None

    @staticmethod
    def _read_text(path: Path) -> str | None:
        try:
            return path.read_text()
        except FileNotFoundError:
            return None

    @staticmethod
    def _parse_lock(text: str, lock_path: Path) -> dict:
        try:
            holder = json.loads(text)
            if isinstance(holder, dict):
                return holder
        except json.JSONDecodeError:
            pass
        raise StoreError(f"{lock_path} is unreadable ({text[:80]!r}); remove it if no run is using the store")

    @staticmethod
    def _remove_stale(lock_path: Path, stale_text: str) -> None:
        """Removes a stale lock without deleting a fresh one that another process may have just written.

        Renaming is atomic, so exactly one taker moves the file aside; if what it moved is not the stale lock
        it inspected, it puts it back.
        """
        aside = lock_path.with_name(f".lock.stale-{uuid.uuid4().hex}")
        try:
            os.rename(lock_path, aside)
        except FileNotFoundError:
            return
        if aside.read_text() != stale_text:
            try:
                os.link(aside, lock_path)
            except FileExistsError:
                pass
        aside.unlink()

    # ------------------------------------------------------------------ helpers

    def _check_writable(self) -> None:
        if self._mode == "r":
            raise StoreError(f"{self._url}: opened read-only")

    def _round_number(self, r: int) -> int:
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 0:
            raise StoreError(f"round must be an integer >= 0, got {r!r}")
        return int(r)

    def _arrays(self, r: int) -> dict[str, zarr.Array]:
        """The arrays of round ``r``, opened once (their metadata never changes after begin_round)."""
        r = self._round_number(r)
        if r not in self._round_arrays:
            group = self._root["rounds"].get(str(r))
            if group is None or group.attrs.get("params") is None:
                raise StoreError(f"{self._url}: round {r} was not begun")
            names = [*_LABEL_ARRAYS, "scores", "selected", "done"]
            self._round_arrays[r] = {name: group[name] for name in names}
        return self._round_arrays[r]

    def _indices(self, indices: Sequence[int] | np.ndarray | None, what: str) -> np.ndarray:
        if indices is None:
            return np.arange(self.num_cases)
        idx = np.asarray(indices)
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
            raise DataError(what, f"indices must be a 1-D integer array, got {idx.dtype} {idx.shape}")
        if idx.min() < 0 or idx.max() >= self.num_cases:
            raise DataError(what, f"indices must be in 0..{self.num_cases - 1}, got {idx.min()}..{idx.max()}")
        if np.unique(idx).size != idx.size:
            raise DataError(what, "indices repeat")
        return idx.astype(np.int64)

    def _check_block(self, block: np.ndarray, idx: np.ndarray, what: str) -> None:
        expected = (len(idx), *self._working_size)
        if block.shape != expected:
            raise DataError(what, f"shape {block.shape}, expected {expected}")

    def _check_labels(self, labels: np.ndarray, ids: Sequence[str], what: str) -> None:
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(what, f"label maps must be integer class indices, got {labels.dtype}")
        if labels.size == 0:
            return
        flat = labels.reshape(len(ids), -1)
        bad = (flat.min(axis=1) < 0) | (flat.max(axis=1) >= self._num_classes)
        if bad.any():
            k = int(np.argmax(bad))
            raise DataError(
                ids[k],
                f"{what} map has classes {int(flat[k].min())}..{int(flat[k].max())}, "
                f"expected 0..{self._num_classes - 1}",
            )

    def _score_dict(self, block: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.ascontiguousarray(block[:, k]) for k, name in enumerate(self._score_names)}

    def _unreadable(self, arr: zarr.Array, idx: np.ndarray, err: Exception) -> StoreError:
        """A StoreError naming the first case of ``idx`` whose chunk of ``arr`` cannot be read back."""
        for i in idx:
            try:
                arr[int(i)]
            except Exception as case_err:  # noqa: BLE001
                return StoreError(
                    f"{self._url}: case {self._case_ids[int(i)]} (index {int(i)}): chunk of {arr.path} is corrupt or "
                    f"unreadable ({case_err}); a resumed run recomputes the corrupt cases of an unfinished round"
                )
        return StoreError(f"{self._url}: reading {arr.path} failed: {err}")

    def _read_ordered(self, arr: zarr.Array, idx: np.ndarray) -> np.ndarray:
        """Reads rows ``idx`` of ``arr`` in the order given."""
        if idx.size == 0:
            return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
        order = np.argsort(idx, kind="stable")
        try:
            rows = _read_rows(arr, idx[order])
        except Exception as err:  # a chunk that fails its checksum or decoding
            raise self._unreadable(arr, idx[order], err) from err
        out = np.empty_like(rows)
        out[order] = rows
        return out


def _reopen(url: str, mode: str, storage_options: dict | None) -> PseudoLabelStore:
    """Unpickles a store by reopening it (its config hash was checked when first opened)."""
    return PseudoLabelStore.open(url, mode=mode, storage_options=storage_options)
