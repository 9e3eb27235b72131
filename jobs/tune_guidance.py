"""`ray job submit` entry point: a Ray Tune search over guidance strength w, calibration strength s and DDIM steps
(``caudo-ray tune``).

    ray job submit --working-dir . -- python jobs/tune_guidance.py --config my_run.yaml \
        --set work_dir=/shared/runs/hc18 --set 'tune.guidance_strength={grid: [0, 1, 2, 4]}'

The search trains the round-0 segmenter and calibrator once (or reuses the work dir's ``models/round_0.pt``),
shares them with every trial through the object store and logs a parent MLflow run with one nested run per trial.
The config's paths (data, work_dir) must be visible from every node.
"""

import sys

from caudo_ray.cli import main

if __name__ == "__main__":
    # The job already runs inside a Ray cluster: join it rather than start one.
    sys.exit(main(["tune", "--address", "auto", *sys.argv[1:]]))
