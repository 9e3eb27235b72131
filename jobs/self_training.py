"""`ray job submit` entry point: a whole calibrated self-training run on the cluster (``caudo-ray run``).

    ray job submit --working-dir . -- python jobs/self_training.py --config my_run.yaml \
        --set work_dir=/shared/runs/hc18

Takes every option of ``caudo-ray run``. The working dir travels to the cluster with the job (Ray puts it on the
job's PYTHONPATH); the config's paths (data, work_dir) must be visible from every node (a shared filesystem, or an
fsspec URL for the store).
"""

import sys

from caudo_ray.cli import main

if __name__ == "__main__":
    # The job already runs inside a Ray cluster: join it rather than start one.
    sys.exit(main(["run", "--address", "auto", *sys.argv[1:]]))
