"""``caudo-ray`` in-process: data inspect, run exit codes, export, queries."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import HC18, assert_nearest_resize, tiny_config
from PIL import Image

from caudo_ray import data as D
from caudo_ray.cli import EXIT_OK, EXIT_REFUSED, EXIT_SKIPPED, main
from caudo_ray.config import PhantomConfig, save_config
from caudo_ray.store import PseudoLabelStore


def write_config(path: Path, work_dir: Path, **overrides) -> Path:
    save_config(tiny_config(work_dir, **{"rounds": 1, "tracking.num_overlays": 1, **overrides}), path)
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-round run made with ``caudo-ray run --no-ray``."""
    root = tmp_path_factory.mktemp("cli")
    config = write_config(root / "run.yaml", root / "run")
    assert main(["run", "--no-ray", "--quiet", "--config", str(config)]) == EXIT_OK
    return root / "run"


def test_inspect_written_dataset(tmp_path, capsys):
    cfg = PhantomConfig(num_labelled=6, num_unlabelled=4, size=(40, 40), num_classes=3, num_groups=3)
    root = D.write_phantom_dataset(tmp_path / "ds", cfg)
    assert main(["data", "inspect", str(root), "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert (report["labelled"], report["unlabelled"], report["num_classes"]) == (6, 4, 3)
    assert report["group_column"] == "group" and report["groups"]["labelled_count"] == 3
    assert report["image_sizes"] == [[[40, 40], 10]] and report["problems"] == []


@pytest.mark.skipif(not HC18.is_dir(), reason="../shared/data/hc18 is not present")
def test_inspect_hc18(capsys):
    assert main(["data", "inspect", str(HC18), "--json"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert (report["labelled"], report["unlabelled"], report["num_classes"]) == (999, 335, 2)
    assert report["group_column"] == "exam_id"  # guessed from meta.csv
    assert report["groups"]["count"] < report["labelled"] + report["unlabelled"]  # exams hold several frames
    assert report["problems"] == []


def test_run_refuses_a_bad_config_naming_the_key(tmp_path, capsys):
    config = write_config(tmp_path / "run.yaml", tmp_path / "run")
    code = main(["run", "--no-ray", "--quiet", "--config", str(config), "--set", "calibrator.guidance_strength=-1"])
    assert code == EXIT_REFUSED
    assert "calibrator.guidance_strength" in capsys.readouterr().err
    assert main(["run", "--no-ray", "--config", str(config), "--set", "calibrator.guidance=1"]) == EXIT_REFUSED
    assert "calibrator.guidance" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any work started


def test_run_with_a_bad_pool_file_exits_3(tmp_path, capsys):
    data = D.write_phantom_dataset(tmp_path / "ds", PhantomConfig(num_labelled=12, num_unlabelled=6, size=(32, 32), num_groups=6))
    bad = min((data / "unlabeled").iterdir())
    bad.write_bytes(b"not a png")
    config = write_config(tmp_path / "run.yaml", tmp_path / "run", **{"data.path": str(data)})
    assert main(["run", "--no-ray", "--quiet", "--config", str(config)]) == EXIT_SKIPPED
    err = capsys.readouterr().err
    assert bad.name in err
    store = PseudoLabelStore.open(str(tmp_path / "run" / "store.zarr"))
    assert list(store.skipped) == [D.file_stem(bad)]
    assert not store.rounds.done(0)[store.case_ids.index(D.file_stem(bad))]
    # A rerun finds the run complete and still reports the skipped file.
    assert main(["run", "--no-ray", "--quiet", "--config", str(config)]) == EXIT_SKIPPED
    assert bad.name in capsys.readouterr().err


def test_export_writes_labels_at_original_geometry(finished, tmp_path, capsys):
    out = tmp_path / "labels"
    assert main(["export", "--work-dir", str(finished), str(out)]) == EXIT_OK
    initial_out = tmp_path / "initial"
    assert main(["export", "--work-dir", str(finished), "--which", "initial", str(initial_out)]) == EXIT_OK
    store = PseudoLabelStore.open(str(finished / "store.zarr"))
    done = np.flatnonzero(store.rounds.done(0))
    stored = store.rounds.read(0, done)
    written = sorted(out.iterdir())
    assert [p.name for p in written] == sorted(f"{store.case_ids[i]}.png" for i in done)
    differing = 0
    for k, (i, geometry) in enumerate(zip(done, store.geometries(done))):
        name = f"{store.case_ids[i]}.png"
        mask = np.asarray(Image.open(out / name))
        initial = np.asarray(Image.open(initial_out / name))
        source = Image.open(geometry["source"])
        assert mask.shape == initial.shape == (source.height, source.width) != tuple(store.working_size)
        # Each file holds its own stored map (the default is the calibrated one), brought back to the source size.
        assert_nearest_resize(mask, stored["calibrated"][k], f"calibrated {name}")
        assert_nearest_resize(initial, stored["initial"][k], f"initial {name}")
        if not np.array_equal(stored["calibrated"][k], stored["initial"][k]):
            differing += 1
            assert not np.array_equal(mask, initial), f"{name}: the store's maps differ but the exports do not"
    assert differing > 0  # calibration changed some labels, or --which was not tested
    selected = tmp_path / "selected"
    assert main(["export", "--work-dir", str(finished), "--selected-only", "--which", "initial", str(selected)]) == EXIT_OK
    assert sorted(p.name for p in selected.iterdir()) == sorted(f"{store.case_ids[i]}.png" for i in np.flatnonzero(store.rounds.selected(0)))


def test_queries_lists_the_least_reliable_ascending(finished, capsys):
    capsys.readouterr()
    assert main(["queries", "--work-dir", str(finished), "-k", "4", "--json", "--strategy", "reliability"]) == EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 4
    rel = [r["reliability"] for r in rows]
    assert rel == sorted(rel)
    store = PseudoLabelStore.open(str(finished / "store.zarr"))
    scores = store.rounds.scores(0)
    usable = store.usable_mask()
    groups = _phantom_groups(finished)
    labelled = {groups[c] for c in store.exemplars()[0]}
    # Candidates: usable cases of groups without a labelled case; a case of an exemplar's group is never asked.
    open_ = [i for i, (cid, ok) in enumerate(zip(store.case_ids, usable)) if ok and groups[cid] not in labelled]
    assert len(open_) < int(usable.sum())  # the phantom's exemplar shares its group with pool cases
    assert {r["group"] for r in rows} <= {groups[store.case_ids[i]] for i in open_}
    others = [scores["reliability"][i] for i in open_ if store.case_ids[i] not in {r["case_id"] for r in rows}]
    assert max(rel) <= min(others)
    assert main(["queries", "--work-dir", str(finished)]) == EXIT_OK
    assert len([line for line in capsys.readouterr().out.splitlines() if "reliability=" in line]) == 5  # num_queries
    # The default strategy is the seeded random draw (selection.query_strategy), the same on every call.
    assert main(["queries", "--work-dir", str(finished), "-k", "4", "--json"]) == EXIT_OK
    default = json.loads(capsys.readouterr().out)
    assert main(["queries", "--work-dir", str(finished), "-k", "4", "--json", "--strategy", "random"]) == EXIT_OK
    assert default == json.loads(capsys.readouterr().out) and default != rows

    assert main(["queries", "--work-dir", str(finished), "-k", "4", "--json", "--strategy", "entropy"]) == EXIT_OK
    by_entropy = json.loads(capsys.readouterr().out)
    entropy = [r["entropy"] for r in by_entropy]
    assert entropy == sorted(entropy, reverse=True)
    assert entropy[-1] >= max(scores["entropy"][i] for i in open_ if store.case_ids[i] not in {r["case_id"] for r in by_entropy})
    assert main(["queries", "--work-dir", str(finished), "-k", "4", "--json", "--strategy", "diverse"]) == EXIT_OK
    diverse = json.loads(capsys.readouterr().out)
    assert len({r["group"] for r in diverse}) == len(diverse) == 4  # no two of one group
    assert diverse[0]["case_id"] == rows[0]["case_id"]  # the least reliable case still comes first

    # An answer waiting in annotations/ for the run's next round is not asked for again; the ranking moves up.
    waiting = finished / "annotations" / f"{rows[0]['case_id']}.png"
    waiting.write_bytes(b"not read: only its name counts here")
    try:
        assert main(["queries", "--work-dir", str(finished), "-k", "4", "--json", "--strategy", "reliability"]) == EXIT_OK
        after = json.loads(capsys.readouterr().out)
        assert main(["queries", "--work-dir", str(finished), "-k", "4", "--json", "--strategy", "diverse"]) == EXIT_OK
        diverse_after = json.loads(capsys.readouterr().out)
    finally:
        waiting.unlink()
    assert [r["case_id"] for r in after[:3]] == [r["case_id"] for r in rows[1:]]
    assert diverse_after[0]["group"] != rows[0]["group"]  # its group, answered once, waits for the second pass


def _phantom_groups(work_dir) -> dict[str, str]:
    """Case id -> group, read from the phantom data set's meta.csv as written, not through the index."""
    with (work_dir / "phantoms" / "meta.csv").open(newline="") as fh:
        return {Path(row["filename"]).stem: row["group"] for row in csv.DictReader(fh)}
