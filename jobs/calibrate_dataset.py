"""`ray job submit` entry point: calibrate the labels of a whole dataset with a finished run's models
(``caudo-ray calibrate``).

    ray job submit --working-dir . -- python jobs/calibrate_dataset.py --run /shared/runs/hc18 \
        --data /shared/data/new_exams --out /shared/runs/hc18_new_exams

Writes <out>/store.zarr (labels, reliability, resumable) and <out>/labels/ at each image's original geometry.
"""

import sys

from caudo_ray.cli import main

if __name__ == "__main__":
    # The job already runs inside a Ray cluster: join it rather than start one.
    sys.exit(main(["calibrate", "--address", "auto", *sys.argv[1:]]))
