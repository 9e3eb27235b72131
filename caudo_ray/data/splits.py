"""Group-wise, seeded split of a dataset into exemplar(s), pool, validation and test."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from caudo_ray.data.dataset import DatasetIndex
from caudo_ray.errors import DataError


@dataclass
class Split:
    """Which case plays which role in a run.

    Attributes:
        exemplars: labelled case ids the segmenter is trained on first.
        pool: the rest of the training groups' labelled cases (their masks are hidden truth, for benchmarks
            only) plus every unlabelled case.
        val: labelled case ids for validation.
        test: labelled case ids for testing.
        seed: the seed the split was drawn with.
        group_column: the meta.csv column the groups came from (None: each file its own group).
    """

    exemplars: list[str]
    pool: list[str]
    val: list[str]
    test: list[str]
    seed: int
    group_column: str | None

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> Split:
        """Read a split written by :meth:`to_json`.

        Raises:
            DataError: the file is missing or not a split.
        """
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            return cls(
                exemplars=list(d["exemplars"]),
                pool=list(d["pool"]),
                val=list(d["val"]),
                test=list(d["test"]),
                seed=int(d["seed"]),
                group_column=d["group_column"],
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(str(path), f"not a readable split file ({type(exc).__name__}: {exc})") from None


def make_split(
    index: DatasetIndex,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    exemplars: list[str] | None = None,
    num_exemplars: int = 1,
) -> Split:
    """Split the labelled groups into train / val / test and pick the exemplars from train.

    Groups are shuffled with ``seed`` and dealt to test, then val, until each holds at least its fraction of the
    labelled cases; the remaining groups are training groups. Groups holding a requested exemplar are always
    training groups. Exemplars given by id are used as given (``num_exemplars`` is then ignored); otherwise
    ``num_exemplars`` are drawn with ``seed`` from the training groups' labelled cases.

    Raises:
        DataError: unknown or unlabelled exemplar ids, too few groups for the requested fractions (naming
            ``split.val_fraction`` / ``split.test_fraction``), or too few training cases for ``num_exemplars``.
    """
    by_id = index.by_id()
    if not index.labelled:
        raise DataError(str(index.root), "no labelled cases: a split needs images with masks")
    if exemplars is not None:
        if not exemplars:
            raise DataError("split.exemplars", "must name at least one case id")
        for case_id in exemplars:
            if case_id not in by_id:
                raise DataError("split.exemplars", f"unknown case id {case_id!r} in {index.root}")
            if not by_id[case_id].labelled:
                raise DataError("split.exemplars", f"case {case_id!r} has no mask; an exemplar must be labelled")
        if len(set(exemplars)) != len(exemplars):
            raise DataError("split.exemplars", f"case ids repeat: {exemplars}")
    elif num_exemplars < 1:
        raise DataError("split.num_exemplars", f"must be >= 1, got {num_exemplars}")

    group_cases: dict[str, list[str]] = defaultdict(list)
    for ref in index.labelled:
        group_cases[ref.group].append(ref.case_id)
    forced = {by_id[c].group for c in exemplars or []}
    free = sorted(g for g in group_cases if g not in forced)
    order = [free[i] for i in np.random.default_rng(seed).permutation(len(free))]

    # One training group is always kept back so too few groups surface as an empty val/test set, by name.
    reserve = order[-1:] if not forced else []
    order = order[: len(order) - len(reserve)]
    total = len(index.labelled)
    test_groups, order = _deal(order, group_cases, test_fraction * total)
    val_groups, train_groups = _deal(order, group_cases, val_fraction * total)
    train_groups = sorted(set(train_groups) | set(reserve) | forced)
    if test_fraction > 0 and not test_groups:
        raise DataError("split.test_fraction", f"{test_fraction} leaves the test set empty: only {len(group_cases)} labelled groups")
    if val_fraction > 0 and not val_groups:
        raise DataError("split.val_fraction", f"{val_fraction} leaves the validation set empty: only {len(group_cases)} labelled groups")
    train_cases = sorted(c for g in train_groups for c in group_cases[g])

    if exemplars is None:
        if num_exemplars > len(train_cases):
            raise DataError("split.num_exemplars", f"{num_exemplars} exemplars asked but the training groups hold {len(train_cases)} labelled cases")
        # A seed stream separate from the group shuffle, so changing num_exemplars does not move groups.
        picks = np.random.default_rng([seed, 1]).choice(len(train_cases), size=num_exemplars, replace=False)
        chosen = [train_cases[i] for i in sorted(picks.tolist())]
    else:
        chosen = list(exemplars)
    chosen_set = set(chosen)
    pool = [c for c in train_cases if c not in chosen_set] + [ref.case_id for ref in index.unlabelled]
    return Split(
        exemplars=chosen,
        pool=sorted(pool),
        val=sorted(c for g in val_groups for c in group_cases[g]),
        test=sorted(c for g in test_groups for c in group_cases[g]),
        seed=seed,
        group_column=index.group_column,
    )


def _deal(order: list[str], group_cases: dict[str, list[str]], target: float) -> tuple[list[str], list[str]]:
    """Take groups from the front of ``order`` until they hold at least ``round(target)`` cases (>= 1 if target > 0)."""
    want = max(int(round(target)), 1) if target > 0 else 0
    taken: list[str] = []
    count = 0
    while count < want and len(taken) < len(order):
        taken.append(order[len(taken)])
        count += len(group_cases[taken[-1]])
    return taken, order[len(taken):]
