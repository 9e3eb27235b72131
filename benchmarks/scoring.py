"""Scoring benchmark: the CPU time per case of the reliability scores a labelling worker computes for each batch.

A worker scores every batch twice on the CPU (the initial labels as if uncalibrated, for the gate and the revert
rule, then the calibrated labels), whatever device its networks run on; on a GPU this host-side work, not DDIM,
decides how many cases one worker labels per second. This script times those two passes
(``labelling.reliability.reliability_scores``) on one batch of real probability maps: the segmenter's, its
mirrored view's and the calibrator's on phantoms, from a finished run's models (``--models``, with ``--config``)
or untrained networks of the demo's sizes.

Each timing runs in a fresh child process (``scoring_child.py``) that imports the code it times; ``--against
PATH`` times another checkout's code (a ``git worktree`` of an earlier commit) on the same maps, the two
alternating, so both are measured side by side under the same load.

Usage::

    python -m benchmarks.scoring --config runs/demo/config.yaml --models runs/demo/models/round_2.pt
    git worktree add /tmp/base <commit> && python -m benchmarks.scoring --models ... --against /tmp/base

Writes ``<work-dir>/scoring.json`` (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from benchmarks.workload import DEMO_CONFIG, REPO_ROOT, untrained_models
from caudo_ray.calibration.sampling import calibrate
from caudo_ray.calibration.schedule import CalibrationSchedule
from caudo_ray.config import load_config
from caudo_ray.data.phantom import phantom_case
from caudo_ray.networks.bundle import RoundModels, build_models
from caudo_ray.networks.segmenter import predict_tensor


def make_maps(config: Path, models_path: Path | None, size: int, batch: int, out: Path) -> None:
    """Saves the batch's initial, mirrored and calibrated probability maps and the models' shape prior."""
    cfg = dataclasses.replace(load_config(config, {"data.working_size": [size, size]}), device="cpu")
    num_classes = cfg.data.num_classes or cfg.data.phantom.num_classes
    models = RoundModels.load(models_path) if models_path else untrained_models(cfg, num_classes)
    net, calibrator = build_models(cfg, models, torch.device("cpu"))
    images = np.stack([phantom_case(seed, (size, size), num_classes)[0] for seed in range(batch)]).astype(np.float32)
    x = torch.from_numpy(images).unsqueeze(1)
    c = cfg.calibrator
    with torch.no_grad():
        probs, feats = predict_tensor(net, x)
        flipped, _ = predict_tensor(net, x.flip(-1))
        schedule = CalibrationSchedule(c.train_timesteps, c.inference_steps)
        calibrated = calibrate(calibrator, schedule, x, probs, feats, w=c.guidance_strength, s=c.calibration_strength)
    np.savez(
        out,
        initial=probs.numpy(),
        flipped=flipped.flip(-1).numpy(),
        calibrated=calibrated.numpy(),
        prior=json.dumps(models.shape_prior),
    )


def measure_in_child(checkout: Path, maps: Path, repeats: int) -> list[float]:
    """Seconds per case of the two passes in a fresh process running ``checkout``'s code, one BLAS thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    child = [sys.executable, str(Path(__file__).with_name("scoring_child.py")), str(checkout), str(maps), str(repeats)]
    done = subprocess.run(child, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"timing {checkout} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="run config whose network sizes to use")
    parser.add_argument("--models", type=Path, default=None, help="a finished run's models/round_<r>.pt (default: untrained)")
    parser.add_argument("--size", type=int, default=128, help="working size of the maps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per child process")
    parser.add_argument("--rounds", type=int, default=3, help="child processes per checkout, alternating")
    parser.add_argument("--against", type=Path, default=None, help="another checkout to time side by side")
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "runs" / "bench-scoring")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: <work-dir>/scoring.json)")
    args = parser.parse_args(argv)
    if args.against is not None and not (args.against / "caudo_ray" / "labelling" / "reliability.py").is_file():
        parser.error(f"--against {args.against}: not a caudo-ray checkout (no caudo_ray/labelling/reliability.py)")

    args.work_dir.mkdir(parents=True, exist_ok=True)
    maps = args.work_dir / "maps.npz"
    make_maps(args.config, args.models, args.size, args.batch_size, maps)
    checkouts = {"this checkout": REPO_ROOT} | ({"against": args.against.resolve()} if args.against else {})
    runs: dict[str, list[float]] = {name: [] for name in checkouts}
    for _ in range(args.rounds):
        for name, path in checkouts.items():
            runs[name] += measure_in_child(path, maps, args.repeats)
    res = {
        "size": args.size,
        "batch_size": args.batch_size,
        "models": str(args.models) if args.models else "untrained networks of the config's sizes",
        "against": str(args.against) if args.against else None,
        "ms_per_case": {name: 1e3 * statistics.median(v) for name, v in runs.items()},
        "runs_ms_per_case": {name: [1e3 * t for t in v] for name, v in runs.items()},
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    if args.against:
        res["ratio_against_over_this"] = res["ms_per_case"]["against"] / res["ms_per_case"]["this checkout"]
    out = args.out or args.work_dir / "scoring.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"reliability scoring, both passes, {args.size}x{args.size}, batch {args.batch_size} (ms per case, median)")
    for name, ms in res["ms_per_case"].items():
        print(f"  {name:14s} {ms:7.3f}   ({checkouts[name]})")
    if args.against:
        print(f"  against / this: {res['ratio_against_over_this']:.2f}")
    print(f"JSON: {out}")
    return res


if __name__ == "__main__":
    main()
