"""`ray job submit` entry point: a whole calibrated self-training run on the cluster.

    ray job submit --working-dir . -- python jobs/self_training.py --config configs/hc18.yaml \
        --set work_dir=/shared/runs/hc18

The working dir travels to the cluster with the job; the config's paths (data, work_dir) must be visible from
every node (a shared filesystem, or an fsspec URL for the store).
"""

import argparse
import sys
from pathlib import Path

# A job runs from its --working-dir checkout; make the package importable there without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caudo_ray.cli import EXIT_OK, EXIT_SKIPPED, config_from_args
from caudo_ray.coordinator import Coordinator


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML run config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    # The job already runs inside a Ray cluster: join it rather than start one.
    for name in ("work_dir", "data", "group_column", "tracking_uri"):
        setattr(args, name, None)
    args.address, args.no_ray = "auto", False
    return args


if __name__ == "__main__":
    import ray

    from caudo_ray.actors import RayExecutor

    # 1. Read and validate the config before any work starts.
    args = parse_args()
    cfg = config_from_args(args)

    # 2. Join the cluster this job was submitted to.
    ray.init(address="auto")

    # 3. Run (or resume) the rounds: trainer actor, calibration worker pool, store, MLflow.
    result = Coordinator(cfg, executor_factory=RayExecutor, progress=not args.quiet).run()

    # 4. Report where the results are.
    for summary in result.rounds:
        print({k: v for k, v in summary.items() if not isinstance(v, dict)})
    print(f"store: {result.store_url}\nMLflow run {result.run_id} at {result.tracking_uri}")
    sys.exit(EXIT_SKIPPED if result.skipped else EXIT_OK)
