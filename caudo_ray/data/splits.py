"""Group-wise split of a dataset into exemplar(s), pool, validation and test: predefined or drawn by seed."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from caudo_ray.data.dataset import SPLIT_SETS, DatasetIndex
from caudo_ray.errors import DataError


@dataclass
class Split:
    """Which case plays which role in a run.

    Attributes:
        exemplars: labelled case ids the segmenter is trained on first (the labelled set).
        pool: the rest of the training groups' labelled cases (their masks are hidden truth, for benchmarks
            only) plus every unlabelled case.
        val: labelled case ids for validation (may be empty: validation is optional).
        test: labelled case ids for testing.
        seed: the seed the split (or, with a predefined split, the labelled set) was drawn with.
        group_column: the meta.csv column the groups came from (None: each file its own group).
        labelled_groups: the groups whose every labelled case is an exemplar, when the labelled set was given
            or drawn by group ("1 case" = one patient); empty when exemplars are single cases.
        split_source: the file a predefined split came from (meta.csv or a datalist); None: drawn by seed.
    """

    exemplars: list[str]
    pool: list[str]
    val: list[str]
    test: list[str]
    seed: int
    group_column: str | None
    labelled_groups: list[str] = field(default_factory=list)
    split_source: str | None = None

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> Split:
        """Read a split written by :meth:`to_json` (files written before ``labelled_groups`` existed included).

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
                labelled_groups=list(d.get("labelled_groups") or []),
                split_source=d.get("split_source"),
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DataError(str(path), f"not a readable split file ({type(exc).__name__}: {exc})") from None


def make_split(
    index: DatasetIndex,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    exemplars: list[str] | None = None,
    num_exemplars: int = 1,
    labelled_groups: list[str] | None = None,
    num_labelled_groups: int | None = None,
) -> Split:
    """Split the labelled groups into train / val / test and pick the labelled set (exemplars) from train.

    The sets: with a predefined split (``index.predefined``, from meta.csv's split column or a datalist) each
    labelled case goes to the set it names and the fractions are ignored; the train and test sets must not be
    empty, the validation set may be (validation is optional), and a group may not have cases in two sets.
    Without one, groups are shuffled with ``seed`` and dealt to test, then val, until each holds at least its
    fraction of the labelled cases; the remaining groups are training groups, and groups holding a requested
    exemplar or labelled group are always training groups. Unlabelled cases always join the pool.

    The labelled set, chosen one way only: ``exemplars`` by case id (used as given); ``labelled_groups`` (every
    labelled training case of these groups, empty masks included); ``num_labelled_groups`` training groups
    drawn with ``seed``; or else ``num_exemplars`` cases drawn with ``seed`` from the training cases (the
    default, 1: one slice, the one-shot setting). Whether the set holds any foreground is checked once its
    masks are read (:func:`~caudo_ray.data.dataset.check_exemplar_set`).

    Raises:
        DataError: naming the ``split.*`` key for unknown, unlabelled or non-training exemplar ids or groups,
            two ways of choosing the labelled set, too few groups for the requested fractions, or too few
            training cases or groups for the requested count; naming the predefined split's file for an
            empty train or test set, or a group split across sets.
    """
    by_id = index.by_id()
    if not index.labelled:
        raise DataError(str(index.root), "no labelled cases: a split needs images with masks")
    given = {"exemplars": exemplars, "labelled_groups": labelled_groups, "num_labelled_groups": num_labelled_groups}
    ways = [name for name, value in given.items() if value is not None]
    if len(ways) > 1:
        raise DataError(f"split.{ways[1]}", f"contradicts split.{ways[0]}: choose the labelled set one way")
    group_cases: dict[str, list[str]] = defaultdict(list)
    for ref in index.labelled:
        group_cases[ref.group].append(ref.case_id)
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
    elif labelled_groups is not None:
        if not labelled_groups:
            raise DataError("split.labelled_groups", "must name at least one group")
        if len(set(labelled_groups)) != len(labelled_groups):
            raise DataError("split.labelled_groups", f"groups repeat: {labelled_groups}")
        for group in labelled_groups:
            if group not in group_cases:
                where = f"meta.csv column {index.group_column!r}" if index.group_column else "the file stems (no group column in use)"
                raise DataError("split.labelled_groups", f"no labelled case of {index.root} is in group {group!r} (groups from {where})")
    elif num_labelled_groups is not None:
        if num_labelled_groups < 1:
            raise DataError("split.num_labelled_groups", f"must be >= 1, got {num_labelled_groups}")
    elif num_exemplars < 1:
        raise DataError("split.num_exemplars", f"must be >= 1, got {num_exemplars}")

    forced = {by_id[c].group for c in exemplars or []} | set(labelled_groups or [])
    if index.predefined is not None:
        train_cases, val, test = _predefined_sets(index)
        _check_labelled_set_in_train(index, set(train_cases), exemplars, labelled_groups)
    else:
        train_cases, val, test = _seeded_sets(index, group_cases, forced, seed, val_fraction, test_fraction)
    train_groups = sorted({by_id[c].group for c in train_cases})

    chosen_groups: list[str] = []
    if exemplars is not None:
        chosen = list(exemplars)
    elif labelled_groups is not None or num_labelled_groups is not None:
        if labelled_groups is not None:
            chosen_groups = list(labelled_groups)
        else:
            if num_labelled_groups > len(train_groups):
                raise DataError("split.num_labelled_groups", f"{num_labelled_groups} groups asked but the training set holds {len(train_groups)} groups")
            # Its own seed stream, so the labelled groups do not move when the sets or num_exemplars change.
            picks = np.random.default_rng([seed, 2]).choice(len(train_groups), size=num_labelled_groups, replace=False)
            chosen_groups = sorted(train_groups[i] for i in picks.tolist())
        wanted = set(chosen_groups)
        chosen = [c for c in train_cases if by_id[c].group in wanted]
    else:
        if num_exemplars > len(train_cases):
            raise DataError("split.num_exemplars", f"{num_exemplars} exemplars asked but the training groups hold {len(train_cases)} labelled cases")
        # A seed stream separate from the group shuffle, so changing num_exemplars does not move groups.
        picks = np.random.default_rng([seed, 1]).choice(len(train_cases), size=num_exemplars, replace=False)
        chosen = [train_cases[i] for i in sorted(picks.tolist())]
    chosen_set = set(chosen)
    pool = [c for c in train_cases if c not in chosen_set] + [ref.case_id for ref in index.unlabelled]
    return Split(
        exemplars=chosen,
        pool=sorted(pool),
        val=val,
        test=test,
        seed=seed,
        group_column=index.group_column,
        labelled_groups=chosen_groups,
        split_source=index.split_source if index.predefined is not None else None,
    )


def _seeded_sets(
    index: DatasetIndex, group_cases: dict[str, list[str]], forced: set[str], seed: int, val_fraction: float, test_fraction: float
) -> tuple[list[str], list[str], list[str]]:
    """(train, val, test) labelled case ids, sorted, from groups shuffled with ``seed``."""
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
    return (
        sorted(c for g in train_groups for c in group_cases[g]),
        sorted(c for g in val_groups for c in group_cases[g]),
        sorted(c for g in test_groups for c in group_cases[g]),
    )


def _predefined_sets(index: DatasetIndex) -> tuple[list[str], list[str], list[str]]:
    """(train, val, test) labelled case ids, sorted, as ``index.predefined`` names them.

    Raises:
        DataError: naming the split's file: an empty train or test set, or a group with cases in two sets.
    """
    source = index.split_source or str(index.root)
    predefined = index.predefined or {}
    sets: dict[str, list[str]] = {role: [] for role in SPLIT_SETS}
    group_roles: dict[str, dict[str, str]] = defaultdict(dict)
    for ref in index.labelled:
        role = predefined.get(ref.case_id)
        if role is None:
            continue  # reported while indexing: left out of every set
        sets[role].append(ref.case_id)
        group_roles[ref.group].setdefault(role, ref.case_id)
    for role, name in (("train", "train"), ("test", "test")):
        if not sets[role]:
            raise DataError(source, f"the predefined split leaves the {name} set empty ({len(index.labelled)} labelled cases in the folder)")
    for group, roles in sorted(group_roles.items()):
        if len(roles) > 1:
            examples = ", ".join(f"{case} in {role}" for role, case in sorted(roles.items()))
            raise DataError(source, f"group {group!r} has cases in more than one set ({examples}); a group stays on one side of a split")
    return sorted(sets["train"]), sorted(sets["val"]), sorted(sets["test"])


def _check_labelled_set_in_train(index: DatasetIndex, train: set[str], exemplars: list[str] | None, labelled_groups: list[str] | None) -> None:
    """A predefined split cannot be bent to keep the labelled set in training: refuse one outside it."""
    predefined = index.predefined or {}
    source = index.split_source or str(index.root)
    for case_id in exemplars or []:
        if case_id not in train:
            where = predefined.get(case_id)
            placed = f"in the {where} set" if where else "in no set"
            raise DataError("split.exemplars", f"case {case_id!r} is {placed} of the predefined split ({source}); exemplars come from the train set")
    for group in labelled_groups or []:
        cases = [ref.case_id for ref in index.labelled if ref.group == group]
        if not any(case_id in train for case_id in cases):
            placed = sorted({predefined.get(case_id, "none") for case_id in cases})
            raise DataError(
                "split.labelled_groups",
                f"group {group!r} has no case in the train set of the predefined split ({source}; its sets: {', '.join(placed)}); labelled groups come from the train set",
            )


def _deal(order: list[str], group_cases: dict[str, list[str]], target: float) -> tuple[list[str], list[str]]:
    """Take groups from the front of ``order`` until they hold at least ``round(target)`` cases (>= 1 if target > 0)."""
    want = max(round(target), 1) if target > 0 else 0
    taken: list[str] = []
    count = 0
    while count < want and len(taken) < len(order):
        taken.append(order[len(taken)])
        count += len(group_cases[taken[-1]])
    return taken, order[len(taken):]
