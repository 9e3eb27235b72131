"""The dashboard's figures (matplotlib's object API), drawn from what :mod:`caudo_ray.tracking.report_data` read.

Each view's function returns the PNG's bytes, or None where the run logged nothing for that view.
"""

from __future__ import annotations

import io
import math

import numpy as np
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import MaxNLocator

from caudo_ray.tracking import names
from caudo_ray.tracking.report_data import TUNE_PARAMS, TrainingRun, TuneSearch, stopped_early, trial_value

_DPI = 90


def _new_figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[MplFigure, np.ndarray]:
    # matplotlib.figure.Figure without pyplot: no global state, no GUI backend, safe in threads.
    fig = MplFigure(figsize=(width, height))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _png(fig: MplFigure) -> bytes:
    for ax in fig.axes:
        if ax.get_xlabel() == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def quality_figure(tr: TrainingRun) -> bytes | None:
    """Pseudo-label and validation Dice per round, and the calibration gain."""
    keys = [
        names.PSEUDO_DICE_INITIAL,
        names.PSEUDO_DICE_CALIBRATED,
        names.VAL_DICE,
    ]
    if not any(tr.metrics.get(k) for k in keys):
        return None
    fig, axes = _new_figure(10, 3.2, ncols=2)
    ax = axes[0, 0]
    for key, label in zip(
        keys,
        [
            "initial pseudo labels",
            "calibrated pseudo labels",
            "segmenter on validation",
        ],
    ):
        steps, values = tr.series(key)
        if steps:
            ax.plot(steps, values, marker="o", label=label)
    ax.set(title="Dice per round", xlabel="round", ylabel="Dice")
    ax.legend(fontsize=8)
    ax = axes[0, 1]
    steps, gains = tr.series(names.CALIBRATION_GAIN)
    ax.bar(steps, gains, color=["tab:green" if g >= 0 else "tab:red" for g in gains])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(
        title="calibration gain (calibrated - initial Dice)",
        xlabel="round",
        ylabel="Dice gain",
    )
    return _png(fig)


def annotations_figure(tr: TrainingRun) -> bytes | None:
    """Validation Dice of each round's segmenter against the answered queries it trained on."""
    made = dict(tr.metrics.get(names.ANNOTATIONS, []))
    # Rounds' segmenters, then the final one (its step is the number of rounds, its Dice final/val_dice).
    val = dict(tr.metrics.get(names.VAL_DICE, [])) | dict(tr.metrics.get(f"{names.FINAL_VAL_PREFIX}dice", []))
    final = max(dict(tr.metrics.get(f"{names.FINAL_VAL_PREFIX}dice", [])), default=None)
    steps = sorted(set(made) & set(val))
    if not steps or not any(made.values()):
        return None
    fig, axes = _new_figure(5.5, 3.2)
    ax = axes[0, 0]
    x, y = [made[r] for r in steps], [val[r] for r in steps]
    ax.plot(x, y, marker="o")
    for r, xi, yi in zip(steps, x, y):
        ax.annotate(
            "final" if r == final else f"round {r}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7
        )
    ax.set(title="segmenter on validation against annotations made", xlabel="annotations in use", ylabel="val Dice")
    return _png(fig)


def selection_figure(tr: TrainingRun) -> bytes | None:
    """Selected fraction per round, and the pool's reliability quantiles and accepted calibrations."""
    steps, fractions = tr.series(names.SELECTED_FRACTION)
    if not steps:
        return None
    fig, axes = _new_figure(10, 3.2, ncols=2)
    ax = axes[0, 0]
    ax.bar(steps, fractions, color="tab:blue")
    _, counts = tr.series(names.SELECTED)
    for s, f, n in zip(steps, fractions, counts):
        ax.annotate(f"{int(n)}", (s, f), ha="center", va="bottom", fontsize=8)
    ax.set(
        title="selected for the next round (count on bars)",
        xlabel="round",
        ylabel="fraction of pool",
        ylim=(0, 1.1),
    )
    ax = axes[0, 1]
    for key in (
        names.RELIABILITY_P10,
        names.RELIABILITY_P50,
        names.RELIABILITY_MEAN,
        names.AGREEMENT_MEAN,
        names.ACCEPTED_FRACTION,
    ):
        s, v = tr.series(key)
        if s:
            ax.plot(s, v, marker="o", label=key.split("/", 1)[1])
    ax.set(title="reliability of the pool, calibrations accepted", xlabel="round", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    return _png(fig)


def reliability_figure(tr: TrainingRun) -> bytes | None:
    """Reliability against true Dice per case, for the last four rounds whose pool has hidden truth."""
    rounds = [r for r in sorted(tr.tables) if any(v is not None for v in tr.tables[r].get("calibrated_dice", []))]
    if not rounds:
        return None
    rounds = rounds[-4:]
    fig, axes = _new_figure(3.4 * len(rounds) + 0.6, 3.4, ncols=len(rounds))
    for ax, r in zip(axes[0], rounds):
        t = tr.tables[r]
        rel = np.array([np.nan if v is None else v for v in t["reliability"]], dtype=float)
        dice = np.array([np.nan if v is None else v for v in t["calibrated_dice"]], dtype=float)
        chosen = np.array(t["selected"], dtype=bool)
        ok = np.isfinite(rel) & np.isfinite(dice)
        ax.scatter(
            rel[ok & ~chosen],
            dice[ok & ~chosen],
            s=12,
            alpha=0.6,
            color="tab:gray",
            label="not selected",
        )
        ax.scatter(
            rel[ok & chosen],
            dice[ok & chosen],
            s=12,
            alpha=0.8,
            color="tab:blue",
            label="selected",
        )
        rho = dict(tr.metrics.get(names.RELIABILITY_SPEARMAN, [])).get(r)
        title = f"round {r}" + (f" (Spearman {rho:.2f})" if rho is not None else "")
        ax.set(
            title=title,
            xlabel="reliability",
            ylabel="true Dice (calibrated)",
            xlim=(0, 1.02),
            ylim=(0, 1.02),
        )
        ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


_GALLERY_CELLS = ("changed_fraction", "reliability", "initial_dice", "calibrated_dice")


def gallery_figure(tr: TrainingRun, group: str) -> bytes | None:
    """The gallery round's ``group`` cases: image, initial and calibrated label, with their scores."""
    entries = tr.gallery.get(group, [])
    if not entries:
        return None
    table = tr.tables[tr.gallery_round]
    row_of = {cid: i for i, cid in enumerate(table["case_id"])}
    ncols = 2
    nrows = math.ceil(len(entries) / ncols)
    fig, axes = _new_figure(10, 2.0 * nrows + 0.4, ncols=ncols, nrows=nrows)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (entry, panel) in zip(axes.flat, entries):
        i = row_of.get(entry["case_id"])
        cell = {name: (table[name][i] if i is not None and name in table else None) for name in _GALLERY_CELLS}
        parts = [entry["case_id"]]
        if cell["changed_fraction"] is not None:
            parts.append(f"changed {cell['changed_fraction']:.0%}")
        if cell["reliability"] is not None:
            parts.append(f"rel {cell['reliability']:.2f}")
        if cell["initial_dice"] is not None and cell["calibrated_dice"] is not None:
            parts.append(f"Dice {cell['initial_dice']:.2f}->{cell['calibrated_dice']:.2f}")
        ax.imshow(panel, interpolation="nearest")
        ax.set_title("  ".join(parts), fontsize=8)
    fig.suptitle(
        f"round {tr.gallery_round}, {group.replace('_', ' ')}: image | initial | calibrated",
        fontsize=10,
    )
    return _png(fig)


def throughput_figure(tr: TrainingRun) -> bytes | None:
    """Labelling throughput, time per case by stage, and training time, per round."""
    steps, rate = tr.series(names.CASES_PER_S)
    stages = [
        (names.INFER_S_PER_CASE, "segmenter"),
        (names.DDIM_S_PER_CASE, "DDIM"),
        (names.SCORE_S_PER_CASE, "scores"),
        (names.STORE_S_PER_CASE, "store write"),
    ]
    if not steps and not any(tr.metrics.get(k) for k, _ in stages):
        return None
    fig, axes = _new_figure(12, 3.2, ncols=3)
    axes[0, 0].plot(steps, rate, marker="o")
    axes[0, 0].set(title="labelling throughput", xlabel="round", ylabel="cases / s")
    ax = axes[0, 1]
    bottom: dict[int, float] = {}
    for key, label in stages:
        s, v = tr.series(key)
        ax.bar(
            s,
            [x * 1000 for x in v],
            bottom=[bottom.get(i, 0.0) for i in s],
            label=label,
        )
        for i, x in zip(s, v):
            bottom[i] = bottom.get(i, 0.0) + x * 1000
    ax.set(
        title="time per case by stage (summed over workers)",
        xlabel="round",
        ylabel="ms / case",
    )
    ax.legend(fontsize=8)
    s, v = tr.series(names.TRAIN_S)
    axes[0, 2].bar(s, v, color="tab:purple")
    axes[0, 2].set(title="training time per round", xlabel="round", ylabel="s")
    return _png(fig)


def tune_figure(search: TuneSearch) -> bytes | None:
    """The trials' objective against w and s (and DDIM steps where they vary); the chosen trial starred."""
    points = []
    for trial in search.trials:
        values = {name: trial_value(trial, key) for name, key in TUNE_PARAMS.items()}
        values["objective"] = trial.data.metrics.get(names.METRIC_OBJECTIVE)
        if all(values[k] is not None for k in ("objective", "w", "s")):
            points.append((trial, values))
    if not points:
        return None
    axes_of = [("w", "guidance strength w", "s"), ("s", "calibration strength s", "w")]
    if len({v["steps"] for _, v in points}) > 1:
        axes_of.append(("steps", "DDIM steps", "w"))
    best = search.best_trial()
    fig, axes = _new_figure(4.4 * len(axes_of), 3.4, ncols=len(axes_of))
    colour_range = {k: (min(v[k] for _, v in points), max(v[k] for _, v in points)) for k in ("w", "s")}
    for ax, (name, label, colour_by) in zip(axes[0], axes_of):
        lo, hi = colour_range[colour_by]
        for stopped, marker, legend in (
            (False, "o", "evaluated fully"),
            (True, "X", "stopped early (ASHA)"),
        ):
            group = [v for t, v in points if stopped_early(t) == stopped]
            if group:
                sc = ax.scatter(
                    [v[name] for v in group],
                    [v["objective"] for v in group],
                    c=[v[colour_by] for v in group],
                    cmap="viridis",
                    vmin=lo,
                    vmax=hi,
                    s=36,
                    marker=marker,
                    label=legend,
                )
        if best is not None and names.METRIC_OBJECTIVE in best.data.metrics:
            ax.scatter(
                [trial_value(best, TUNE_PARAMS[name])],
                [best.data.metrics[names.METRIC_OBJECTIVE]],
                marker="*",
                s=260,
                facecolors="none",
                edgecolors="red",
                label="chosen",
            )
        fig.colorbar(sc, ax=ax, label=colour_by)
        ax.set(title=f"objective vs {name}", xlabel=label, ylabel=names.METRIC_OBJECTIVE)
        ax.legend(fontsize=7)
    return _png(fig)
