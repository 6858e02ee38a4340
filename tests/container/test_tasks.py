"""The container tasks in tasks.py, run through the real `invoke` where Docker is missing.

Each must stop with exit code 2 and one `error:` line naming what is missing, never a
traceback. A stand-in `docker` that fails like a CLI without an engine covers that case.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.container.conftest import ROOT

if importlib.util.find_spec("invoke") is None:
    pytest.skip("invoke not installed (PyPI package `invoke`)", allow_module_level=True)

DOCKER_TASKS = ["build", "up", "down", "ssh", "container-repro", "pin-base"]


def invoke(task: str, path: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", task], cwd=ROOT,
                          env={"PATH": path, "HOME": "/tmp"}, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("task", DOCKER_TASKS)
def test_without_a_docker_cli_the_task_says_so_in_one_line(task, tmp_path):
    result = invoke(task, str(tmp_path))  # an empty PATH folder: no docker
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: `invoke {task}` needs Docker: no `docker` command on PATH "
        f"(install Docker Engine + the NVIDIA container toolkit)"]


@pytest.mark.parametrize("task", DOCKER_TASKS)
def test_without_an_engine_the_task_says_so_in_one_line(task, tmp_path):
    fake = tmp_path / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon at "
                    "unix:///var/run/docker.sock.' >&2\nexit 1\n")
    fake.chmod(0o755)
    result = invoke(task, f"{tmp_path}:/usr/bin:/bin")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith(f"error: `invoke {task}` needs a running Docker engine")
    assert "Cannot connect to the Docker daemon" in lines[0]


def test_lock_image_uses_the_arguments_the_lock_test_checks():
    from tests.container.test_image_lock import UV_ARGS

    source = Path(ROOT / "tasks.py").read_text()
    start = source.index("def lock_image")
    body = source[start:source.index("@task", start)]
    # "--flag value" pairs and lone flags, as they must appear in the task's command.
    expected, i = [], 0
    while i < len(UV_ARGS):
        takes_value = i + 1 < len(UV_ARGS) and not UV_ARGS[i + 1].startswith("--")
        expected.append(" ".join(UV_ARGS[i:i + 2]) if takes_value else UV_ARGS[i])
        i += 2 if takes_value else 1
    assert [e for e in expected if e not in body] == []
