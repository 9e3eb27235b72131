"""prepare_run: idempotent preparation of a work dir, config guard, skipped pool files, annotations as exemplars."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image

from caudo_ray import data as D
from caudo_ray.config import PhantomConfig
from caudo_ray.errors import StoreError
from caudo_ray.run.prepare import load_labelled, prepare_run


def _prepare(cfg, **kwargs):
    """prepare_run, then its lock given back as a run gives it back when it ends (one run per store at a time)."""
    prepared = prepare_run(cfg, progress=False, **kwargs)
    prepared.lock.release()
    return prepared


def test_prepare_is_idempotent(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    first = _prepare(cfg)
    ws = first.workspace
    assert ws.config_path.is_file() and ws.split_path.is_file() and (ws.phantom_dir / "meta.csv").is_file()
    assert len(first.split.pool) == first.store.num_cases and first.store.images_missing().size == 0
    split_text, images = ws.split_path.read_text(), first.store.read_images()

    again = _prepare(cfg)
    assert ws.split_path.read_text() == split_text
    np.testing.assert_array_equal(again.store.read_images(), images)
    assert again.store.exemplars()[0] == first.split.exemplars
    val_images, val_labels = load_labelled(again, again.split.val)
    assert val_images.shape == val_labels.shape == (len(again.split.val), *cfg.data.working_size)


def test_another_config_is_refused_in_the_same_work_dir(tmp_path):
    _prepare(tiny_config(tmp_path / "run"))
    with pytest.raises(StoreError, match="different config"):
        _prepare(tiny_config(tmp_path / "run", **{"calibrator.guidance_strength": 3.0}))
    # Runtime knobs do not change results, so they may differ between invocations.
    _prepare(tiny_config(tmp_path / "run", **{"runtime.num_workers": 1}))


def test_bad_pool_files_are_skipped_and_reported_again_on_resume(tmp_path):
    data = D.write_phantom_dataset(tmp_path / "ds", PhantomConfig(num_labelled=8, num_unlabelled=4, size=(32, 32), num_groups=4))
    bad = sorted((data / "unlabeled").iterdir())[1]
    bad.write_bytes(b"\x89PNG truncated")
    cfg = tiny_config(tmp_path / "run", **{"data.path": str(data)})
    seen: list[str] = []
    first = _prepare(cfg, on_skip=lambda source, reason: seen.append(source))
    assert list(first.skipped) == seen == [str(bad)]
    assert not first.store.usable_mask()[first.store.case_ids.index(D.file_stem(bad))]
    again = _prepare(cfg)
    assert again.skipped == first.skipped


def test_annotations_join_the_exemplars(tmp_path):
    cfg = tiny_config(tmp_path / "run")
    prepared = _prepare(cfg)
    pool_case = next(c for c in prepared.split.pool if c.startswith("u"))
    image = Image.open(prepared.index.by_id()[pool_case].image_path)
    mask = np.zeros((image.height, image.width), np.uint8)
    mask[10:30, 12:34] = 1
    Image.fromarray(mask).save(prepared.workspace.annotations_dir / f"{pool_case}.png")
    again = _prepare(cfg)
    ids, _, labels = again.store.exemplars()
    assert ids == [*prepared.split.exemplars, pool_case]
    assert labels[-1].max() == 1

    # A bad file dropped by hand is left out, named with its problem, and the run goes on with the answers before.
    bad = prepared.workspace.annotations_dir / "nobody.png"
    bad.write_bytes((prepared.workspace.annotations_dir / f"{pool_case}.png").read_bytes())
    third = _prepare(cfg)
    assert third.skipped == {str(bad): "annotation refused: names case 'nobody', which is not in the dataset (name answers <case_id>.<ext>)"}
    assert third.store.exemplars()[0] == ids and list(third.store.annotations) == [pool_case]


@pytest.mark.parametrize("scheme", ["path", "fsspec"])
def test_store_can_live_outside_the_work_dir(tmp_path, scheme):
    """runtime.store_url: a path or an fsspec URL that a cluster shares; the CLI finds it from the work dir."""
    from caudo_ray.cli import main
    from caudo_ray.run.coordinator import Coordinator

    location = tmp_path / "shared" / "store.zarr"
    url = str(location) if scheme == "path" else f"file://{location}"
    cfg = tiny_config(tmp_path / "run", **{"runtime.store_url": url, "rounds": 1})
    result = Coordinator(cfg, progress=False).run()
    assert result.store_url == url
    assert (location / "zarr.json").exists() and not (tmp_path / "run" / "store.zarr").exists()
    assert main(["queries", "--work-dir", str(tmp_path / "run"), "-k", "2"]) == 0
