"""Bad input catalogue through ``caudo-ray run``, and config errors refused before any work starts (issue 6).

What happens to a bad case depends on where the split put it:

- pool (labelled or not) and validation cases: reported with file and reason (run.log, stderr, MLflow
  ``data/skipped.json`` and metric ``data/skipped``) and left out; the run completes on the rest, exit status 3;
- an exemplar: the run stops (exit 1) naming the file, since the method cannot start without it;
- a file whose name is not a safe case id, or a second file of one case id: reported and left out like the above
  (the first file of a duplicated id is used);
- test cases are not read by ``run`` (only by the benchmarks, which raise on them).
"""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_config
from mlflow import MlflowClient
from PIL import Image

from caudo_ray import data as D
from caudo_ray.cli import EXIT_FAILED, EXIT_REFUSED, EXIT_SKIPPED, main
from caudo_ray.config import PhantomConfig, save_config
from caudo_ray.store import PseudoLabelStore
from caudo_ray.tracking import names
from caudo_ray.workspace import Workspace

pytestmark = pytest.mark.faults

SIZE = 48
MAX_PIXELS = 10_000  # the phantoms are 48x48 = 2,304 pixels; a 120x120 file is over the limit


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels, with no pixel data: nothing big is ever allocated."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def _first_image(root: Path) -> Path:
    """The first phantom image (the bad files added to a catalogue all start with ``bad_``)."""
    return min(p for p in (root / "images").glob("*.png") if not p.name.startswith("bad_"))


def _labelled(root: Path, stem: str, image: np.ndarray, mask: np.ndarray, group: str = "bad") -> None:
    Image.fromarray(image).save(root / "images" / f"{stem}.png")
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    with (root / "meta.csv").open("a") as fh:
        fh.write(f"{stem}.png,{group}\n")


def _mask(shape=(SIZE, SIZE), value: int = 1) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[shape[0] // 4 : shape[0] // 2, shape[1] // 4 : shape[1] // 2] = value
    return m


def catalogue(root: Path) -> dict[str, str]:
    """A phantom dataset plus one file of every bad kind; returns bad file name -> expected reason (a regex)."""
    D.write_phantom_dataset(
        root,
        PhantomConfig(num_labelled=12, num_unlabelled=6, size=(SIZE, SIZE), num_groups=6),
    )
    good = np.asarray(Image.open(_first_image(root)))
    unl = root / "unlabeled"
    # labelled cases: the mask is what is wrong (or the image's intensities)
    _labelled(root, "bad_shape", good, _mask((40, 40)))
    _labelled(root, "bad_class", good, _mask(value=2))  # a class beyond data.num_classes = 2
    nan = good.astype(np.float32)
    nan[5, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), root / "images" / "bad_nan.nii.gz")
    nib.save(
        nib.Nifti1Image(_mask().astype(np.uint8), np.eye(4)),
        root / "masks" / "bad_nan.nii.gz",
    )
    with (root / "meta.csv").open("a") as fh:
        fh.write("bad_nan.nii.gz,bad\n")
    # unlabelled pool
    Image.fromarray(good).save(unl / "truncated.png")
    (unl / "truncated.png").write_bytes((unl / "truncated.png").read_bytes()[:200])
    (unl / "not_an_image.jpg").write_text("this is a text file with an image extension\n")
    rgb = np.stack([good, np.roll(good, 9, axis=0), 255 - good], axis=-1)
    Image.fromarray(rgb).save(unl / "colour.png")
    Image.fromarray(np.full((1, 1), 128, np.uint8)).save(unl / "one_pixel.png")
    _png_header_only(unl / "huge_header.png", 12_000, 12_000)
    Image.fromarray(np.resize(good, (120, 120))).save(unl / "too_big.png")
    (unl / "notes.bmp").write_bytes(b"BM")
    Image.fromarray(good).save(unl / "a b;rm.png")  # not a safe case id
    Image.fromarray(good).save(unl / _first_image(root).name)  # the id of a labelled case again
    return {
        "a b;rm.png": "is not safe.*skipped",
        _first_image(root).name: "duplicate case id .*skipped",
        "bad_shape.png": "does not match image shape",
        "bad_class.png": "out of range for 2 classes",
        "bad_nan.nii.gz": "NaN or infinite",
        "truncated.png": "cannot read as png",
        "not_an_image.jpg": "cannot read as jpeg",
        "colour.png": "colour image .* grayscale data set",
        "one_pixel.png": "1x1 pixels; need 2D with at least 8",
        "huge_header.png": "144,000,000 pixels, more than data.max_pixels",
        "too_big.png": "14,400 pixels, more than data.max_pixels",
        "notes.bmp": "unsupported extension",
    }


def _seed_keeping_bad_cases_out_of_test(root: Path, cfg, exemplar: str) -> int:
    """A split seed whose test set holds no bad case (``run`` never reads test cases, so they would go unseen)."""
    index = D.index_dataset(root)
    for seed in range(50):
        split = D.make_split(
            index,
            seed=seed,
            val_fraction=cfg.split.val_fraction,
            test_fraction=cfg.split.test_fraction,
            exemplars=[exemplar],
        )
        if not any(c.startswith("bad_") for c in split.test):
            return seed
    raise AssertionError("no seed keeps the bad group out of the test set")


@pytest.fixture(scope="module")
def catalogue_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    expected = catalogue(root / "ds")
    exemplar = D.file_stem(_first_image(root / "ds"))
    overrides = {
        "rounds": 1,
        "tracking.num_overlays": 1,
        "data.path": str(root / "ds"),
        "data.num_classes": 2,
        "data.max_pixels": MAX_PIXELS,
        "split.exemplars": [exemplar],
    }
    cfg = tiny_config(root / "run", **overrides)
    overrides["split.seed"] = _seed_keeping_bad_cases_out_of_test(root / "ds", cfg, exemplar)
    save_config(tiny_config(root / "run", **overrides), root / "run.yaml")
    code = main(["run", "--no-ray", "--quiet", "--config", str(root / "run.yaml")])
    return code, root / "run", expected


def test_every_bad_case_reported_and_the_run_completes_with_exit_3(catalogue_run, capsys):
    code, work, expected = catalogue_run
    assert code == EXIT_SKIPPED
    log_text = (work / "run.log").read_text()
    for name, reason in expected.items():
        lines = [line for line in log_text.splitlines() if name in line and "skipped" in line]
        assert lines, f"{name} not reported in run.log"
        assert any(re.search(reason, line) for line in lines), (name, lines)
    # the run completed on the good cases: every usable pool case labelled, the final model written
    store = PseudoLabelStore.open(str(work / "store.zarr"))
    assert store.rounds.is_committed(0)
    usable = store.usable_mask()
    assert usable.sum() >= 6 and store.rounds.done(0)[usable].all()
    assert (work / "models" / "final.pt").is_file()


def test_every_bad_case_in_mlflow(catalogue_run):
    _, work, expected = catalogue_run
    info = Workspace(work).read_run_info()
    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    skipped = client.download_artifacts(run.info.run_id, "data/skipped.json", str(work / "dl"))
    reported = json.loads(Path(skipped).read_text())
    for name in expected:
        assert [src for src in reported if Path(src).name == name], f"{name} missing from data/skipped.json"
    assert run.data.metrics[names.SKIPPED] == len(reported) >= len(expected)


@pytest.mark.parametrize(
    "kind",
    ["empty_exemplar", "bad_exemplar_file"],
)
def test_exemplar_problems_stop_the_run_naming_the_file(tmp_path, capsys, kind):
    root = D.write_phantom_dataset(
        tmp_path / "ds",
        PhantomConfig(num_labelled=8, num_unlabelled=2, size=(SIZE, SIZE), num_groups=4),
    )
    first = _first_image(root)
    good = np.asarray(Image.open(first))
    exemplar = D.file_stem(first)
    if kind == "empty_exemplar":
        named = "empty.png"
        _labelled(root, "empty", good, np.zeros_like(good), group="g_empty")
        exemplar = "empty"
    else:
        named = first.name
        (root / "masks" / named).write_text("not a png")
    config = tmp_path / "run.yaml"
    save_config(
        tiny_config(
            tmp_path / "run",
            **{"rounds": 1, "data.path": str(root), "split.exemplars": [exemplar]},
        ),
        config,
    )
    assert main(["run", "--no-ray", "--quiet", "--config", str(config)]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert (named if kind != "empty_exemplar" else "empty") in err
    assert not (tmp_path / "run" / "mlflow.db").exists()


@pytest.mark.parametrize(
    "yaml_text, key",
    [
        ("rounds: 1\nsegmentr:\n  iterations: 3\n", "segmentr"),  # unknown key
        (
            "rounds: 1\nsegmenter:\n  iterations: many\n",
            "segmenter.iterations",
        ),  # wrong type
        (
            "rounds: 1\ncalibrator:\n  guidance_strength: -0.5\n",
            "calibrator.guidance_strength",
        ),  # w < 0
        ("rounds: 1\ndata:\n  max_pixels: 0\n", "data.max_pixels"),
        ("rounds: 1\ndata:\n  color: maybe\n", "data.color"),
    ],
)
def test_config_errors_in_the_file_are_refused_before_any_work(tmp_path, capsys, yaml_text, key):
    config = tmp_path / "run.yaml"
    config.write_text(f"work_dir: {tmp_path / 'run'}\n" + yaml_text)
    assert main(["run", "--no-ray", "--quiet", "--config", str(config)]) == EXIT_REFUSED
    assert key in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_split_that_leaves_no_test_case_is_refused_before_any_work(tmp_path, capsys):
    # All labelled cases in one group: group-wise, nothing can go to the test set.
    root = D.write_phantom_dataset(
        tmp_path / "ds",
        PhantomConfig(num_labelled=6, num_unlabelled=2, size=(SIZE, SIZE), num_groups=1),
    )
    config = tmp_path / "run.yaml"
    save_config(tiny_config(tmp_path / "run", **{"rounds": 1, "data.path": str(root)}), config)
    assert main(["run", "--no-ray", "--quiet", "--config", str(config)]) == EXIT_REFUSED
    assert "split.test_fraction" in capsys.readouterr().err
    work = tmp_path / "run"
    assert not (work / "store.zarr").exists() and not (work / "mlflow.db").exists()
