"""Calibration and reliability ablations on a finished run: what docs/method.md quotes, reproducible.

Given the work dir of a calibrated run whose pool carries hidden truth (e.g. a ``caudo`` run of
``benchmarks/accuracy.py``), it labels ``--cases`` pool cases with hidden truth (evenly spread over the pool) with
round r's models, exactly as that round's calibration workers did, and compares on the same initial labels:

- **calibration gates**: how much of the calibrator's change each case keeps
  (:func:`caudo_ray.calibration.sampling.gate_calibration`): none (every change applied), the per-pixel
  uncertainty gate alone, and the per-pixel gate together with case gates over a grid of reliability bounds;
- **calibrator variants** (``--variants``): the round-0 calibrator as the run uses it, fine-tuned on exemplar
  views with round r's segmenter, and fine-tuned with round r-1's selected pseudo labels as further pairs;
- **label rules** (round-0 calibrator): what a label keeps of its calibration, from none (the initial label, or
  the average of the segmenter's two views) through the gate, arbitration and the class-presence rule (together
  the default) to candidates that give the calibrator less say, each against the initial labels' Dice; then what
  arbitration forbids: candidates that let a confident calibrated class (top probability >= each of
  ``CONFIDENT_ADD``) overrule the two views where they agree, with and without the class-presence rule, one that
  also lets the calibrator decide where round r-1's segmenter disagrees with round r's (round >= 1), and the
  oracle bound (the agreed pixels take the calibrated class only where the truth has it);
- **presence flips**: per class, the cases where the gated, arbitrated calibration adds a class the label lacked
  or erases one it had, how often the truth agrees, and how much of the labels' Dice change they account for;
- **where calibration loses**: in the pixels the segmenter's two views dispute (the only ones arbitration lets
  the calibrator decide), how often the initial label, the mirrored view and the calibrated map are right, and
  per class how far calibration moves the predicted area against the true one (a calibrator with a wrong prior
  shows as a class drift);
- **registration** (``--registration``, :mod:`caudo_ray.registration`): the exemplars registered onto the cases
  (affine from several starts, then deformable), their warped labels' Dice, rules where the warped label must
  confirm the calibrated class, and for every committed round how the kept labels' agreement with the warped
  labels (a signal no segmenter drew) tracks their true Dice;
- **volume context** (datasets whose meta.csv or NIfTI files give volumes): rules where the kept labels of the
  case's adjacent slices must confirm the calibrated class;
- **reliability factors**: for every committed round, the Spearman correlation of each factor of the reliability
  score (and of the combinations considered) with the true Dice of the stored labels; and on the sampled cases'
  initial labels, each factor's and two candidates': the label's *self-Dice* (its soft Dice with the segmenter's
  own probabilities, the Dice it would score if the truth were drawn from them: low where much probability mass
  sits off the label, relative to the label's size) and the reliability times it.

Usage::

    python benchmarks/ablations.py --run-dir runs/accuracy-hc18-full/draw0/caudo --round 0 --out runs/ablations.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from caudo_ray.arrays import class_map
from caudo_ray.calibration.sampling import arbitrate, calibrate, gate_calibration, keep_class_presence
from caudo_ray.calibration.schedule import CalibrationSchedule
from caudo_ray.calibration.training import train_calibrator
from caudo_ray.config import load_config
from caudo_ray.labelling.engine import revert_less_reliable
from caudo_ray.labelling.reliability import ShapePrior, reliability_scores
from caudo_ray.metrics import dice, dice_per_case, spearman
from caudo_ray.networks.bundle import RoundModels, build_models
from caudo_ray.networks.segmenter import predict_tensor
from caudo_ray.registration import register_exemplars
from caudo_ray.rounds.steps import training_inputs
from caudo_ray.run.prepare import index_of
from caudo_ray.store import PseudoLabelStore
from caudo_ray.workspace import Workspace

# Case gates compared: a case of initial reliability <= lo keeps every change, >= hi only the per-pixel share.
CASE_BOUNDS = [(0.0, 0.0), (0.3, 0.6), (0.4, 0.7), (0.5, 0.8), (0.6, 0.9), (0.7, 1.0)]
_BATCH = 32
GATE_AND_ARBITRATION = "gate + arbitration"
# Confidence of the calibrated class above which the arbitration candidates let it overrule two agreeing views.
CONFIDENT_ADD = (0.8, 0.9, 0.95, 0.99)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="work dir of a finished calibrated run with hidden truth")
    p.add_argument("--round", type=int, default=0, help="round whose models label the cases")
    p.add_argument("--cases", type=int, default=300, help="pool cases with hidden truth to label, evenly spread")
    p.add_argument("--variants", action="store_true", help="also train and compare the calibrator variants (round >= 1)")
    p.add_argument("--finetune", type=int, default=400, help="denoiser fine-tuning iterations of the fine-tuned variants")
    p.add_argument("--registration", action="store_true", help="also register the exemplars onto the cases: their warped labels as a judge of the calibration, and as a drift signal across rounds")
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
    if not ws.model_path(r).is_file():
        raise SystemExit(f"--round {r}: no models of that round in {ws.models_dir}")
    if args.variants and r < 1:
        raise SystemExit("--variants compares calibrators fine-tuned on round r's segmenter: needs --round >= 1")
    store = PseudoLabelStore.open(ws.store_url, mode="r")
    with_truth = np.flatnonzero(store.usable_mask() & (store.read_truth() != 255).any(axis=(1, 2)))
    if not len(with_truth):
        raise SystemExit(f"{ws.store_url}: no pool case carries hidden truth")
    cases = with_truth[np.linspace(0, len(with_truth) - 1, min(args.cases, len(with_truth))).astype(int)]
    models = RoundModels.load(ws.model_path(r))
    device = torch.device("cpu")
    net, calib = build_models(cfg, models, device)
    x = torch.from_numpy(store.read_images(cases))[:, None]
    truth = store.read_truth(cases)
    with torch.no_grad():
        outs = [predict_tensor(net, x[i : i + _BATCH]) for i in range(0, len(x), _BATCH)]
        probs, feats = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        flipped = torch.cat([predict_tensor(net, x[i : i + _BATCH].flip(-1))[0].flip(-1) for i in range(0, len(x), _BATCH)])
    # Round r-1's segmenter on the same cases: where two rounds' models disagree is a second, label-free mark of
    # the errors the segmenter really makes.
    previous = None
    if r > 0:
        prev_net, _ = build_models(cfg, RoundModels.load(ws.model_path(r - 1)), device)
        with torch.no_grad():
            previous = torch.cat([predict_tensor(prev_net, x[i : i + _BATCH])[0] for i in range(0, len(x), _BATCH)])
    registered = None
    if args.registration:
        _, exemplar_images, exemplar_labels = store.exemplars()
        t0 = time.perf_counter()
        registration = register_exemplars(exemplar_images, exemplar_labels, x[:, 0].numpy(), store.num_classes)
        registered = torch.from_numpy(registration.probs)
        registration_s = time.perf_counter() - t0
    neighbours = adjacent_slice_labels(store, cfg, cases, r)
    p0, pf = probs.numpy(), flipped.numpy()
    initial = dice_per_case(p0.argmax(1).astype(np.uint8), truth, store.num_classes)
    prior = ShapePrior.from_dict(models.shape_prior) if models.shape_prior is not None else None
    initial_scores = reliability_scores(p0, p0, pf, prior)

    c = cfg.calibrator
    schedule = CalibrationSchedule(c.train_timesteps, c.inference_steps)
    variants = {"round-0 calibrator": (calib, 0.0)}
    if args.variants:
        inputs = training_inputs(store, r)
        for name, pseudo in (("fine-tuned on exemplar views", False), ("fine-tuned with pseudo pairs", True)):
            tuned = copy.deepcopy(calib)
            t0 = time.perf_counter()
            train_calibrator(
                tuned,
                lambda batch: predict_tensor(net, batch),
                inputs if pseudo else inputs.exemplars_only(),
                cfg=dataclasses.replace(c, denoiser_finetune_iterations=args.finetune),
                seg_cfg=cfg.segmenter,
                seed=cfg.seed * 1000 + r,
                warm_start=True,
            )
            variants[name] = (tuned, time.perf_counter() - t0)

    rows = []
    for name, (model, train_s) in variants.items():
        calibrated = torch.cat([
            calibrate(model, schedule, x[i : i + _BATCH], probs[i : i + _BATCH], feats[i : i + _BATCH], w=c.guidance_strength, s=c.calibration_strength)
            for i in range(0, len(x), _BATCH)
        ])
        rows += _gate_rows(name, train_s, probs, calibrated, initial_scores["reliability"], pf, prior, truth, initial, store.num_classes)
        if name == "round-0 calibrator":
            labels = _rule_labels(probs, calibrated, flipped, previous, registered, neighbours, initial_scores, c.gate, prior, truth)
            rules = [{"rule": rule, **_change(_dice(maps, truth, store.num_classes), initial)} for rule, maps in labels.items()]
            disputed = _disputed_pixels(probs, calibrated, flipped, truth, store.num_classes)
            veto = _veto_pixels(probs, calibrated, flipped, previous, truth)
            flips = _presence_flips(probs, labels[GATE_AND_ARBITRATION], truth, store.num_classes)
    report = {
        "run_dir": str(args.run_dir),
        "round": r,
        "cases": len(cases),
        "initial_dice": float(initial.mean()),
        "initial_reliability_spearman": spearman(initial_scores["reliability"], initial),
        "initial_signals": initial_signals(p0, initial_scores, initial),
        "gates": rows,
        "label_rules": rules,
        "disputed": disputed,
        "veto": veto,
        "presence_flips": flips,
        "reliability": reliability_factors(store),
    }
    if registered is not None:
        report["registration"] = {
            "seconds": registration_s,
            "dice": float(_dice(registered, truth, store.num_classes).mean()),
            "rounds": registration_agreement(store, cases, registration.labels, truth),
        }
    print(
        f"round {r}, {len(cases)} pool cases with hidden truth: initial Dice {initial.mean():.4f}, "
        f"Spearman(reliability, Dice) of the initial labels {report['initial_reliability_spearman']:.3f}"
    )
    print(f"{'calibrator':30s} {'gate':26s} {'Dice':>7s} {'gain':>8s} {'better':>7s} {'worse':>6s} {'worst':>7s} {'rel.rho':>7s} {'train s':>8s}")
    for row in rows:
        print(
            f"{row['calibrator']:30s} {row['gate']:26s} {row['dice']:7.4f} {row['gain']:+8.4f} {row['better']:7.2f} "
            f"{row['worse']:6.2f} {row['worst_case_change']:+7.3f} {row['reliability_spearman']:7.3f} {row['train_s']:8.0f}"
        )
    print(f"\n{'label rule (round-0 calibrator)':78s} {'Dice':>7s} {'gain':>8s} {'better':>7s} {'worse':>6s} {'worst':>7s}")
    for row in rules:
        print(f"{row['rule']:78s} {row['dice']:7.4f} {row['gain']:+8.4f} {row['better']:7.2f} {row['worse']:6.2f} {row['worst_case_change']:+7.3f}")
    print(
        f"\ndisputed pixels ({disputed['share']:.2%} of all): right in the initial label {disputed['right_initial']:.3f}, "
        f"the mirrored view {disputed['right_mirrored']:.3f}, the calibrated map {disputed['right_calibrated']:.3f}"
    )
    for name, row in veto.items():
        print(
            f"pixels where {name}: {row['share']:.2%} of all; the initial label is wrong on {row['initial_wrong']:.3f} of them "
            f"(elsewhere {row['initial_wrong_elsewhere']:.4f}); they hold {row['errors_held']:.3f} of the initial label's errors"
        )
    for k, row in disputed["classes"].items():
        print(f"class {k}: predicted area, calibrated / initial {row['calibrated_over_initial']:.3f}, truth / initial {row['truth_over_initial']:.3f}")
    print("\ngate + arbitration, classes it adds to or erases from a label (what the class-presence rule undoes):")
    for k, row in flips["classes"].items():
        print(
            f"class {k}: added in {row['added']} cases ({row['added_truth_absent']} where the truth has none), erased in "
            f"{row['erased']} ({row['erased_truth_present']} where the truth has it); Dice change "
            f"{row['gain_from_flips']:+.4f} from these cases, {row['gain_from_others']:+.4f} from the rest"
        )
    print(f"all classes: {flips['gain_from_flips']:+.4f} from presence flips, {flips['gain_from_others']:+.4f} from reshaping")
    if registered is not None:
        reg = report["registration"]
        print(f"\nexemplars registered onto the {len(cases)} cases in {reg['seconds']:.0f} s: their warped labels' Dice {reg['dice']:.4f}")
        for row in reg["rounds"]:
            print(
                f"round {row['round']} kept labels: Dice with the registered exemplar {row['agreement']:.4f}, true Dice "
                f"{row['dice']:.4f}, Spearman of the two over the cases {row['spearman']:.3f}"
            )
    print(f"round {r} initial labels, Spearman with true Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in report["initial_signals"].items()))
    for row in report["reliability"]:
        print(f"round {row['round']} Spearman with true Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in row["spearman"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return report


def _gate_rows(name, train_s, probs, calibrated, reliability, pf, prior, truth, initial, num_classes) -> list[dict[str, Any]]:
    """Dice of the labels each gate keeps, against the initial labels' Dice."""
    candidates: list[tuple[str, np.ndarray]] = [("none (all changes)", calibrated.numpy())]
    for lo, hi in CASE_BOUNDS:
        label = "pixel only" if lo == hi == 0.0 else f"pixel + case [{lo:.1f}, {hi:.1f}]"
        candidates.append((label, gate_calibration(probs, calibrated, torch.from_numpy(reliability), (lo, hi)).numpy()))
    rows = []
    for gate, maps in candidates:
        dice = dice_per_case(maps.argmax(1).astype(np.uint8), truth, num_classes)
        rel = reliability_scores(probs.numpy(), maps, pf, prior)["reliability"]
        rows.append({
            "calibrator": name,
            "gate": gate,
            **_change(dice, initial),
            "reliability_spearman": spearman(rel, dice),
            "train_s": train_s,
        })
    return rows


def _rule_labels(probs, calibrated, flipped, previous, registered, neighbours, initial_scores, gate, prior, truth) -> dict[str, torch.Tensor]:
    """The labels each rule keeps of one calibration, by rule, from no calibration to the submitted default, then
    what arbitration forbids: rules that let a confident calibration overrule the two views where they agree, the
    calibrator also deciding where round r-1's segmenter (``previous``, None in round 0) disagrees, rules where the
    exemplars registered onto the image (``registered``, or None) or the labels of the adjacent slices of its volume
    (``neighbours``, or None) must confirm the calibrated class, and the oracle bound of what the agreed pixels hold
    (the calibrated class taken only where the truth has it)."""
    before = torch.from_numpy(initial_scores["reliability"])
    gated = gate_calibration(probs, calibrated, before, gate) if gate is not None else calibrated
    arbitrated = arbitrate(probs, gated, flipped)
    default = keep_class_presence(probs, arbitrated)
    disputed = probs.argmax(1, keepdim=True) != flipped.argmax(1, keepdim=True)

    def reverted(maps: torch.Tensor) -> torch.Tensor:
        after = reliability_scores(probs.numpy(), maps.numpy(), flipped.numpy(), prior)
        return torch.from_numpy(revert_less_reliable(probs.numpy(), maps.numpy(), initial_scores, after)[0])

    a, q = probs.argmax(1, keepdim=True), calibrated.argmax(1, keepdim=True)
    moved = q != a

    def overruled(licence: torch.Tensor) -> torch.Tensor:
        """The default's arbitrated map, except that agreed pixels take the (unguarded) calibrated class where licensed."""
        return torch.where(~disputed & moved & licence, calibrated, arbitrated)

    def judged(judge_confirms: str, classes: torch.Tensor) -> dict[str, torch.Tensor]:
        """The two rules where an outside judge's ``classes`` must confirm the calibrated class (``judge_confirms``:
        the judge and its verb, as the rules' names read)."""
        confirmed = classes == q
        return {
            f"agreed pixels overruled where {judge_confirms} q, + class presence, reverted": reverted(keep_class_presence(probs, overruled(confirmed))),
            f"every pixel: q only where {judge_confirms} it, + class presence, reverted": reverted(
                keep_class_presence(probs, torch.where(moved & confirmed, calibrated, probs))
            ),
        }

    # Where both views agree, the calibration's own class, where it is at least this sure of it.
    top = calibrated.max(1, keepdim=True).values
    confident = {confidence: overruled(top >= confidence) for confidence in CONFIDENT_ADD}
    oracle = overruled(torch.from_numpy(np.asarray(truth, dtype=np.int64))[:, None] == q)
    extra = {}
    if previous is not None:
        rounds_dispute = disputed | (previous.argmax(1, keepdim=True) != a)
        extra["gate + arbitration over pixels the views or the rounds dispute, + class presence, reverted"] = reverted(
            keep_class_presence(probs, torch.where(rounds_dispute, gated, probs))
        )
    if registered is not None:
        extra["registered exemplar alone (no segmenter)"] = registered
        extra["initial and registered exemplar averaged, no calibration"] = (probs + registered) / 2
        extra |= judged("the registered exemplar confirms", registered.argmax(1, keepdim=True))
    if neighbours is not None:
        extra |= judged("the adjacent slices' labels confirm", neighbours)
    return {
        "initial label (no calibration)": probs,
        "mean of the two views (p + p_flip) / 2, no calibration": (probs + flipped) / 2,
        "calibrated everywhere (no gate, no arbitration)": calibrated,
        "gate alone": gated,
        GATE_AND_ARBITRATION: arbitrated,
        "gate + arbitration, disputed pixels by p + p_flip + 2 q": torch.where(disputed, probs + flipped + 2 * gated, probs),
        "class presence alone (no gate, no arbitration)": keep_class_presence(probs, calibrated),
        "gate + arbitration + class presence (the default)": default,
        "default, reverted where the case's reliability drops": reverted(default),
        **{f"agreed pixels overruled where q >= {c:g}, + class presence, reverted": reverted(keep_class_presence(probs, m)) for c, m in confident.items()},
        **{f"agreed pixels overruled where q >= {c:g}, no class presence, reverted": reverted(m) for c, m in confident.items()},
        **extra,
        "oracle: agreed pixels take q only where it is right, + class presence": keep_class_presence(probs, oracle),
        "oracle: agreed pixels take q only where it is right, no class presence": oracle,
    }


def _dice(maps: torch.Tensor, truth: np.ndarray, num_classes: int) -> np.ndarray:
    return dice_per_case(maps.argmax(1).numpy().astype(np.uint8), truth, num_classes)


def _change(dice: np.ndarray, initial: np.ndarray) -> dict[str, float]:
    """Mean Dice of labels and how it compares, case by case, with the initial labels' Dice."""
    return {
        "dice": float(dice.mean()),
        "gain": float(dice.mean() - initial.mean()),
        "better": float(np.mean(dice > initial + 0.01)),
        "worse": float(np.mean(dice < initial - 0.01)),
        "worst_case_change": float(np.min(dice - initial)),
    }


def _disputed_pixels(probs, calibrated, flipped, truth, num_classes) -> dict[str, Any]:
    """Who is right where the segmenter's two views disagree, and how calibration moves each class's area."""
    a, f, q = (m.argmax(1).numpy() for m in (probs, flipped, calibrated))
    t = np.asarray(truth)
    disputed = a != f
    n = max(int(disputed.sum()), 1)
    classes = {}
    for k in range(1, num_classes):
        area = max(int((a == k).sum()), 1)
        classes[str(k)] = {"calibrated_over_initial": float((q == k).sum() / area), "truth_over_initial": float((t == k).sum() / area)}
    return {
        "share": float(disputed.mean()),
        "right_initial": float((a == t)[disputed].sum() / n),
        "right_mirrored": float((f == t)[disputed].sum() / n),
        "right_calibrated": float((q == t)[disputed].sum() / n),
        "classes": classes,
    }


def _veto_pixels(probs, calibrated, flipped, previous, truth) -> dict[str, dict[str, float]]:
    """How wrong the initial label is where the raw (unguarded) calibration disagrees with it (what a label would
    lose in errors, and in right pixels, if those pixels taught nothing instead of being relabelled), where the
    views dispute, and where round r-1's segmenter (``previous``, None in round 0) disagrees."""
    a, f, q = (m.argmax(1).numpy() for m in (probs, flipped, calibrated))
    wrong = a != np.asarray(truth)
    masks = {
        "the calibration moves the label": q != a,
        "the calibration moves it and the views dispute": (q != a) & (a != f),
        "the views dispute": a != f,
    }
    if previous is not None:
        masks["round r-1's segmenter disagrees"] = previous.argmax(1).numpy() != a
        masks["the views or the rounds dispute"] = (a != f) | masks["round r-1's segmenter disagrees"]
    out = {}
    for name, m in masks.items():
        out[name] = {
            "share": float(m.mean()),
            "initial_wrong": float(wrong[m].mean()) if m.any() else float("nan"),
            "initial_wrong_elsewhere": float(wrong[~m].mean()) if (~m).any() else float("nan"),
            "errors_held": float((wrong & m).sum() / max(int(wrong.sum()), 1)),
        }
    return out


def _presence_flips(probs, calibrated, truth, num_classes) -> dict[str, Any]:
    """Per class, the cases where calibration adds or erases the class, and the mean Dice change they account for.

    Per-case Dice is the mean over foreground classes, so each class contributes its Dice change divided by the
    number of classes, averaged over all cases: the per-class parts sum to the labels' overall gain.
    """
    a, q = probs.argmax(1).numpy(), calibrated.argmax(1).numpy()
    t = np.asarray(truth)
    n, share = len(a), 1.0 / (num_classes - 1)
    classes, from_flips, from_others = {}, 0.0, 0.0
    for k in range(1, num_classes):
        in_a, in_q, in_t = ((m == k).any(axis=(1, 2)) for m in (a, q, t))
        before = np.array([dice(x == k, y == k) for x, y in zip(a, t)])
        after = np.array([dice(x == k, y == k) for x, y in zip(q, t)])
        change, flip = (after - before) * share, in_a != in_q
        classes[str(k)] = {
            "added": int((~in_a & in_q).sum()),
            "added_truth_absent": int((~in_a & in_q & ~in_t).sum()),
            "erased": int((in_a & ~in_q).sum()),
            "erased_truth_present": int((in_a & ~in_q & in_t).sum()),
            "gain_from_flips": float(change[flip].sum() / n),
            "gain_from_others": float(change[~flip].sum() / n),
        }
        from_flips += classes[str(k)]["gain_from_flips"]
        from_others += classes[str(k)]["gain_from_others"]
    return {"classes": classes, "gain_from_flips": from_flips, "gain_from_others": from_others}


def adjacent_slice_labels(store: PseudoLabelStore, cfg, cases: np.ndarray, r: int) -> torch.Tensor | None:
    """(n, 1, H, W) the class that the kept round-``r`` labels of each case's adjacent slices (the same volume, one
    position either side) agree on, -1 where they disagree or neither is labelled; None when the dataset records
    no volumes. The 2.5D context a 2D segmenter never sees: a structure continues from slice to slice."""
    refs = {ref.case_id: ref for ref in index_of(cfg, Path(cfg.data.path)).cases if ref.volume is not None and ref.slice_order is not None}
    if not refs:
        return None
    ids, done = store.case_ids, store.rounds.done(r)
    at = {(refs[c].volume, refs[c].slice_order): i for i, c in enumerate(ids) if c in refs and done[i]}
    pairs = [[at.get((refs[ids[i]].volume, refs[ids[i]].slice_order + d)) if ids[i] in refs else None for d in (-1, 1)] for i in cases]
    wanted = sorted({k for pair in pairs for k in pair if k is not None})
    kept = dict(zip(wanted, store.rounds.read(r, wanted)["calibrated"].astype(np.int64))) if wanted else {}
    out = np.full((len(cases), *store.working_size), -1, dtype=np.int64)
    for j, pair in enumerate(pairs):
        labels = [kept[k] for k in pair if k is not None]
        if len(labels) == 1:
            out[j] = labels[0]
        elif len(labels) == 2:
            out[j] = np.where(labels[0] == labels[1], labels[0], -1)
    return torch.from_numpy(out)[:, None]


def registration_agreement(store: PseudoLabelStore, cases: np.ndarray, registered: np.ndarray, truth: np.ndarray) -> list[dict]:
    """Per committed round, how far the kept labels of ``cases`` agree with the exemplars registered onto them (a
    signal no segmenter drew) against their true Dice: the mean of each, and their Spearman over the cases."""
    out = []
    for r in store.rounds.committed():
        kept = store.rounds.read(r, cases)["calibrated"]
        agreement = dice_per_case(kept, registered, store.num_classes)
        dice = dice_per_case(kept, truth, store.num_classes)
        out.append({"round": r, "agreement": float(agreement.mean()), "dice": float(dice.mean()), "spearman": spearman(agreement, dice)})
    return out


def self_dice(probs: np.ndarray) -> np.ndarray:
    """(N,) soft Dice of each (N, C, H, W) map's argmax label with its own probabilities, mean over foreground
    classes (a class absent from both counts 1)."""
    labels = class_map(probs)
    out = np.zeros((len(probs), probs.shape[1] - 1))
    for k in range(1, probs.shape[1]):
        mask = labels == k
        overlap = (probs[:, k] * mask).sum(axis=(1, 2))
        total = probs[:, k].sum(axis=(1, 2)) + mask.sum(axis=(1, 2))
        out[:, k - 1] = np.where(total > 0, 2 * overlap / np.maximum(total, 1e-8), 1.0)
    return out.mean(axis=1)


def initial_signals(probs: np.ndarray, scores: dict[str, np.ndarray], dice: np.ndarray) -> dict[str, float]:
    """Spearman(signal, true Dice) of the initial labels: the reliability, its factors, self-Dice, their product."""
    own = self_dice(probs)
    signals = {k: scores[k] for k in ("reliability", "confidence", "shape", "consistency")}
    signals |= {"self-Dice": own, "reliability x self-Dice": scores["reliability"] * own}
    return {k: spearman(v, dice) for k, v in signals.items()}


def reliability_factors(store: PseudoLabelStore) -> list[dict]:
    """Spearman(factor or combination, true calibrated Dice) per committed round."""
    out = []
    for r in store.rounds.committed():
        s = store.rounds.scores(r)
        has = store.usable_mask() & np.isfinite(s["calibrated_dice"])
        dice = s["calibrated_dice"][has]
        names = [k for k in ("agreement", "consistency", "confidence", "shape") if k in s and np.isfinite(s[k][has]).all()]
        candidates = {k: s[k][has] for k in names}
        candidates["-entropy"] = -s["entropy"][has]
        candidates["reliability"] = s["reliability"][has]
        out.append({"round": r, "spearman": {k: spearman(v, dice) for k, v in candidates.items()}})
    return out


if __name__ == "__main__":
    main()
