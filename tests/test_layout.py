"""The layering of SPEC.md §3, read from the imports themselves: generic code never names a built-in task,
training never reaches into evaluation or judges, and the data package has no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spo_ray"


def imports_of(path: Path) -> set[str]:
    """Every spo_ray module a file imports, at module level or inside functions (TYPE_CHECKING included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.startswith("spo_ray")}


def offenders(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    found = {}
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        bad = sorted(n for n in imports_of(path) if n.startswith(forbidden))
        if bad:
            found[str(path.relative_to(PACKAGE))] = bad
    return found


def test_generic_training_data_eval_and_rollout_code_never_imports_a_built_in_task():
    for folder in ("training", "data", "eval", "rollout", "losses", "models", "judges"):
        assert offenders(folder, ("spo_ray.tasks",)) == {}, folder


def test_training_never_imports_evaluation_judges_or_the_layers_above_it():
    above = ("spo_ray.eval", "spo_ray.judges", "spo_ray.iterative", "spo_ray.api", "spo_ray.commands")
    assert offenders("training", above) == {}


def test_the_losses_are_pure_math_that_import_no_other_spo_ray_layer():
    outside = {
        path: [name for name in names if not name.startswith("spo_ray.losses")]
        for path, names in offenders("losses", ("spo_ray.",)).items()
    }
    assert {path: names for path, names in outside.items() if names} == {}


def test_lower_layers_never_import_the_api_or_the_commands():
    for folder in ("losses", "data", "models", "rollout", "judges", "eval", "tasks"):
        assert offenders(folder, ("spo_ray.api", "spo_ray.commands", "spo_ray.cli")) == {}, folder


@pytest.mark.parametrize("package", ["data", "training", "losses", "rollout", "config"])
def test_a_package_has_no_import_cycle(package):
    modules = {p.stem: p for p in (PACKAGE / package).glob("*.py") if p.stem != "__init__"}
    edges = {
        name: {n.split(".")[2] for n in imports_of(path) if n.startswith(f"spo_ray.{package}.")}
        & modules.keys()
        for name, path in modules.items()
    }

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges[start])

    cycles = sorted(name for name in modules if reaches(name, name, {name}))
    assert cycles == []
