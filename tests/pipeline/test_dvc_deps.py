"""dvc.yaml lists, for each stage, every project module the stage's code imports (directly or
through other project modules, at any depth, function-level imports included), so that a
change to any of them re-runs the stage. Read from the source with `ast`, never by importing.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "serving")


def module_file(name: str) -> Path:
    path = ROOT / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_modules(path: Path) -> Set[str]:
    """Project modules named by import statements in `path` (`from pkg import mod` too)."""
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES and module_file(name).is_file():
                found.add(name)
    return found


def closure(module: str) -> Set[str]:
    seen: Set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(module_file(name)) - seen)
    return seen


def stage_modules() -> Dict[str, str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        parts = stage["cmd"].split()
        assert parts[:2] == ["python", "-m"], f"stage {name}: not `python -m MODULE`"
        out[name] = parts[2]
    return out


@pytest.mark.parametrize("stage", sorted(stage_modules()))
def test_every_imported_project_module_is_a_dependency(stage):
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    listed = {d for d in deps if isinstance(d, str)}
    needed = {str(module_file(m).relative_to(ROOT)) for m in closure(stage_modules()[stage])}
    # Package __init__ files are docstrings only; they change nothing a stage computes.
    needed = {p for p in needed if not p.endswith("__init__.py")}
    assert sorted(needed - listed) == [], f"add to dvc.yaml stage {stage}'s deps"


def test_the_walker_follows_imports_through_other_modules():
    # serving.runner imports serving.tokenization, which export does not import directly.
    assert "serving.tokenization" in closure("pipeline.validate")
    assert "serving.model_dir" in closure("pipeline.export")
