"""The package's imports run one way: each layer imports only layers below it, and nothing defers an import."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "caudo_ray"

# Bottom to top (docs/architecture.md). A module may import its own layer and the layers before it.
LAYERS = [
    {"errors", "config", "arrays"},
    {"transforms"},
    {"data", "workspace"},
    {"metrics"},
    {"store"},
    {"tracking"},
    {"networks"},
    {"deploy"},
    {"training"},
    {"calibration", "registration"},
    {"labelling"},
    {"rounds"},
    {"run"},
    {"distributed"},
    {"inference", "cli"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _unit(module: str) -> str:
    """``caudo_ray.store.rounds`` -> ``store``; ``caudo_ray`` itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("caudo_ray"):
            names = [node.module] if node.module != "caudo_ray" else [f"caudo_ray.{a.name}" for a in node.names]
            yield node, names
        elif isinstance(node, ast.Import):
            yield node, [a.name for a in node.names if a.name.startswith("caudo_ray")]


def test_every_unit_is_in_a_layer():
    units = {p.stem if p.parent == PACKAGE else p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py")}
    units -= {"__init__", "configs"}
    assert units <= set(RANK), f"not in a layer: {sorted(units - set(RANK))}"


def test_imports_run_one_way_and_at_module_level():
    wrong, deferred = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        for node, names in _imports(path):
            for name in names:
                if RANK.get(_unit(name), -1) > RANK.get(_unit(here), 99):
                    wrong.append(f"{here} imports {name}")
            if names and node.col_offset > 0:
                deferred.append(f"{here}:{node.lineno}")
    assert not wrong, wrong
    assert not deferred, f"imports deferred into functions: {deferred}"
