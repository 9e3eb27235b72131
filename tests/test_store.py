"""PseudoLabelStore on real Zarr v3 stores (on disk in tmp_path, and fsspec memory://): layout, rounds, integrity."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import assert_nearest_resize
from PIL import Image

from caudo_ray.errors import DataError, StoreError
from caudo_ray.store import NO_TRUTH, SCHEMA_VERSION, PseudoLabelStore, StoreNotFoundError, chunk_batches, export_round

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = (16, 16)
CLASSES = 3
CHUNK = 4  # cases per chunk of the test stores: a store of 8 cases has two chunks


def _ids(n: int) -> list[str]:
    return [f"case_{i:03d}" for i in range(n)]


def _create(url, n: int = 8, load_images: bool = True, **kwargs) -> PseudoLabelStore:
    geometries = [{"shape": [20 + i, 24], "format": "png", "source": f"images/case_{i:03d}.png"} for i in range(n)]
    kwargs.setdefault("chunk_size", CHUNK)
    store = PseudoLabelStore.create(
        url, case_ids=_ids(n), geometries=geometries, working_size=SIZE, num_classes=CLASSES, config_hash="hash-a", **kwargs
    )
    if load_images:
        # Rounds run over loaded cases, as in a run where the pool's images are stored before round 0.
        store.write_cases(np.arange(n), images=np.zeros((n, *SIZE), np.float32))
    return store


def _results(indices, seed: int = 0):
    """Deterministic per-case results, so any reader can recompute what a case must hold."""
    indices = np.asarray(indices)
    initial = np.stack([np.full(SIZE, i % CLASSES, np.uint8) for i in indices])
    calibrated = np.stack([np.random.default_rng(seed + int(i)).integers(0, CLASSES, SIZE).astype(np.uint8) for i in indices])
    scores = {
        "reliability": indices / 100.0,
        "agreement": indices / 200.0,
        "confidence": np.full(len(indices), 0.5),
        "entropy": indices.astype(float),
    }
    return initial, calibrated, scores


def _write(store: PseudoLabelStore, r: int, indices, seed: int = 0) -> None:
    initial, calibrated, scores = _results(indices, seed)
    store.rounds.write(r, indices, initial, calibrated, scores)


def _assert_intact(store: PseudoLabelStore, r: int, indices, seed: int = 0) -> None:
    initial, calibrated, scores = _results(indices, seed)
    got = store.rounds.read(r, indices)
    np.testing.assert_array_equal(got["initial"], initial)
    np.testing.assert_array_equal(got["calibrated"], calibrated)
    for name, values in scores.items():
        np.testing.assert_allclose(got["scores"][name], values, rtol=1e-6)


def test_create_open_round_trip(tmp_path):
    url = tmp_path / "store.zarr"
    store = _create(url, provenance={"segmenter": "v0"}, load_images=False)
    images = np.random.default_rng(0).random((3, *SIZE)).astype(np.float32)
    store.write_cases([4, 1, 6], images=images)
    ids = ["ex_a", "ex_b"]
    ex_images = np.random.default_rng(1).random((2, *SIZE))
    ex_labels = np.random.default_rng(2).integers(0, CLASSES, (2, *SIZE))
    store.set_exemplars(ids, ex_images, ex_labels)

    reopened = PseudoLabelStore.open(url, config_hash="hash-a")
    assert reopened.case_ids == _ids(8)
    assert reopened.num_cases == 8
    assert reopened.working_size == SIZE
    assert reopened.num_classes == CLASSES
    assert reopened.config_hash == "hash-a"
    assert reopened.attrs["schema_version"] == SCHEMA_VERSION
    assert reopened.attrs["provenance"] == {"segmenter": "v0"}
    assert reopened.geometries([2])[0]["shape"] == [22, 24]
    np.testing.assert_allclose(reopened.read_images([6, 4]), images[[2, 0]], atol=1e-3)
    assert reopened.read_images([6]).dtype == np.float32
    np.testing.assert_array_equal(reopened.images_missing(), [0, 2, 3, 5, 7])
    got_ids, got_images, got_labels = reopened.exemplars()
    assert got_ids == ids
    np.testing.assert_allclose(got_images, ex_images, atol=1e-3)
    np.testing.assert_array_equal(got_labels, ex_labels)

    with pytest.raises(StoreError, match="already exists"):
        _create(url)
    with pytest.raises(FileNotFoundError):
        PseudoLabelStore.open(tmp_path / "absent.zarr")
    with pytest.raises(StoreNotFoundError, match="no pseudo-label store"):
        PseudoLabelStore.open(tmp_path / "absent.zarr")
    assert PseudoLabelStore.open_or_create(
        url, case_ids=_ids(8), geometries=[{}] * 8, working_size=SIZE, num_classes=CLASSES, config_hash="hash-a"
    ).case_ids == _ids(8)


def test_pool_loading_truth_geometry_and_skipped_cases(tmp_path):
    store = PseudoLabelStore.create(
        tmp_path / "store.zarr", case_ids=_ids(5), working_size=SIZE, num_classes=CLASSES, config_hash="h"
    )
    ids, ex_images, ex_labels = store.exemplars()
    assert ids == [] and ex_images.shape == (0, *SIZE) and ex_labels.shape == (0, *SIZE)
    assert store.geometries([0]) == [{}]

    images = np.random.default_rng(0).random((3, *SIZE))
    truth = np.stack([np.full(SIZE, 2, np.uint8), np.full(SIZE, NO_TRUTH, np.uint8), np.ones(SIZE, np.uint8)])
    geometries = [{"shape": [30, 31], "format": "png", "source": f"s{i}.png"} for i in (4, 0, 2)]
    store.write_cases([4, 0, 2], images=images, truth=truth, geometries=geometries)
    store.mark_skipped(1, "unreadable PNG")

    reopened = PseudoLabelStore.open(tmp_path / "store.zarr", config_hash="h")
    np.testing.assert_array_equal(reopened.read_truth([0, 4, 3]), [truth[1], truth[0], np.full(SIZE, NO_TRUTH)])
    assert [g.get("source") for g in reopened.geometries()] == ["s0.png", None, "s2.png", None, "s4.png"]
    assert reopened.skipped == {"case_001": "unreadable PNG"}
    np.testing.assert_array_equal(reopened.images_missing(), [1, 3])
    np.testing.assert_array_equal(reopened.usable_mask(), [True, False, True, False, True])
    with pytest.raises(DataError, match="case_004: truth label map has classes 7..7"):
        reopened.write_cases([4], images=images[:1], truth=np.full((1, *SIZE), 7, np.uint8))


def test_schema_and_config_hash_mismatch_refused_and_store_intact(tmp_path):
    url = tmp_path / "store.zarr"
    store = _create(url)
    store.rounds.begin(0, {"w": 2.0})
    _write(store, 0, [0, 1])

    with pytest.raises(StoreError, match="hash-a.*hash-b"):
        PseudoLabelStore.open(url, config_hash="hash-b")
    with pytest.raises(StoreError, match="hash-a.*hash-b"):
        PseudoLabelStore.open_or_create(
            url, case_ids=_ids(8), geometries=[{}] * 8, working_size=SIZE, num_classes=CLASSES, config_hash="hash-b"
        )
    zarr.open_group(str(url), mode="r+").attrs.update({"schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(StoreError, match=f"schema_version {SCHEMA_VERSION + 1}.*schema_version {SCHEMA_VERSION}"):
        PseudoLabelStore.open(url)

    # A store of the per-case layout that came before is refused with what to do about it.
    zarr.open_group(str(url), mode="r+").attrs.update({"schema_version": 1})
    with pytest.raises(StoreError, match=r"schema_version 1 \(one chunk per case\).*new store location"):
        PseudoLabelStore.open(url)
    zarr.open_group(str(url), mode="r+").attrs.update({"schema_version": 2})
    with pytest.raises(StoreError, match=r"schema_version 2 \(no calibrator proposals beside the labels\).*new store location"):
        PseudoLabelStore.open(url)

    zarr.open_group(str(url), mode="r+").attrs.update({"schema_version": SCHEMA_VERSION})
    intact = PseudoLabelStore.open(url, config_hash="hash-a", mode="r")
    assert intact.attrs["config_hash"] == "hash-a"
    _assert_intact(intact, 0, [0, 1])
    with pytest.raises(StoreError, match="read-only"):
        _write(intact, 0, [2])


def test_proposed_labels_read_back_and_default_to_the_calibrated(tmp_path):
    store = _create(tmp_path / "store.zarr")
    store.rounds.begin(0, {})
    initial, calibrated, scores = _results([0, 1])
    proposed = (calibrated + 1) % CLASSES
    store.rounds.write(0, [0, 1], initial, calibrated, scores, proposed)
    _write(store, 0, [2])  # no proposal: nothing disputed
    got = store.rounds.read(0, [0, 1, 2])
    np.testing.assert_array_equal(got["proposed"][:2], proposed)
    np.testing.assert_array_equal(got["proposed"][2], got["calibrated"][2])
    with pytest.raises(DataError, match="proposed label"):
        store.rounds.write(0, [3], *_results([3])[:2], _results([3])[2], np.full((1, *SIZE), CLASSES, np.uint8))


def test_write_results_read_back_and_commit(tmp_path):
    store = _create(tmp_path / "store.zarr")
    store.rounds.begin(0, {"w": 2.0, "s": 0.5, "steps": (2,)})
    store.rounds.begin(0, {"w": 2.0, "s": 0.5, "steps": [2]})  # idempotent, tuples read back as lists
    with pytest.raises(StoreError, match="round 0 was begun with params"):
        store.rounds.begin(0, {"w": 3.0, "s": 0.5, "steps": [2]})

    _write(store, 0, [5, 2, 3])  # scattered, unsorted
    _write(store, 0, [0, 1])  # contiguous
    _assert_intact(store, 0, [0, 1, 2, 3, 5])
    with pytest.raises(StoreError, match="3 of 8 cases are missing"):
        store.rounds.commit(0, np.ones(8, bool), {})
    assert not store.rounds.is_committed(0)

    _write(store, 0, [7, 4, 6])
    store.rounds.commit(0, np.arange(8) % 2 == 0, {"pseudo_dice": np.float32(0.75)})
    assert store.rounds.is_committed(0)
    assert store.rounds.committed() == [0]
    assert store.rounds.numbers() == [0]
    np.testing.assert_array_equal(store.rounds.selected(0), np.arange(8) % 2 == 0)
    assert store.rounds.attrs(0)["summary"] == {"pseudo_dice": 0.75}
    assert store.attrs["rounds"]["0"]["committed"] is True
    np.testing.assert_allclose(store.rounds.scores(0)["entropy"], np.arange(8))
    with pytest.raises(StoreError, match="committed"):
        _write(store, 0, [1])
    # A committed round takes writes again only for the chunks it lost; its selection stands.
    np.testing.assert_array_equal(store.rounds.invalidate(0, [1]), [0, 1, 2, 3])
    np.testing.assert_array_equal(store.rounds.missing(0), [0, 1, 2, 3])
    _write(store, 0, [0, 1, 2, 3])
    _assert_intact(store, 0, list(range(8)))
    assert store.rounds.is_committed(0) and store.rounds.selected(0).sum() == 4

    store.rounds.begin(1, {"w": 2.0})
    initial, calibrated, scores = _results([0])
    with pytest.raises(DataError, match="case_000: calibrated label map has classes 5..7, expected 0..2"):
        store.rounds.write(1, [0], initial, calibrated + 5, scores)
    with pytest.raises(DataError, match=r"unknown score names \['typo'\]"):
        store.rounds.write(1, [0], initial, calibrated, {"typo": np.zeros(1)})
    assert store.rounds.missing(1).tolist() == list(range(8))
    store.rounds.write(1, [0], initial, calibrated, {"reliability": np.array([0.9]), "initial_dice": np.array([np.nan])})
    scores = store.rounds.read(1, [0, 1])["scores"]
    assert scores["reliability"][0] == np.float32(0.9)
    assert np.isnan(scores["initial_dice"]).all() and np.isnan(scores["agreement"]).all()
    assert store.rounds.summary(0) == {"pseudo_dice": 0.75}
    with pytest.raises(StoreError, match="round 1 is not committed"):
        store.rounds.summary(1)


def test_missing_after_reopen_of_half_written_round(tmp_path):
    url = tmp_path / "store.zarr"
    store = _create(url, n=10)
    store.rounds.begin(2, {"w": 1.0})
    _write(store, 2, [9, 0, 4, 5])
    del store

    reopened = PseudoLabelStore.open(url, config_hash="hash-a")
    assert reopened.rounds.numbers() == [2]
    np.testing.assert_array_equal(reopened.rounds.missing(2), [1, 2, 3, 6, 7, 8])
    np.testing.assert_array_equal(np.flatnonzero(reopened.rounds.done(2)), [0, 4, 5, 9])


def _ray_writer(url: str, batches: list[np.ndarray]) -> int:
    store = PseudoLabelStore.open(url, config_hash="hash-a")
    for batch in batches:
        _write(store, 0, batch)
    return sum(len(b) for b in batches)


def test_two_ray_tasks_write_alternate_chunks_of_one_round(tmp_path, ray_session):
    url = str(tmp_path / "store.zarr")
    store = _create(url, n=24)
    store.rounds.begin(0, {"w": 1.0})
    task = ray_session.remote(_ray_writer)
    batches = list(chunk_batches(np.arange(24), CHUNK))
    assert ray_session.get([task.remote(url, batches[0::2]), task.remote(url, batches[1::2])]) == [12, 12]

    reopened = PseudoLabelStore.open(url)
    assert reopened.rounds.missing(0).size == 0
    _assert_intact(reopened, 0, list(range(24)))
    assert reopened.rounds.verify(0) == []


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("array", ["labels", "scores", "done"])
def test_corrupted_chunk_detected_by_verify_and_invalidated_whole(tmp_path, array):
    url = tmp_path / "store.zarr"
    store = _create(url, n=12)
    store.rounds.begin(0, {"w": 1.0})
    for batch in chunk_batches(np.arange(10), CHUNK):  # chunk 2 (cases 8..11) half done
        _write(store, 0, batch)
    assert store.rounds.verify(0) == []

    # Chunk 1 holds cases 4..7: one flipped byte costs the whole batch, and only it.
    key = {"labels": "1/0/0/0", "scores": "1/0", "done": "1"}[array]
    _flip_a_byte(url / "rounds" / "0" / array / "c" / key)
    reopened = PseudoLabelStore.open(url)
    assert reopened.rounds.verify(0) == [4, 5, 6, 7]
    assert reopened.rounds.verify(0, [0, 1, 9]) == []
    if array != "done":
        with pytest.raises(StoreError, match=f"case case_004 .*{array} holding cases 4..7 is corrupt"):
            reopened.rounds.read(0, [5, 4])
    np.testing.assert_array_equal(reopened.rounds.invalidate(0, [5]), [4, 5, 6, 7])
    np.testing.assert_array_equal(reopened.rounds.missing(0), [4, 5, 6, 7, 10, 11])
    for batch in chunk_batches(reopened.rounds.missing(0), CHUNK):
        _write(reopened, 0, batch)
    assert reopened.rounds.verify(0) == [] and reopened.rounds.missing(0).size == 0
    _assert_intact(reopened, 0, list(range(12)))


def test_a_batch_writes_one_chunk_per_array_and_resumed_chunks_keep_their_done_cases(tmp_path):
    url = tmp_path / "store.zarr"
    store = _create(url, n=10)
    assert store.rounds.begin(0, {"w": 1.0}) == CHUNK

    def chunk_files(name: str) -> list[str]:
        folder = url / "rounds" / "0" / name / "c"
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    _write(store, 0, [4, 5, 6, 7])
    assert chunk_files("labels") == ["1/0/0/0"] and chunk_files("scores") == ["1/0"] and chunk_files("done") == ["1"]

    # A resumed chunk's batch holds only its cases not done; the chunk keeps the others.
    _write(store, 0, [0, 2])
    np.testing.assert_array_equal(store.rounds.missing(0), [1, 3, 8, 9])
    assert [b.tolist() for b in chunk_batches(store.rounds.missing(0), CHUNK)] == [[1, 3], [8, 9]]
    for batch in chunk_batches(store.rounds.missing(0), CHUNK):
        _write(store, 0, batch)
    assert len(chunk_files("labels")) == len(chunk_files("scores")) == len(chunk_files("done")) == 3
    _assert_intact(store, 0, list(range(10)))


def test_chunk_batches_never_cross_a_chunk():
    assert [b.tolist() for b in chunk_batches(np.array([9, 0, 1, 2, 5, 6]), 4)] == [[0, 1, 2], [5, 6], [9]]
    assert [b.tolist() for b in chunk_batches(np.arange(3, 9), 3)] == [[3, 4, 5], [6, 7, 8]]
    assert list(chunk_batches(np.zeros(0, np.int64), 4)) == []


def test_round_keeps_the_chunk_size_it_was_begun_with(tmp_path, caplog):
    store = _create(tmp_path / "store.zarr", n=10)
    assert store.chunk_size == CHUNK
    assert store.rounds.begin(0, {"w": 1.0}, chunk_size=2) == 2
    with caplog.at_level(logging.INFO, logger="caudo_ray"):
        assert store.rounds.begin(0, {"w": 1.0}, chunk_size=8) == 2  # resumed with another batch size
    assert "keeps the batch size it was begun with (2, not 8)" in caplog.text
    assert store.rounds.begin(1, {"w": 1.0}, chunk_size=8) == 8 and store.rounds.chunk_size(1) == 8
    assert store.rounds.begin(2, {"w": 1.0}) == CHUNK
    assert PseudoLabelStore.open(store.url).rounds.attrs(0)["chunk_size"] == 2
    # A batch size larger than the pool is one chunk.
    assert store.rounds.begin(3, {"w": 1.0}, chunk_size=64) == 64
    _write(store, 3, list(range(10)))
    _assert_intact(store, 3, list(range(10)))


def test_fsspec_memory_url(tmp_path):
    url = f"memory://caudo-{uuid.uuid4().hex}/store.zarr"
    store = _create(url)
    store.rounds.begin(0, {"w": 1.0})
    _write(store, 0, [1, 6])
    reopened = PseudoLabelStore.open(url, config_hash="hash-a")
    np.testing.assert_array_equal(reopened.rounds.missing(0), [0, 2, 3, 4, 5, 7])
    _assert_intact(reopened, 0, [1, 6])
    with pytest.raises(StoreError, match="already exists"):
        _create(url)


@pytest.mark.parametrize("bad", ["../escape", ".hidden", "a/b", "", "spa ce", "dup"])
def test_unsafe_or_duplicate_case_ids_refused(tmp_path, bad):
    ids = ["ok_1", bad, "dup"] if bad == "dup" else ["ok_1", bad]
    with pytest.raises(DataError) as err:
        PseudoLabelStore.create(
            tmp_path / "store.zarr", case_ids=ids, geometries=[{}] * len(ids), working_size=SIZE,
            num_classes=CLASSES, config_hash="h",
        )
    assert err.value.source == bad
    assert not (tmp_path / "store.zarr").exists()


def test_export_round_writes_original_shape(tmp_path):
    store = _create(tmp_path / "store.zarr", n=4)
    store.rounds.begin(0, {"w": 1.0})
    _write(store, 0, [0, 2, 3])

    written = export_round(store, 0, tmp_path / "out", which="initial")
    assert [p.name for p in written] == ["case_000.png", "case_002.png", "case_003.png"]
    for path, i in zip(written, [0, 2, 3]):
        mask = np.asarray(Image.open(path))
        assert mask.shape == (20 + i, 24)
        assert set(np.unique(mask)) == {i % CLASSES}
    # The default is the calibrated map: each file holds the stored one, restored to the case's own shape.
    _, calibrated, _ = _results([0, 2, 3])
    default = export_round(store, 0, tmp_path / "calibrated")
    for path, i, stored in zip(default, [0, 2, 3], calibrated):
        mask = np.asarray(Image.open(path))
        assert mask.shape == (20 + i, 24)
        assert_nearest_resize(mask, stored, path.name)
    _write(store, 0, [1])
    store.rounds.commit(0, np.array([False, False, True, False]), {})
    selected = export_round(store, 0, tmp_path / "sel", selected_only=True)
    assert [p.name for p in selected] == ["case_002.png"]
    with pytest.raises(StoreError, match="fmt"):
        export_round(store, 0, tmp_path / "out", fmt="jpeg")


def test_export_round_default_data_layer_writes_source_formats(tmp_path):
    from caudo_ray.data import Geometry

    geometries = [
        Geometry(shape=(20, 24), format="png", source="images/a.png").to_dict(),
        Geometry(shape=(18, 22), format="nifti", source="images/b.nii.gz", volume_shape=(18, 22),
                 affine=tuple(tuple(float(i == j) for j in range(4)) for i in range(4))).to_dict(),
    ]
    store = PseudoLabelStore.create(
        tmp_path / "store.zarr", case_ids=["a", "b"], geometries=geometries, working_size=SIZE,
        num_classes=CLASSES, config_hash="h",
    )
    store.rounds.begin(0, {"w": 1.0})
    _write(store, 0, [0, 1])
    written = export_round(store, 0, tmp_path / "out", fmt="source")
    assert [p.name for p in written] == ["a.png", "b.nii.gz"]
    assert np.asarray(Image.open(written[0])).shape == (20, 24)
    import nibabel as nib

    volume = np.asanyarray(nib.load(str(written[1])).dataobj)
    assert volume.shape == (18, 22)
    assert set(np.unique(volume)) <= set(range(CLASSES))
