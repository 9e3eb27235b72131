"""Group-wise, seeded splits and exemplar choice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caudo_ray.data import Split, index_dataset, make_split
from caudo_ray.errors import DataError


def _dataset(root: Path, groups: int = 10, per_group: int = 3, unlabelled: int = 4) -> Path:
    for sub in ("images", "masks", "unlabeled"):
        (root / sub).mkdir(parents=True)
    img = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:10, 4:10] = 1
    rows = ["filename,patient"]
    for g in range(groups):
        for k in range(per_group):
            name = f"g{g:02d}_{k}.png"
            Image.fromarray(img).save(root / "images" / name)
            Image.fromarray(mask).save(root / "masks" / name)
            rows.append(f"{name},P{g}")
    for u in range(unlabelled):
        Image.fromarray(img).save(root / "unlabeled" / f"u{u}.png")
    (root / "meta.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return index_dataset(_dataset(tmp_path_factory.mktemp("split")), group_column="patient")


def _group(case_id: str) -> str:
    return case_id.split("_")[0] if case_id.startswith("g") else case_id


def test_group_wise_and_complete(index):
    s = make_split(index, seed=3, val_fraction=0.2, test_fraction=0.3)
    parts = {"pool": s.pool + s.exemplars, "val": s.val, "test": s.test}
    groups = {name: {_group(c) for c in ids} for name, ids in parts.items()}
    assert not groups["pool"] & groups["val"] and not groups["pool"] & groups["test"] and not groups["val"] & groups["test"]
    labelled = sorted(c for c in s.pool + s.exemplars + s.val + s.test if c.startswith("g"))
    assert labelled == sorted(r.case_id for r in index.labelled)
    assert {"u0", "u1", "u2", "u3"} <= set(s.pool)
    assert len(s.test) >= 9 and len(s.val) >= 6
    assert s.group_column == "patient" and len(s.exemplars) == 1 and s.exemplars[0] not in s.pool


def test_reproducible_and_seed_dependent(index):
    a = make_split(index, seed=1, val_fraction=0.2, test_fraction=0.2)
    b = make_split(index, seed=1, val_fraction=0.2, test_fraction=0.2)
    assert a == b
    others = [make_split(index, seed=s, val_fraction=0.2, test_fraction=0.2) for s in range(2, 6)]
    assert any(o.test != a.test for o in others)


def test_exemplars_by_id_stay_in_training(index):
    for seed in range(5):
        s = make_split(index, seed=seed, val_fraction=0.2, test_fraction=0.3, exemplars=["g04_1", "g07_0"])
        assert s.exemplars == ["g04_1", "g07_0"]
        assert not {"g04", "g07"} & {_group(c) for c in s.val + s.test}
        assert "g04_0" in s.pool and "g04_1" not in s.pool


def test_k_exemplars_drawn_by_seed(index):
    s = make_split(index, seed=0, val_fraction=0.1, test_fraction=0.2, num_exemplars=4)
    assert len(set(s.exemplars)) == 4
    assert all(c.startswith("g") for c in s.exemplars)
    assert not set(s.exemplars) & set(s.pool + s.val + s.test)


def test_bad_exemplars(index):
    with pytest.raises(DataError, match="unknown case id 'nope'"):
        make_split(index, seed=0, val_fraction=0.1, test_fraction=0.2, exemplars=["nope"])
    with pytest.raises(DataError, match="'u0' has no mask"):
        make_split(index, seed=0, val_fraction=0.1, test_fraction=0.2, exemplars=["u0"])
    with pytest.raises(DataError, match="split.num_exemplars"):
        make_split(index, seed=0, val_fraction=0.1, test_fraction=0.2, num_exemplars=1000)


def test_too_few_groups_names_the_fraction(tmp_path):
    small = index_dataset(_dataset(tmp_path, groups=2, per_group=2), group_column="patient")
    with pytest.raises(DataError, match="split.val_fraction"):
        make_split(small, seed=0, val_fraction=0.1, test_fraction=0.2)
    s = make_split(small, seed=0, val_fraction=0.0, test_fraction=0.2)
    assert s.val == [] and s.test and s.exemplars


def test_json_round_trip(index, tmp_path):
    s = make_split(index, seed=2, val_fraction=0.2, test_fraction=0.2, num_exemplars=2)
    assert Split.from_json(s.to_json(tmp_path / "split.json")) == s
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="bad.json"):
        Split.from_json(tmp_path / "bad.json")
