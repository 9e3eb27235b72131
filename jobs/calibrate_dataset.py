"""`ray job submit` entry point: calibrate the pseudo labels of a whole dataset with a finished run's models.

    ray job submit --working-dir . -- python jobs/calibrate_dataset.py --run /shared/runs/hc18 \
        --data /shared/data/new_exams --out /shared/runs/hc18_new_exams

Writes <out>/store.zarr (labels, reliability, resumable) and <out>/labels/ at each image's original geometry.
"""

import argparse
import json
import sys
from pathlib import Path

# A job runs from its --working-dir checkout; make the package importable there without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caudo_ray.cli import EXIT_OK, EXIT_SKIPPED
from caudo_ray.coordinator import calibrate_dataset


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="work dir of a finished self-training run")
    p.add_argument("--data", required=True, help="dataset folder (images/, optional unlabeled/)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=["source", "png", "nifti"], default="source")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


if __name__ == "__main__":
    import ray

    from caudo_ray.actors import RayExecutor

    # 1. Read the arguments.
    args = parse_args()

    # 2. Join the cluster this job was submitted to.
    ray.init(address="auto")

    # 3. Label and calibrate every image on the run's calibration workers; export the labels.
    summary = calibrate_dataset(args.run, args.data, args.out, executor_factory=RayExecutor, fmt=args.format, progress=not args.quiet)

    # 4. Report.
    print(json.dumps({k: v for k, v in summary.items() if k != "perf"}, indent=2, default=str))
    sys.exit(EXIT_SKIPPED if summary["skipped"] else EXIT_OK)
