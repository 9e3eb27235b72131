"""`ray job submit` entry point: a Ray Tune search over guidance strength w, calibration strength s and DDIM steps.

    ray job submit --working-dir . -- python jobs/tune_guidance.py --config configs/hc18.yaml \
        --set work_dir=/shared/runs/hc18 --set 'tune.guidance_strength={grid: [0, 1, 2, 4]}'

The search trains the round-0 segmenter and calibrator once (or reuses the work dir's ``models/round_0.pt``),
shares them with every trial through the object store and logs a parent MLflow run with one nested run per trial.
The config's paths (data, work_dir) must be visible from every node.
"""

import argparse
import json
import sys
from pathlib import Path

# A job runs from its --working-dir checkout; make the package importable there without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from caudo_ray.cli import EXIT_OK, config_from_args
from caudo_ray.tune import format_trials, run_tune


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--config",
        required=True,
        help="YAML run config (its tune: section is the search)",
    )
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

    # 1. Read and validate the config (search space included) before any work starts.
    args = parse_args()
    cfg = config_from_args(args)

    # 2. Join the cluster this job was submitted to.
    ray.init(address="auto")

    # 3. Train (or load) the shared round-0 weights once, then run the trials under ASHA.
    result = run_tune(cfg, progress=not args.quiet)

    # 4. Report the trials, the best setting and where everything was logged.
    print(format_trials(result.trials, result.objective, result.best))
    print(
        json.dumps(
            {
                "best": result.best.params,
                result.objective: result.best.metrics["objective"],
            }
        )
    )
    print(f"MLflow parent run {result.parent_run_id} at {result.tracking_uri}")
    sys.exit(EXIT_OK)
