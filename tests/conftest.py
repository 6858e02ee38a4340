"""Shared fixtures: the smoke-profile workspace, built once per test session with a real
`dvc repro`, and a helper to run a stage the way DVC does (a fresh process)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

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


@pytest.fixture(scope="session")
def model_dir(request) -> Path:
    """The smoke model; TOKENMETER_TEST_MODEL_DIR reuses one already built (saves a minute)."""
    given = os.environ.get("TOKENMETER_TEST_MODEL_DIR")
    if given:
        return Path(given)
    return request.getfixturevalue("smoke_ws") / "models" / "sentiment" / "1"


def _container_engine_problem() -> str:
    """Why the `container` tests cannot run here ('' when they can). Building the debian base
    needs root; an image built before (TOKENMETER_TEST_IMAGE) needs only an engine to run."""
    if not os.environ.get("TOKENMETER_TEST_IMAGE") and os.geteuid() != 0:
        return "building the debian base needs root (debootstrap, chroot)"
    from image.engine import EngineError, detect

    try:
        detect()
    except EngineError as exc:
        return str(exc)
    return ""


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


def pytest_collection_modifyitems(config, items):
    online = [item for item in items if item.get_closest_marker("network")]
    problem = _index_problem() if online else ""
    if problem:
        skip = pytest.mark.skip(reason=f"needs the package index: {problem}")
        for item in online:
            item.add_marker(skip)
    marked = [item for item in items if item.get_closest_marker("container")]
    if not marked:
        return
    problem = _container_engine_problem()
    if problem:
        skip = pytest.mark.skip(reason=f"container tests need a container engine: {problem}")
        for item in marked:
            item.add_marker(skip)
