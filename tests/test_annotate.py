"""The annotate loop from the command line: ``queries --export`` writes each query's image and pre-annotation in the
dataset's own format and geometry, ``annotate`` checks every answer before copying any, and a run takes them in."""

from __future__ import annotations

import csv
import json
import shutil
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from caudo_ray import data as D
from caudo_ray.cli import main
from caudo_ray.errors import DataError
from caudo_ray.run import annotations as A
from caudo_ray.run.coordinator import Coordinator
from caudo_ray.run.prepare import answer_rules, prepare_run
from caudo_ray.store import PseudoLabelStore
from caudo_ray.workspace import Workspace

# A NIfTI volume's placement: anisotropic voxels, a rotation about z and an origin away from zero.
AFFINE = np.array([[0.0, -0.8, 0.0, 12.5], [0.7, 0.0, 0.0, -30.0], [0.0, 0.0, 2.5, 4.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def png_run(tmp_path_factory):
    """A finished one-round run on the PNG phantoms."""
    cfg = tiny_config(tmp_path_factory.mktemp("png") / "run", rounds=1)
    Coordinator(cfg, progress=False).run()
    return cfg


def taken_in(cfg) -> PseudoLabelStore:
    """What a run started now on the work dir finds: the answers taken in (prepare_run, its lock given back)."""
    prepared = prepare_run(cfg, progress=False)
    prepared.lock.release()
    return prepared.store


def read_manifest(out: Path) -> list[dict]:
    with (out / "manifest.csv").open() as f:
        return list(csv.DictReader(f))


def test_exported_queries_go_back_through_annotate_into_the_exemplars(png_run, tmp_path, capsys):
    cfg = png_run
    ws = Workspace.of(cfg)
    out = tmp_path / "review"
    assert main(["queries", "--work-dir", cfg.work_dir, "--export", str(out), "-k", "3"]) == 0
    printed = capsys.readouterr().out
    store = PseudoLabelStore.open(ws.store_url, mode="r")
    rows = read_manifest(out)
    assert [r["rank"] for r in rows] == ["1", "2", "3"] and {r["round"] for r in rows} == {"0"}
    reliability = store.rounds.scores(0)["reliability"]
    for row in rows:
        i = store.case_ids.index(row["case_id"])
        assert abs(float(row["reliability"]) - reliability[i]) < 1e-6 and row["slice"] == ""
        # The image as the dataset holds it, byte for byte; the pre-annotation is the calibrated label at its size.
        assert (out / row["image"]).read_bytes() == Path(row["source"]).read_bytes()
        assert row["pre_annotation"] == f"masks/{row['case_id']}.png"
        geometry = D.Geometry.from_dict(store.geometries([i])[0])
        expected = D.restore_mask(store.rounds.read(0, [i])["calibrated"][0], geometry)
        np.testing.assert_array_equal(np.array(Image.open(out / row["pre_annotation"])), expected)
        assert row["case_id"] in printed
    assert f"annotate --work-dir {cfg.work_dir} {out / 'masks'}" in printed

    # The annotator accepts the proposals as they are (a box where one came back empty: nothing to accept there).
    answers = {}
    for row in rows:
        path = out / row["pre_annotation"]
        mask = np.array(Image.open(path))
        if not mask.any():
            mask[10:30, 12:34] = 1
            Image.fromarray(mask).save(path)
        answers[row["case_id"]] = mask
    assert main(["annotate", "--work-dir", cfg.work_dir, str(out / "masks"), "--annotator", "dr.who"]) == 0
    printed = capsys.readouterr().out
    assert all(f"{case_id}: {case_id}.png by dr.who" in printed for case_id in answers)
    logged = [json.loads(line) for line in ws.annotation_log_path.read_text().splitlines()]
    assert sorted(r["case_id"] for r in logged) == sorted(answers) and {r["annotator"] for r in logged} == {"dr.who"}

    store = taken_in(cfg)
    ids, _, labels = store.exemplars()
    for case_id, mask in answers.items():
        np.testing.assert_array_equal(labels[ids.index(case_id)], D.resize_mask(mask, cfg.data.working_size))
        record = store.annotations[case_id]
        assert record["annotator"] == "dr.who" and record["file"] == f"{case_id}.png" and record["round"] == cfg.rounds + 1
        assert record["sha256"] == next(r["sha256"] for r in logged if r["case_id"] == case_id)
        assert not store.usable_mask()[store.case_ids.index(case_id)]
    # Answered cases are no longer queries.
    assert main(["queries", "--work-dir", cfg.work_dir, "--json", "-k", "50"]) == 0
    assert not {q["case_id"] for q in json.loads(capsys.readouterr().out)} & answers.keys()

    # A second answer for a case is refused, then taken with --replace; the first answer's record and file stay.
    first = next(iter(answers))
    again = tmp_path / "again"
    again.mkdir()
    shutil.copyfile(out / "masks" / f"{first}.png", again / f"{first}.png")
    mask = answers[first].copy()
    mask[:6, :6] = 1
    Image.fromarray(mask).save(again / f"{first}.png")
    assert main(["annotate", "--work-dir", cfg.work_dir, str(again)]) == 1
    err = capsys.readouterr().err
    assert str(again / f"{first}.png") in err and "answered already" in err and "--replace" in err
    assert main(["annotate", "--work-dir", cfg.work_dir, str(again), "--replace"]) == 0
    [kept] = list(ws.replaced_annotations_dir.iterdir())
    assert kept.name.startswith(f"{first}.") and np.array_equal(np.array(Image.open(kept)), answers[first])
    store = taken_in(cfg)
    ids, _, labels = store.exemplars()
    np.testing.assert_array_equal(labels[ids.index(first)], D.resize_mask(mask, cfg.data.working_size))
    [old] = store.replaced_annotations
    assert old["case_id"] == first and old["annotator"] == "dr.who"


def test_every_refused_answer_names_its_file_and_nothing_is_copied(png_run, tmp_path, capsys):
    cfg = png_run
    ws = Workspace.of(cfg)
    store = PseudoLabelStore.open(ws.store_url, mode="r")
    usable = [c for c, ok in zip(store.case_ids, store.usable_mask()) if ok]
    before = sorted(p.name for p in ws.annotations_dir.iterdir())
    case = usable[0]
    shape = np.array(Image.open(Path(store.geometries([store.case_ids.index(case)])[0]["source"]))).shape
    good = np.zeros(shape, np.uint8)
    good[10:30, 12:34] = 1
    split = D.Split.from_json(ws.split_path)
    bad = {
        "nobody.png": (good, "not in the dataset"),
        f"{case}.png": (np.pad(good, 3), "does not match image shape"),
        f"{usable[1]}.png": (good * 5, "out of range for 2 classes"),
        f"{usable[2]}.png": (np.zeros(shape, np.uint8), "mask is empty"),
        f"{split.val[0]}.png": (good, "validation or test split"),
        f"{split.exemplars[0]}.png": (good, "exemplars"),
    }
    for name, (mask, problem) in bad.items():
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        # One good answer beside the bad one: it must not be copied either.
        Image.fromarray(good).save(folder / f"{usable[3]}.png")
        Image.fromarray(mask).save(folder / name)
        assert main(["annotate", "--work-dir", cfg.work_dir, str(folder)]) == 1, name
        err = capsys.readouterr().err
        assert str(folder / name) in err and problem in err, (name, err)
        assert sorted(p.name for p in ws.annotations_dir.iterdir()) == before


def test_a_bad_file_dropped_by_hand_is_refused_by_name_and_the_run_goes_on(tmp_path, caplog):
    cfg = tiny_config(tmp_path / "run", rounds=1)
    ws = Workspace.of(cfg)
    prepared = prepare_run(cfg, progress=False)
    prepared.lock.release()
    case = next(c for c in prepared.split.pool if c.startswith("u"))
    image = Image.open(prepared.index.by_id()[case].image_path)
    Image.fromarray(np.full((image.height, image.width), 7, np.uint8)).save(ws.annotations_dir / f"{case}.png")
    result = Coordinator(cfg, progress=False).run()
    bad = str(ws.annotations_dir / f"{case}.png")
    assert "out of range" in result.skipped[bad] and bad in caplog.text
    store = PseudoLabelStore.open(ws.store_url, mode="r")
    assert store.annotations == {} and store.rounds.done(0)[store.case_ids.index(case)]
    assert (ws.annotations_dir / f"{case}.png").exists()  # nothing written is lost


def write_volume_dataset(root: Path) -> Path:
    """NIfTI volumes of four phantom slices each, placed by :data:`AFFINE`: 6 labelled, 4 unlabelled."""
    for sub in ("images", "masks", "unlabeled"):
        (root / sub).mkdir(parents=True)
    for v in range(10):
        frames = [D.phantom_case(100 * v + k, (40, 44)) for k in range(4)]
        image = np.stack([f[0] for f in frames], axis=2).astype(np.float32)
        labelled = v < 6
        folder = "images" if labelled else "unlabeled"
        nib.save(nib.Nifti1Image(image, AFFINE), root / folder / f"vol{v}.nii.gz")
        if labelled:
            nib.save(nib.Nifti1Image(np.stack([f[1] for f in frames], axis=2).astype(np.uint8), AFFINE), root / "masks" / f"vol{v}.nii.gz")
    return root


def test_a_slice_query_exports_its_whole_volume_with_the_affine_and_comes_back(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "run", rounds=1, **{"data.path": str(write_volume_dataset(tmp_path / "ds"))})
    Coordinator(cfg, progress=False).run()
    out = tmp_path / "review"
    assert main(["queries", "--work-dir", cfg.work_dir, "--export", str(out), "-k", "2"]) == 0
    store = PseudoLabelStore.open(Workspace.of(cfg).store_url, mode="r")
    rows = read_manifest(out)
    for row in rows:
        i = store.case_ids.index(row["case_id"])
        geometry = D.Geometry.from_dict(store.geometries([i])[0])
        assert row["slice"] == str(geometry.slice_index) and row["case_id"].endswith(f"__s{geometry.slice_index:04d}")
        assert row["image"] == f"images/{Path(geometry.source).name}" and row["pre_annotation"] == f"masks/{row['case_id']}.nii.gz"
        volume = nib.load(out / row["pre_annotation"])
        np.testing.assert_allclose(volume.affine, AFFINE)
        assert volume.shape == (40, 44, 4)
        labels = np.asarray(volume.dataobj)
        expected = D.restore_mask(store.rounds.read(0, [i])["calibrated"][0], geometry)
        np.testing.assert_array_equal(labels[:, :, geometry.slice_index], expected)
        np.testing.assert_allclose(nib.load(out / row["image"]).affine, AFFINE)
        if not labels[:, :, geometry.slice_index].any():  # nothing to accept: the annotator draws the slice
            labels[8:30, 10:36, geometry.slice_index] = 1
            nib.save(nib.Nifti1Image(labels, volume.affine), out / row["pre_annotation"])

    # A volume placed elsewhere is refused by name before anything is copied.
    moved = tmp_path / "moved"
    moved.mkdir()
    first = out / rows[0]["pre_annotation"]
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(nib.load(first).dataobj), shifted), moved / first.name)
    assert main(["annotate", "--work-dir", cfg.work_dir, str(moved)]) == 1
    assert str(moved / first.name) in capsys.readouterr().err

    assert main(["annotate", "--work-dir", cfg.work_dir, str(out / "masks")]) == 0
    store = taken_in(cfg)
    ids, _, exemplar_labels = store.exemplars()
    for row in rows:
        geometry = D.Geometry.from_dict(store.geometries([store.case_ids.index(row["case_id"])])[0])
        answered = np.asarray(nib.load(out / row["pre_annotation"]).dataobj)[:, :, geometry.slice_index]
        np.testing.assert_array_equal(exemplar_labels[ids.index(row["case_id"])], D.resize_mask(answered, cfg.data.working_size))


def test_two_annotates_at_once_take_turns_and_neither_overwrites_the_other(png_run, tmp_path):
    """The later of two ``annotate`` calls checks against the earlier one's answers: while one holds the work dir's
    annotate lock, a second waits, and then refuses a case the first answered in the meantime."""
    cfg = png_run
    ws = Workspace.of(cfg)
    store = PseudoLabelStore.open(ws.store_url, mode="r")
    answered = {D.file_stem(p) for p in A.answer_files(ws.annotations_dir)}
    case = next(c for c, ok in zip(store.case_ids, store.usable_mask()) if ok and c not in answered)
    shape = np.array(Image.open(Path(store.geometries([store.case_ids.index(case)])[0]["source"]))).shape
    first, second = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    first[10:30, 12:34] = 1
    second[5:40, 8:20] = 1
    folder = tmp_path / "second"
    folder.mkdir()
    Image.fromarray(second).save(folder / f"{case}.png")
    rules = answer_rules(cfg)
    outcome: dict[str, object] = {}

    def second_annotator():
        try:
            outcome["records"] = A.annotate(cfg, rules, folder, annotator="second")
        except Exception as err:  # noqa: BLE001 - whatever it is, it is checked below
            outcome["error"] = err

    with A._one_annotate_at_a_time(ws):  # the first annotate, mid-copy
        waiting = threading.Thread(target=second_annotator)
        waiting.start()
        waiting.join(timeout=2.0)
        assert waiting.is_alive(), f"the second annotate did not wait for the first: {outcome}"
        Image.fromarray(first).save(ws.annotations_dir / f"{case}.png")
    waiting.join(timeout=60)
    assert not waiting.is_alive()

    assert isinstance(outcome.get("error"), DataError), outcome
    assert f"case {case!r} was answered already" in str(outcome["error"])
    np.testing.assert_array_equal(np.array(Image.open(ws.annotations_dir / f"{case}.png")), first)
