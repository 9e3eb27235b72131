"""Times the two scoring passes with the ``caudo_ray`` of a given checkout (a child process of scoring.py).

Usage: ``python benchmarks/scoring_child.py CHECKOUT MAPS REPEATS``; prints a JSON list of seconds per case. It
imports nothing from the project before putting CHECKOUT first on the path, so it times that checkout's code.
"""

import json
import sys
import time

import numpy as np


def time_passes(maps: str, repeats: int) -> list[float]:
    """Seconds per case of the two scoring passes of a labelling batch, ``repeats`` times."""
    from caudo_ray.labelling.reliability import ShapePrior, reliability_scores

    d = np.load(maps)
    prior = json.loads(str(d["prior"]))
    prior = ShapePrior.from_dict(prior) if prior is not None else None
    initial, flipped, calibrated = d["initial"], d["flipped"], d["calibrated"]
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        reliability_scores(initial, initial, flipped, prior)  # as if uncalibrated: the gate and the revert rule
        reliability_scores(initial, calibrated, flipped, prior)
        runs.append((time.perf_counter() - t0) / len(initial))
    return runs


if __name__ == "__main__":
    checkout, maps, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sys.path.insert(0, checkout)
    import caudo_ray

    if not caudo_ray.__file__.startswith(checkout):
        raise SystemExit(f"imported caudo_ray from {caudo_ray.__file__}, not from {checkout}")
    print(json.dumps(time_passes(maps, repeats)))
