"""Predefined splits (meta.csv split column, Decathlon datalist) and labelled sets given by group."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caudo_ray.data import (
    Split,
    check_exemplar_set,
    index_dataset,
    inspect_dataset,
    load_case,
    make_split,
    read_datalist,
    volumes_of,
)
from caudo_ray.errors import DataError

ACDC = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "acdc"

# p0..p3 train, p4 val, p5 test, spelt the ways a split column may spell them.
SETS = {"p0": "train", "p1": "training", "p2": "Train", "p3": "train", "p4": "validation", "p5": "test"}


def _dataset(root: Path, sets: dict[str, str] | None = SETS, slices: int = 4, empty: frozenset[str] = frozenset(), unlabelled: int = 2) -> Path:
    """Patients with ``slices`` slices each (one volume per patient); ``sets`` None: no split column.

    ``empty`` holds file stems whose mask is all background.
    """
    for sub in ("images", "masks", "unlabeled"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    fg = np.zeros((16, 16), np.uint8)
    fg[4:12, 4:12] = 1
    rows = ["filename,patient,volume,slice" + (",split" if sets is not None else "")]
    for patient in sets or SETS:
        for k in range(slices):
            stem = f"{patient}_s{k}"
            Image.fromarray(img).save(root / "images" / f"{stem}.png")
            Image.fromarray(np.zeros_like(fg) if stem in empty else fg).save(root / "masks" / f"{stem}.png")
            rows.append(f"{stem}.png,{patient},{patient}_ed,{k}" + (f",{sets[patient]}" if sets is not None else ""))
    for u in range(unlabelled):
        Image.fromarray(img).save(root / "unlabeled" / f"u{u}.png")
    (root / "meta.csv").write_text("\n".join(rows) + "\n")
    return root


def _cases_of(patient: str, slices: int = 4) -> list[str]:
    return [f"{patient}_s{k}" for k in range(slices)]


def _index(root: Path, **kwargs):
    return index_dataset(root, **{"group_column": "patient", "split_column": "split", **kwargs})


def _split(index, **kwargs) -> Split:
    return make_split(index, **{"seed": 0, "val_fraction": 0.2, "test_fraction": 0.2, **kwargs})


# ---- meta.csv split column ------------------------------------------------------------------------------------


def test_split_column_puts_cases_in_the_named_sets(tmp_path):
    index = _index(_dataset(tmp_path))
    assert index.split_source == str(tmp_path / "meta.csv")
    assert index.predefined_counts() == {"train": 16, "val": 4, "test": 4, "none": 0}
    for seed in range(6):
        # The fractions ask for other sizes: a predefined split ignores them.
        s = make_split(index, seed=seed, val_fraction=0.5, test_fraction=0.4)
        assert s.val == _cases_of("p4") and s.test == _cases_of("p5")
        assert s.split_source == str(tmp_path / "meta.csv") and s.labelled_groups == []
        [exemplar] = s.exemplars
        assert exemplar.split("_")[0] in {"p0", "p1", "p2", "p3"}
        assert sorted(s.pool + s.exemplars) == sorted(c for p in ("p0", "p1", "p2", "p3") for c in _cases_of(p)) + ["u0", "u1"]


def test_unknown_split_value_is_refused_naming_meta_csv_and_line(tmp_path):
    root = _dataset(tmp_path, sets={**SETS, "p3": "tst"})
    with pytest.raises(DataError) as err:
        _index(root)
    assert err.value.source == str(root / "meta.csv")
    # p3's first slice is on line 14: the header, then 3 patients of 4 rows.
    assert "line 14" in err.value.problem and "'tst'" in err.value.problem and "p3_s0.png" in err.value.problem


def test_without_split_column_the_split_is_drawn_by_seed(tmp_path):
    index = _index(_dataset(tmp_path, sets=None))
    assert index.predefined is None and index.split_source is None
    s = _split(index)
    assert s.split_source is None and s.test and s.val
    # The column can also be switched off where it exists.
    off = _index(_dataset(tmp_path / "b"), split_column=None)
    assert off.predefined is None
    assert _split(off) == s
    # ...and is off unless asked for: indexing a folder (for prediction, say) never meets a split.
    assert index_dataset(tmp_path / "b", group_column="patient").predefined is None


def test_row_naming_a_missing_file_is_refused(tmp_path):
    root = _dataset(tmp_path)
    with (root / "meta.csv").open("a") as fh:
        fh.write("ghost.png,p0,p0_ed,9,train\n")
    with pytest.raises(DataError) as err:
        _index(root)
    assert err.value.source == str(root / "meta.csv")
    assert "line 26: ghost.png" in err.value.problem and "'ghost'" in err.value.problem


@pytest.mark.parametrize("missing", ["train", "test"])
def test_predefined_split_without_train_or_test_is_refused(tmp_path, missing):
    sets = {p: ("val" if role.lower().startswith(missing) else role) for p, role in SETS.items()}
    index = _index(_dataset(tmp_path, sets=sets))
    with pytest.raises(DataError) as err:
        _split(index)
    assert err.value.source == str(tmp_path / "meta.csv") and f"leaves the {missing} set empty" in err.value.problem


def test_empty_validation_set_is_allowed(tmp_path):
    sets = {**SETS, "p4": "train"}
    s = _split(_index(_dataset(tmp_path, sets=sets)))
    assert s.val == [] and s.test == _cases_of("p5")


def test_unassigned_labelled_case_is_left_out_and_reported(tmp_path):
    index = _index(_dataset(tmp_path, sets={**SETS, "p3": ""}))
    assert index.predefined_counts()["none"] == 4
    assert any("not in the predefined split" in p for f, p in index.problems if f.endswith("p3_s0.png"))
    s = _split(index)
    assert not set(_cases_of("p3")) & set(s.pool + s.exemplars + s.val + s.test)


def test_group_in_two_sets_and_unlabelled_test_case_are_refused(tmp_path):
    root = _dataset(tmp_path)
    meta = root / "meta.csv"
    meta.write_text(meta.read_text().replace("p0_s3.png,p0,p0_ed,3,train", "p0_s3.png,p0,p0_ed,3,test"))
    with pytest.raises(DataError, match=r"group 'p0' has cases in more than one set"):
        _split(_index(root))
    (root / "masks" / "p5_s0.png").unlink()
    with pytest.raises(DataError, match=r"line 22: p5_s0.png: in the test set but has no mask"):
        _index(root)


# ---- Decathlon datalist ---------------------------------------------------------------------------------------


def _datalist(root: Path, *, test: list[str] | None = None, name: str = "dataset.json") -> Path:
    """A datalist in the MSD layout (imagesTr/, labelsTr/, imagesTs/): entries match cases by file stem."""
    data = {
        "name": "toy",
        "training": [{"image": f"./imagesTr/{c}.png", "label": f"./labelsTr/{c}.png"} for p in ("p1", "p2", "p3") for c in _cases_of(p)],
        "validation": [{"image": f"./imagesTr/{c}.png", "label": f"./labelsTr/{c}.png"} for c in _cases_of("p5")],
        "test": test if test is not None else [f"./imagesTs/{c}.png" for c in _cases_of("p0")],
    }
    (root / name).write_text(json.dumps(data))
    return root / name


def test_datalist_defines_the_split_over_the_column(tmp_path):
    root = _dataset(tmp_path)
    path = _datalist(root)
    sets = read_datalist(path)
    # MONAI's loader resolves the entries against the datalist's folder.
    assert sets["train"][0] == str(root / "imagesTr" / "p1_s0.png") and sets["test"][0] == str(root / "imagesTs" / "p0_s0.png")
    index = _index(root, datalist="dataset.json")
    assert index.split_source == str(path)
    s = _split(index)
    assert s.val == _cases_of("p5") and s.test == _cases_of("p0")  # the split column said p4 val, p5 test
    assert s.exemplars[0].split("_")[0] in {"p1", "p2", "p3"} and s.split_source == str(path)
    # p4 is in no list of the datalist: left out of every set, and said so.
    assert not set(_cases_of("p4")) & set(s.pool + s.exemplars + s.val + s.test)
    assert index.predefined_counts()["none"] == 4


def test_datalist_entry_naming_a_missing_file_is_refused(tmp_path):
    root = _dataset(tmp_path)
    path = _datalist(root, test=["./imagesTs/p0_s0.png", "./imagesTs/ghost.png"])
    with pytest.raises(DataError) as err:
        _index(root, datalist=path)
    assert err.value.source == str(path)
    assert err.value.problem.startswith("test[1]") and "ghost" in err.value.problem
    with pytest.raises(DataError, match="nope.json: datalist file does not exist"):
        _index(root, datalist="nope.json")
    (root / "bad.json").write_text(json.dumps({"training": [{"label": "x.png"}]}))
    with pytest.raises(DataError, match=r"bad.json: training\[0\]: needs one 'image' path"):
        read_datalist(root / "bad.json")


def test_datalist_without_test_list_is_refused(tmp_path):
    root = _dataset(tmp_path)
    path = _datalist(root, test=[])
    index = _index(root, datalist=path)
    with pytest.raises(DataError) as err:
        _split(index)
    assert err.value.source == str(path) and "leaves the test set empty" in err.value.problem


# ---- labelled sets by group -----------------------------------------------------------------------------------


def test_labelled_group_makes_every_slice_an_exemplar_empty_masks_included(tmp_path):
    root = _dataset(tmp_path, empty=frozenset({"p1_s0", "p1_s3"}))
    index = _index(root)
    s = _split(index, labelled_groups=["p1"])
    assert s.labelled_groups == ["p1"] and s.exemplars == _cases_of("p1")
    assert not set(s.exemplars) & set(s.pool) and "p0_s0" in s.pool
    by_id = index.by_id()
    cases = [load_case(by_id[c], (16, 16), num_classes=2) for c in s.exemplars]
    assert check_exemplar_set(cases) == cases  # two labelled negatives inside a set with foreground
    with pytest.raises(DataError, match="p1_s0: every mask of the labelled set .1 cases. is empty"):
        check_exemplar_set(cases[:1])  # a single exemplar still needs foreground


def test_labelled_set_without_any_foreground_is_refused(tmp_path):
    root = _dataset(tmp_path, empty=frozenset(_cases_of("p2")))
    index = _index(root)
    s = _split(index, labelled_groups=["p2"])
    by_id = index.by_id()
    cases = [load_case(by_id[c], (16, 16)) for c in s.exemplars]
    with pytest.raises(DataError) as err:
        check_exemplar_set(cases)
    assert err.value.source == "p2_s0, p2_s1, p2_s2, p2_s3" and "every mask of the labelled set (4 cases) is empty" in err.value.problem
    unlabelled = load_case(by_id["u0"], (16, 16))
    with pytest.raises(DataError, match="u0: exemplar has no mask"):
        check_exemplar_set(cases[:1] + [unlabelled])


def test_labelled_groups_stay_in_training_in_a_seeded_split(tmp_path):
    index = _index(_dataset(tmp_path, sets=None))
    for seed in range(6):
        s = _split(index, seed=seed, labelled_groups=["p4", "p0"])
        assert s.labelled_groups == ["p4", "p0"] and s.exemplars == _cases_of("p0") + _cases_of("p4")
        assert not {c.split("_")[0] for c in s.val + s.test} & {"p0", "p4"}


def test_labelled_group_outside_train_or_unknown_is_refused(tmp_path):
    index = _index(_dataset(tmp_path))
    with pytest.raises(DataError, match=r"split.labelled_groups: group 'p5' has no case in the train set .*sets: test"):
        _split(index, labelled_groups=["p5"])
    with pytest.raises(DataError, match=r"split.labelled_groups: no labelled case .* group 'p9'"):
        _split(index, labelled_groups=["p9"])
    with pytest.raises(DataError, match=r"split.exemplars: case 'p4_s0' is in the val set"):
        _split(index, exemplars=["p4_s0"])
    with pytest.raises(DataError, match=r"split.labelled_groups: contradicts split.exemplars"):
        _split(index, exemplars=["p0_s0"], labelled_groups=["p0"])


def test_num_labelled_groups_drawn_by_seed(tmp_path):
    index = _index(_dataset(tmp_path))
    a = _split(index, seed=3, num_labelled_groups=2)
    assert a == _split(index, seed=3, num_labelled_groups=2)
    assert len(a.labelled_groups) == 2 and set(a.labelled_groups) <= {"p0", "p1", "p2", "p3"}
    assert a.exemplars == sorted(c for g in a.labelled_groups for c in _cases_of(g))
    draws = {tuple(_split(index, seed=seed, num_labelled_groups=2).labelled_groups) for seed in range(8)}
    assert len(draws) > 1
    with pytest.raises(DataError, match=r"split.num_labelled_groups: 5 groups asked but the training set holds 4"):
        _split(index, num_labelled_groups=5)


def test_split_json_keeps_labelled_groups_and_reads_old_files(tmp_path):
    index = _index(_dataset(tmp_path))
    s = _split(index, labelled_groups=["p2"])
    assert Split.from_json(s.to_json(tmp_path / "split.json")) == s
    old = {k: v for k, v in json.loads((tmp_path / "split.json").read_text()).items() if k not in ("labelled_groups", "split_source")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = Split.from_json(tmp_path / "old.json")
    assert loaded.labelled_groups == [] and loaded.split_source is None and loaded.exemplars == s.exemplars


def test_inspect_reports_predefined_split_and_volumes(tmp_path):
    report = inspect_dataset(_dataset(tmp_path), group_column="patient", progress=False)
    assert report["predefined_split"] == {"source": str(tmp_path / "meta.csv"), "train": 16, "val": 4, "test": 4, "none": 0}
    assert report["volumes"] == 6
    # A broken split column is reported, not fatal, when inspecting.
    broken = inspect_dataset(_dataset(tmp_path / "b", sets={**SETS, "p0": "?"}), group_column="patient", progress=False)
    assert broken["predefined_split"] is None and any("unknown split value '?'" in p for _, p in broken["problems"])


# ---- ACDC (real data, when the shared copy is there) ----------------------------------------------------------


def test_acdc_benchmark_protocol():
    if not (ACDC / "meta.csv").is_file():
        pytest.skip(f"ACDC not found at {ACDC}")
    index = index_dataset(ACDC, group_column="patient", split_column="split")
    assert index.problems == [] and index.split_source == str(ACDC / "meta.csv")
    s = make_split(index, seed=0, val_fraction=0.1, test_fraction=0.2, labelled_groups=["patient099"])
    assert len(s.pool) + len(s.exemplars) == 1312 and len(s.val) == 210 and len(s.test) == 380
    by_id = index.by_id()
    assert len({by_id[c].group for c in s.pool + s.exemplars}) == 70
    assert s.labelled_groups == ["patient099"] and len(s.exemplars) == 32  # the field's "1 case"
    test = volumes_of(by_id[c] for c in s.test)
    assert len(test) == 40 and all(v.startswith(by_id[refs[0].case_id].group) for v, refs in test.items())
    assert all([r.slice_order for r in refs] == list(range(len(refs))) for refs in test.values())
