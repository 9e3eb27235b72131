"""Calibrator and reliability ablations on a finished run: what docs/method.md quotes, reproducible.

Given the work dir of a calibrated run whose pool carries hidden truth (e.g. a ``caudo`` run of
``benchmarks/accuracy.py``), for one round ``r >= 1`` it labels the first ``--cases`` pool cases with hidden truth
with round r's segmenter and compares, on the same initial labels:

- ``round-0 calibrator``: the calibrator trained in round 0, as the run uses it by default;
- ``fine-tuned on exemplar views``: that calibrator's denoiser fine-tuned for ``--finetune`` iterations on exemplar
  views with round r's segmenter (``calibrator.denoiser_finetune_iterations``);
- ``fine-tuned with pseudo pairs``: the same plus round r-1's selected calibrated labels as training pairs
  (``calibrator.pseudo_pairs: true``, the blueprint's design).

Each variant is scored as it comes out of the calibrator and behind the accept gate the run applies
(:func:`caudo_ray.labelling.reliability.accept_calibration`: per case, the more reliable of the initial and the calibrated
label), with the Spearman correlation of the labels' reliability with their true Dice. It also prints, for every committed round of the run, the Spearman correlation of each reliability factor (and of
the combinations considered) with the true Dice of the calibrated labels, from the run's store.

Usage::

    python benchmarks/ablations.py --run-dir runs/accuracy-full/780_HC/caudo --round 1 --out runs/ablations.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from caudo_ray.calibration.sampling import calibrate
from caudo_ray.calibration.schedule import CalibrationSchedule
from caudo_ray.calibration.training import train_calibrator
from caudo_ray.config import load_config
from caudo_ray.labelling.reliability import accept_calibration, reliability_scores
from caudo_ray.metrics import dice_per_case, spearman
from caudo_ray.networks.bundle import RoundModels, build_models
from caudo_ray.networks.segmenter import predict_tensor
from caudo_ray.rounds.steps import training_inputs
from caudo_ray.store import PseudoLabelStore
from caudo_ray.workspace import Workspace


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="work dir of a finished calibrated run with hidden truth")
    p.add_argument("--round", type=int, default=1, help="round whose segmenter labels the cases (>= 1)")
    p.add_argument("--cases", type=int, default=300, help="pool cases with hidden truth to label (the first ones)")
    p.add_argument("--finetune", type=int, default=400, help="denoiser fine-tuning iterations of the two fine-tuned variants")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="JSON results")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    ws = Workspace(args.run_dir)
    cfg = load_config(ws.config_path)
    if not cfg.calibrator.enabled:
        raise SystemExit(f"--run-dir {args.run_dir}: a run without calibrator has nothing to ablate")
    r = args.round
    if r < 1 or not ws.model_path(r).is_file():
        raise SystemExit(f"--round {r}: needs a round >= 1 whose models are in {ws.models_dir}")
    store = PseudoLabelStore.open(ws.store_url, mode="r")
    scores = store.rounds.scores(r)
    cases = np.flatnonzero(store.usable_mask() & np.isfinite(scores["initial_dice"]))[: args.cases]
    device = torch.device("cpu")
    net, _ = build_models(cfg, RoundModels.load(ws.model_path(r)), device)
    _, round0 = build_models(cfg, RoundModels.load(ws.model_path(0)), device)
    x = torch.from_numpy(store.read_images(cases))[:, None]
    truth = store.read_truth(cases)
    with torch.no_grad():
        probs, feats = predict_tensor(net, x)
        flipped = predict_tensor(net, x.flip(-1))[0].flip(-1).float().numpy()
    initial = dice_per_case(probs.argmax(1).numpy().astype(np.uint8), truth, store.num_classes)
    initial_scores = reliability_scores(probs.numpy(), probs.numpy(), flipped)

    inputs = training_inputs(store, r)
    variants = {"round-0 calibrator": (round0, 0.0)}
    for name, pseudo in (("fine-tuned on exemplar views", False), ("fine-tuned with pseudo pairs", True)):
        calib = copy.deepcopy(round0)
        t0 = time.perf_counter()
        train_calibrator(
            calib,
            lambda batch: predict_tensor(net, batch),
            inputs if pseudo else inputs.exemplars_only(),
            cfg=dataclasses.replace(cfg.calibrator, denoiser_finetune_iterations=args.finetune),
            seg_cfg=cfg.segmenter,
            seed=cfg.seed * 1000 + r,
            warm_start=True,
        )
        variants[name] = (calib, time.perf_counter() - t0)

    c = cfg.calibrator
    schedule = CalibrationSchedule(c.train_timesteps, c.inference_steps)
    rows = []
    for name, (calib, train_s) in variants.items():
        out = torch.cat([
            calibrate(calib, schedule, x[i : i + 50], probs[i : i + 50], feats[i : i + 50], w=c.guidance_strength, s=c.calibration_strength)
            for i in range(0, len(x), 50)
        ])
        ungated = out.numpy()
        gated, gated_scores = accept_calibration(probs.numpy(), ungated, flipped)
        for label, maps, rel in (
            (name, ungated, reliability_scores(probs.numpy(), ungated, flipped)["reliability"]),
            (f"{name}, accept gate", gated, gated_scores["reliability"]),
        ):
            dice = dice_per_case(maps.argmax(1).astype(np.uint8), truth, store.num_classes)
            rows.append({
                "variant": label,
                "dice": float(dice.mean()),
                "gain": float(dice.mean() - initial.mean()),
                "better": float(np.mean(dice > initial + 0.01)),
                "worse": float(np.mean(dice < initial - 0.01)),
                "accepted": float(gated_scores["accepted"].mean()) if label.endswith("gate") else 1.0,
                "reliability_spearman": spearman(rel, dice),
                "train_s": train_s,
            })
    report = {
        "run_dir": str(args.run_dir),
        "round": r,
        "cases": len(cases),
        "initial_dice": float(initial.mean()),
        "initial_reliability_spearman": spearman(initial_scores["reliability"], initial),
        "calibrator_variants": rows,
        "reliability": reliability_factors(store),
    }
    print(
        f"round {r}, {len(cases)} pool cases with hidden truth: initial Dice {initial.mean():.4f}, "
        f"Spearman(reliability, Dice) of the initial labels {report['initial_reliability_spearman']:.3f}"
    )
    print(f"{'variant':46s} {'Dice':>7s} {'gain':>8s} {'better':>7s} {'worse':>6s} {'kept':>5s} {'rel.rho':>7s} {'train s':>8s}")
    for row in rows:
        print(
            f"{row['variant']:46s} {row['dice']:7.4f} {row['gain']:+8.4f} {row['better']:7.2f} {row['worse']:6.2f} "
            f"{row['accepted']:5.2f} {row['reliability_spearman']:7.3f} {row['train_s']:8.0f}"
        )
    for row in report["reliability"]:
        print(f"round {row['round']} Spearman with true calibrated Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in row["spearman"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return report


def reliability_factors(store: PseudoLabelStore) -> list[dict]:
    """Spearman(factor or combination, true calibrated Dice) per committed round."""
    out = []
    for r in store.rounds.committed():
        s = store.rounds.scores(r)
        has = store.usable_mask() & np.isfinite(s["calibrated_dice"])
        dice = s["calibrated_dice"][has]
        f = {k: s[k][has] for k in ("agreement", "consistency", "confidence", "compactness")}
        candidates = {
            **f,
            "-entropy": -s["entropy"][has],
            "confidence*compactness": f["confidence"] * f["compactness"],
            "agreement*confidence*compactness": f["agreement"] * f["confidence"] * f["compactness"],
            "reliability (confidence*compactness*consistency)": s["reliability"][has],
        }
        out.append({"round": r, "spearman": {k: spearman(v, dice) for k, v in candidates.items()}})
    return out


if __name__ == "__main__":
    main()
