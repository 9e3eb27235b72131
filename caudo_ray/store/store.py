"""PseudoLabelStore: the resumable record of a self-training run, on Zarr v3 (layout in ``layout.py``).

The store holds the pool's images (and hidden truth, for benchmarks), the exemplars and, through
:attr:`PseudoLabelStore.rounds`, every round's pseudo labels. Workers write only the chunks of their own batch;
the owner (the coordinator) writes group attributes. Cases that could not be loaded are recorded by the owner in the root
attribute ``skipped`` (case id -> reason) and left out of :meth:`PseudoLabelStore.usable_mask`. Pool cases a person
answered (annotated) join the exemplars; their records (file, sha256, annotator, time, the round they joined) are the
root attribute ``annotations`` (case id -> record), answers they replaced are kept in ``annotations_replaced``, and
they too are left out of :meth:`PseudoLabelStore.usable_mask`: an answered case is never again pseudo-labelled.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zarr
from zarr.errors import ContainsArrayAndGroupError, ContainsArrayError, ContainsGroupError

from caudo_ray.errors import DataError, StoreError
from caudo_ray.store.layout import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_SCORE_NAMES,
    NO_TRUTH,
    SCHEMA_VERSION,
    check_chunk_size,
    check_indices,
    compressors,
    create_case_arrays,
    geometry_json,
    jsonable,
    local_path,
    make_store,
    now,
    open_root,
    read_flags,
    read_rows_of,
    validate_names,
    write_rows_in_steps,
)
from caudo_ray.store.lock import LOCK_NAME
from caudo_ray.store.rounds import RoundRecords

log = logging.getLogger(__name__)


class StoreNotFoundError(StoreError, FileNotFoundError):
    """Nothing is stored at the URL (also a FileNotFoundError, so callers can create the store instead)."""


# What earlier schemas lacked, for the message that refuses them.
OLD_SCHEMAS = {1: "one chunk per case", 2: "no calibrator proposals beside the labels"}


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
        self._chunk_size = int(attrs["chunk_size"])
        self._case_ids = [str(s) for s in root["cases/ids"][:]]
        self._images = root["cases/images"]
        self._loaded = root["cases/loaded"]
        self.rounds = RoundRecords(self)

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
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        storage_options: dict | None = None,
    ) -> PseudoLabelStore:
        """Creates a new, empty store; refuses to write where anything but its lock already exists.

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
            chunk_size: cases per chunk of the per-case arrays: the coordinator's batch size, so a batch reads one
                chunk of images; also the default chunk size of a round (:meth:`RoundRecords.begin`).
            storage_options: passed to fsspec for remote URLs (credentials, endpoint).

        Returns:
            The store, opened for writing.

        Raises:
            StoreError: something already exists at ``url``.
            DataError: a case id is unsafe or duplicated, or the arguments disagree in length.
        """
        url = str(url)
        ids = validate_names(case_ids, "case_ids")
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
        score_names = tuple(validate_names(score_names, "score_names", what="score name"))
        chunk_size = check_chunk_size(chunk_size, "chunk_size")
        geometry_text = [geometry_json(g, cid) for g, cid in zip(geometries, ids)]

        path = local_path(url)
        # The run's lock may be there already: it is taken before anything else is written.
        if path is not None and path.exists() and (not path.is_dir() or any(not p.name.startswith(LOCK_NAME) for p in path.iterdir())):
            raise StoreError(f"{url}: already exists; open it with PseudoLabelStore.open or choose a new location")
        try:
            # Not mode "w-": that refuses any key under the URL, and the run's lock is there already.
            root = zarr.create_group(make_store(url, False, storage_options), zarr_format=3, overwrite=False)
        except (FileExistsError, ContainsGroupError, ContainsArrayError, ContainsArrayAndGroupError) as err:
            raise StoreError(f"{url}: already exists; open it with PseudoLabelStore.open or choose a new location") from err

        create_case_arrays(root, ids, geometry_text, (h, w), chunk_size)
        created = now()
        # Attributes last: a creation interrupted before this point leaves no schema_version, which open refuses.
        root.attrs.update(
            {
                "schema_version": SCHEMA_VERSION,
                "config_hash": str(config_hash),
                "created": created,
                "updated": created,
                "working_size": [h, w],
                "num_classes": int(num_classes),
                "score_names": list(score_names),
                "chunk_size": chunk_size,
                "provenance": jsonable(provenance or {}, "provenance"),
                "rounds": {},
                "skipped": {},
            }
        )
        log.info("created store %s with %d cases at %dx%d", url, len(ids), h, w)
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
        root = open_root(url, mode, storage_options)
        if root is None:
            raise StoreNotFoundError(f"{url}: no pseudo-label store there")
        attrs = root.attrs.asdict()
        found = attrs.get("schema_version")
        if found is None:
            raise StoreError(
                f"{url}: not a caudo-ray pseudo-label store, or its creation was interrupted (no schema_version); "
                "delete it or choose another location"
            )
        if found in OLD_SCHEMAS:
            raise StoreError(
                f"{url}: written by an earlier caudo-ray in schema_version {found} ({OLD_SCHEMAS[found]}); this caudo-ray "
                f"reads schema_version {SCHEMA_VERSION} and does not convert it. Start the run on "
                "a new store location (a new work_dir or runtime.store_url); the old store stays readable by the "
                "caudo-ray that wrote it"
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
        if open_root(url, "r", storage_options) is None:
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
    def chunk_size(self) -> int:
        """Cases per chunk of the per-case arrays (the batch size the store was created with)."""
        return self._chunk_size

    @property
    def attrs(self) -> dict:
        """A copy of the root attributes."""
        return self._root.attrs.asdict()

    def geometries(self, indices: Sequence[int] | np.ndarray | None = None) -> list[dict]:
        """The Geometry dicts of the given cases (all when ``indices`` is None)."""
        idx = check_indices(indices, self.num_cases, "geometries")
        raw = self._read_ordered(self._root["cases/geometry"], idx)
        return [json.loads(str(g) or "{}") for g in raw]

    def update_provenance(self, entries: Mapping[str, Any]) -> None:
        """Merges ``entries`` into the root provenance record. Owner only."""
        self._check_writable()
        provenance = dict(self._root.attrs.get("provenance", {}))
        provenance.update(jsonable(dict(entries), "provenance"))
        self._root.attrs.update({"provenance": provenance, "updated": now()})

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

        Safe to call concurrently for cases of disjoint chunks (:data:`chunk_size` cases each).

        Args:
            indices: case indices (any order, no repeats).
            images: (n, H, W) float images at the working size.
            truth: (n, H, W) integer hidden labels, NO_TRUTH where a case has none; None leaves them unset.
            geometries: one Geometry dict per case, replacing those given at creation; None keeps them.

        Raises:
            DataError: wrong shape, non-finite image values or truth classes out of range (naming the case).
        """
        self._check_writable()
        idx = check_indices(indices, self.num_cases, "write_cases")
        ids = [self._case_ids[i] for i in idx]
        images = np.asarray(images)
        self._check_block(images, idx, "images")
        finite = np.isfinite(images.reshape(len(idx), -1)).all(axis=1)
        if not finite.all():
            raise DataError(ids[int(np.argmin(finite))], "image has non-finite values")
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        data = [(self._images, images[order].astype(np.float16))]
        if truth is not None:
            truth = np.asarray(truth)
            self._check_block(truth, idx, "truth")
            known = np.where(truth == NO_TRUTH, 0, truth)
            self._check_labels(known, ids, "truth label")
            data.append((self._root["cases/truth"], truth[order].astype(np.uint8)))
        if geometries is not None:
            if len(geometries) != len(idx):
                raise DataError("geometries", f"got {len(geometries)} geometries for {len(idx)} cases")
            text = np.array([geometry_json(geometries[k], ids[k]) for k in order], dtype=np.dtypes.StringDType())
            data.append((self._root["cases/geometry"], text))
        # ``loaded`` last: a case counts as loaded only once everything else of it is stored.
        write_rows_in_steps([data, [(self._loaded, np.ones(len(sidx), dtype=bool))]], sidx)

    def write_images(self, indices: Sequence[int] | np.ndarray, images: np.ndarray) -> None:
        """Stores preprocessed images (float, (n, H, W)) for the given cases, then marks them loaded.

        Safe to call concurrently for cases of disjoint chunks.

        Raises:
            DataError: wrong shape or non-finite values (naming the case).
        """
        self.write_cases(indices, images=images)

    def read_images(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Returns the stored images of the given cases (all when None) as float32 (n, H, W), in the order asked."""
        idx = check_indices(indices, self.num_cases, "read_images")
        return self._read_ordered(self._images, idx).astype(np.float32)

    def read_truth(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Hidden truth of the given cases (all when None), uint8 (n, H, W); NO_TRUTH where a case has none."""
        idx = check_indices(indices, self.num_cases, "read_truth")
        return self._read_ordered(self._root["cases/truth"], idx)

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (float32 (n, H, W)) and hidden truth (uint8 (n, H, W)) of a batch, read together, in the order asked."""
        idx = check_indices(indices, self.num_cases, "read_batch")
        images, truth = self._read_ordered_of([self._images, self._root["cases/truth"]], idx)
        return images.astype(np.float32), truth

    def images_missing(self) -> np.ndarray:
        """Indices of cases whose image was never written (skipped cases included)."""
        return np.flatnonzero(~read_flags(self._loaded))

    @property
    def skipped(self) -> dict[str, str]:
        """Cases that could not be loaded: case id -> reason."""
        return dict(self._root.attrs.get("skipped", {}))

    def mark_skipped(self, index: int, reason: str) -> None:
        """Records that case ``index`` could not be loaded, so it is left out of every round. Owner only."""
        self._check_writable()
        idx = check_indices([index], self.num_cases, "mark_skipped")
        skipped = self.skipped
        skipped[self._case_ids[int(idx[0])]] = str(reason)
        self._root.attrs.update({"skipped": skipped, "updated": now()})

    @property
    def annotations(self) -> dict[str, dict]:
        """The exemplars that are answered queries: case id -> record (file, sha256, annotator, time, round)."""
        return dict(self._root.attrs.get("annotations", {}))

    @property
    def replaced_annotations(self) -> list[dict]:
        """Records of answers a later answer for the same case replaced, oldest first."""
        return list(self._root.attrs.get("annotations_replaced", []))

    def usable_mask(self) -> np.ndarray:
        """Cases with a stored image, not skipped and not annotated (bool (N,)): the ones rounds label and select."""
        left_out = self.skipped.keys() | self.annotations.keys()
        usable = read_flags(self._loaded)
        usable &= np.array([cid not in left_out for cid in self._case_ids], dtype=bool)
        return usable

    def set_exemplars(
        self,
        ids: Sequence[str],
        images: np.ndarray,
        labels: np.ndarray,
        *,
        annotations: Mapping[str, Mapping[str, Any]] | None = None,
        replaced: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """Stores (replacing any earlier set) the labelled exemplars. Owner only.

        Args:
            ids: exemplar case ids.
            images: (K, H, W) float images at the working size.
            labels: (K, H, W) integer label maps with classes 0..C-1.
            annotations: the record of each exemplar that is an answered query (case id -> record); the others
                are the split's exemplars. Replaces the stored records; None keeps them.
            replaced: records of earlier answers these replace, appended to :attr:`replaced_annotations`.

        Raises:
            DataError: shapes, values or ids are wrong, or an annotation names a case that is not an exemplar.
        """
        self._check_writable()
        ids = validate_names(ids, "exemplar ids")
        if annotations is not None and not annotations.keys() <= set(ids):
            raise DataError("annotations", f"records of cases that are not exemplars: {sorted(annotations.keys() - set(ids))}")
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
            "exemplar/images", data=images.astype(np.float16), chunks=(1, h, w), compressors=compressors(), overwrite=True
        )
        self._root.create_array(
            "exemplar/labels", data=labels.astype(np.uint8), chunks=(1, h, w), compressors=compressors(), overwrite=True
        )
        attrs: dict[str, Any] = {"updated": now()}
        if annotations is not None:
            attrs["annotations"] = jsonable({k: dict(v) for k, v in annotations.items()}, "annotations")
        if replaced:
            attrs["annotations_replaced"] = self.replaced_annotations + jsonable([dict(r) for r in replaced], "replaced annotations")
        # Attributes after the arrays: an interrupted write leaves the records of the set before, which the next
        # intake finds different from the files and writes again.
        self._root.attrs.update(attrs)

    def exemplars(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Returns (ids, images float32 (K, H, W), labels uint8 (K, H, W)); K = 0 before any were stored."""
        if self._root.get("exemplar") is None:
            empty = np.zeros((0, *self._working_size))
            return [], empty.astype(np.float32), empty.astype(np.uint8)
        ids = [str(s) for s in self._root["exemplar/ids"][:]]
        images = self._root["exemplar/images"][:].astype(np.float32)
        labels = self._root["exemplar/labels"][:].astype(np.uint8)
        return ids, images, labels

    # ------------------------------------------------------------------ helpers

    def _check_writable(self) -> None:
        if self._mode == "r":
            raise StoreError(f"{self._url}: opened read-only")

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

    def _unreadable(self, arrays: Sequence[zarr.Array], idx: np.ndarray, err: Exception) -> StoreError:
        """A StoreError naming the first case of ``idx`` whose chunk of one of ``arrays`` cannot be read back."""
        for arr in arrays:
            for i in idx:
                try:
                    arr[int(i)]
                except Exception as case_err:  # noqa: BLE001
                    size = arr.chunks[0]
                    start = int(i) // size * size
                    return StoreError(
                        f"{self._url}: case {self._case_ids[int(i)]} (index {int(i)}): the chunk of {arr.path} holding "
                        f"cases {start}..{min(start + size, arr.shape[0]) - 1} is corrupt or unreadable ({case_err}); a "
                        "resumed run recomputes the cases of a round's corrupt chunks"
                    )
        return StoreError(f"{self._url}: reading {', '.join(a.path for a in arrays)} failed: {err}")

    def _read_ordered(self, arr: zarr.Array, idx: np.ndarray) -> np.ndarray:
        """Reads rows ``idx`` of ``arr`` in the order given."""
        return self._read_ordered_of([arr], idx)[0]

    def _read_ordered_of(self, arrays: Sequence[zarr.Array], idx: np.ndarray) -> list[np.ndarray]:
        """Reads rows ``idx`` of each of ``arrays`` (together, where they are contiguous) in the order given."""
        if idx.size == 0:
            return [np.zeros((0, *arr.shape[1:]), dtype=arr.dtype) for arr in arrays]
        order = np.argsort(idx, kind="stable")
        try:
            blocks = read_rows_of(arrays, idx[order])
        except Exception as err:  # a chunk that fails its checksum or decoding
            raise self._unreadable(arrays, idx[order], err) from err
        out = []
        for rows in blocks:
            ordered = np.empty_like(rows)
            ordered[order] = rows
            out.append(ordered)
        return out


def _reopen(url: str, mode: str, storage_options: dict | None) -> PseudoLabelStore:
    """Unpickles a store by reopening it (its config hash was checked when first opened)."""
    return PseudoLabelStore.open(url, mode=mode, storage_options=storage_options)
