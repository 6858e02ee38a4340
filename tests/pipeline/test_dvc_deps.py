"""dvc.yaml lists, for each stage, every project module the stage's code imports (directly or
through other project modules, at any depth, function-level imports included), so that a
change to any of them re-runs the stage. Read from the source with `ast`, never by importing.
A stage that is a package (`python -m pipeline.benchmark`) is walked from its `__main__`, and
every module in its folder counts. Every listed project file must exist.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "serving")
# Programs a stage starts as subprocesses and measures: their code shapes its outputs too.
STARTED = {"benchmark": ("serving.__main__", "pipeline/benchmark/stage.py", '"-m", "serving"')}


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


def entry_module(name: str) -> str:
    """What `python -m NAME` runs: the module itself, or a package's `__main__`."""
    return f"{name}.__main__" if (ROOT / Path(*name.split("."))).is_dir() else name


def stage_modules() -> Dict[str, str]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        parts = stage["cmd"].split()
        assert parts[:2] == ["python", "-m"], f"stage {name}: not `python -m MODULE`"
        out[name] = entry_module(parts[2])
    return out


@pytest.mark.parametrize("stage", sorted(stage_modules()))
def test_every_imported_project_module_is_a_dependency(stage):
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    listed = {d for d in deps if isinstance(d, str)}
    needed = {str(module_file(m).relative_to(ROOT)) for m in closure(stage_modules()[stage])}
    entry = module_file(stage_modules()[stage])
    if entry.name == "__main__.py":
        # A stage package's every module counts, also those it runs as a subprocess (the
        # benchmark's naive server), which no import names.
        needed |= {str(p.relative_to(ROOT)) for p in entry.parent.glob("*.py")}
    if stage in STARTED:
        module, starter, command = STARTED[stage]
        assert command in (ROOT / starter).read_text(), f"{starter} no longer starts {module}"
        needed |= {str(module_file(m).relative_to(ROOT)) for m in closure(module)}
    # Package __init__ files are docstrings only; they change nothing a stage computes.
    needed = {p for p in needed if not p.endswith("__init__.py")}
    assert sorted(needed - listed) == [], f"add to dvc.yaml stage {stage}'s deps"


@pytest.mark.parametrize("stage", sorted(stage_modules()))
def test_every_listed_project_file_exists(stage):
    # A module moved or renamed leaves its old path behind in dvc.yaml otherwise.
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    missing = [d for d in deps if isinstance(d, str) and d.split("/")[0] in PACKAGES
               and not (ROOT / d).exists()]
    assert missing == [], f"dvc.yaml stage {stage} lists files that do not exist"


def test_a_package_stage_is_walked_from_its_main():
    # `python -m pipeline.benchmark` runs pipeline/benchmark/__main__.py, which imports the rest.
    assert stage_modules()["benchmark"] == "pipeline.benchmark.__main__"
    assert {"pipeline.benchmark.stage", "pipeline.benchmark.process"} <= \
        closure("pipeline.benchmark.__main__")


def test_the_walker_follows_imports_through_other_modules():
    # serving.runner imports serving.tokenization, which export does not import directly.
    assert "serving.tokenization" in closure("pipeline.validate")
    assert "serving.model_dir" in closure("pipeline.export")
