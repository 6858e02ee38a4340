"""The container tasks in tasks.py, run through the real `invoke` with no container engine, an
engine that does not answer, or a stand-in engine that records what it is asked to do.

Without a usable engine each task must stop with exit code 2 and exactly one `error:` line
saying what to install or start, never a traceback. PATH is this machine's PATH rebuilt
without the engines: every other program stays where the tasks expect it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from tests.container.conftest import DOCKER, ROOT

# invoke is a locked dependency (requirements.lock): a missing one is a broken setup, not a skip.

# Programs whose absence the tests arrange: the engines and podman's compose.
ENGINE_PROGRAMS = {"docker", "podman", "podman-compose", "docker-compose"}
# Every task that needs an engine; `invoke build` also with the options that change its path.
ENGINE_TASKS = ["build", "build --base official", "build --base debian --gpu", "up",
                "up --gpu", "down", "container-repro", "pin-base"]
NO_ENGINE = "no `docker` command; no `podman` command"
INSTALL = "install Docker Engine, or podman"


@pytest.fixture(scope="module")
def no_engine_bin(tmp_path_factory) -> Path:
    """A folder with a link to every program on PATH (first one wins, as in a lookup), and to
    this interpreter's folder's, except the container engines."""
    farm = tmp_path_factory.mktemp("no-engine-bin")
    dirs = [str(Path(sys.executable).parent)] + os.environ.get("PATH", "").split(os.pathsep)
    for d in dirs:
        if not d or not os.path.isdir(d):
            continue
        for entry in os.scandir(d):
            link = farm / entry.name
            if entry.name in ENGINE_PROGRAMS or link.exists() or link.is_symlink():
                continue
            if entry.is_file() and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    assert (farm / "bash").exists(), "no bash on PATH"
    return farm


def via_env_sh(task: str):
    """`invoke build` runs through scripts/env.sh, which rebuilds .venv when it is older than
    requirements.lock: such a case is marked `current_venv`, which skips it at collection
    (tests/conftest.py) rather than let it rebuild .venv under the running test session."""
    return pytest.param(task, marks=pytest.mark.current_venv) if task.startswith("build") \
        else task


def invoke(args: str, path: str, home: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "invoke", *args.split()], cwd=ROOT,
                          env={"PATH": path, "HOME": str(home), **env}, capture_output=True,
                          text=True, timeout=180)


def stand_in(folder: Path, name: str, info: str, log: Path) -> None:
    """An engine CLI that records every call (argv and the JUPYTER_TOKEN it got), answers
    `info` as the shell lines `info` say, and does nothing else."""
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n"
                    f'printf "%s\\n" "token=$JUPYTER_TOKEN" "$@" "--" >>"{log}"\n'
                    'for a in "$@"; do [ "$a" = info ] && { ' + info + "; }; done\n"
                    "exit 0\n")
    path.chmod(0o755)


def calls(log: Path, info: bool = False) -> List[List[str]]:
    """The recorded calls (`info` ones only if asked): argv lists, the first item the
    JUPYTER_TOKEN seen."""
    if not log.exists():
        return []
    out, current = [], []
    for line in log.read_text().splitlines():
        if line == "--":
            if info or "info" not in current:
                out.append(current)
            current = []
        else:
            current.append(line)
    return out


def error_lines(result: subprocess.CompletedProcess) -> List[str]:
    return [ln for ln in result.stderr.splitlines() if ln.strip()]


@pytest.mark.parametrize("task", [via_env_sh(task) for task in ENGINE_TASKS])
def test_without_an_engine_the_task_says_what_to_install_in_one_line(
        task, no_engine_bin, tmp_path):
    result = invoke(task, str(no_engine_bin), tmp_path)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = error_lines(result)
    assert line.startswith("error: ") and NO_ENGINE in line and INSTALL in line, line
    name = task.split()[0]
    if name != "build":  # build's line comes from `python -m image`, not from tasks.py
        assert line.startswith(f"error: `invoke {name}` needs a container engine: "), line


@pytest.mark.parametrize("engine, complaint", [
    ("docker", "Cannot connect to the Docker daemon at unix:///var/run/docker.sock."),
    ("podman", "Error: cannot set up namespace using newuidmap: exit status 1"),
])
@pytest.mark.parametrize("task", [via_env_sh("build"), "up"])
def test_an_engine_that_does_not_answer_is_named_with_its_complaint(
        task, engine, complaint, no_engine_bin, tmp_path):
    log = tmp_path / "calls.log"
    stand_in(tmp_path / "bin", engine, f"echo '{complaint}' >&2; exit 1", log)
    result = invoke(task, f"{tmp_path / 'bin'}:{no_engine_bin}", tmp_path)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = error_lines(result)
    assert line.startswith("error: ") and INSTALL in line, line
    assert f"{engine}: {complaint}" in line, line
    assert calls(log, info=True), f"the {engine} stand-in was never asked"
    assert calls(log) == [], "nothing but `info` may be asked of an engine that fails it"


@pytest.mark.current_venv
def test_build_rejects_an_unknown_base_before_looking_for_an_engine(no_engine_bin, tmp_path):
    log = tmp_path / "calls.log"
    stand_in(tmp_path / "bin", "docker", "echo 27.0.0; exit 0", log)
    result = invoke("build --base nope", f"{tmp_path / 'bin'}:{no_engine_bin}", tmp_path)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [ln for ln in error_lines(result) if "error:" in ln]
    assert len(errors) == 1 and errors[0] == error_lines(result)[-1], result.stderr
    assert all(word in errors[0] for word in ("'nope'", "official", "debian")), errors[0]
    # Nothing was asked of the engine, not even `info`.
    assert calls(log, info=True) == []


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_up_with_docker_starts_dev_with_the_gpu_override_only_when_asked(
        gpu, no_engine_bin, tmp_path):
    log = tmp_path / "calls.log"
    stand_in(tmp_path / "bin", "docker", "echo 27.0.0; exit 0", log)
    result = invoke("up --gpu" if gpu else "up", f"{tmp_path / 'bin'}:{no_engine_bin}",
                    tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    [call] = calls(log)
    files = ["-f", f"{DOCKER}/compose.yaml"] + (["-f", f"{DOCKER}/compose.gpu.yaml"]
                                                if gpu else [])
    assert call[1:] == ["compose", *files, "up", "-d", "dev"]
    # compose.yaml requires JUPYTER_TOKEN: the task made a strong one and showed it once.
    token = call[0].removeprefix("token=")
    assert len(token) >= 32 and re.fullmatch(r"[0-9a-f]+", token), token
    assert f"http://127.0.0.1:8888/lab?token={token}" in result.stdout


def test_up_keeps_the_users_jupyter_token_and_does_not_print_it(no_engine_bin, tmp_path):
    log = tmp_path / "calls.log"
    stand_in(tmp_path / "bin", "docker", "echo 27.0.0; exit 0", log)
    mine = "u" * 24
    result = invoke("up", f"{tmp_path / 'bin'}:{no_engine_bin}", tmp_path, JUPYTER_TOKEN=mine)
    assert result.returncode == 0, result.stdout + result.stderr
    [call] = calls(log)
    assert call[0] == f"token={mine}"
    assert mine not in result.stdout + result.stderr


@pytest.mark.parametrize("task", ["up", "down", "container-repro"])
def test_with_podman_compose_tasks_need_podman_compose(task, no_engine_bin, tmp_path):
    log = tmp_path / "calls.log"
    stand_in(tmp_path / "bin", "podman", "echo amd64; exit 0", log)
    result = invoke(task, f"{tmp_path / 'bin'}:{no_engine_bin}", tmp_path)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = error_lines(result)
    assert line.startswith(f"error: `invoke {task}`"), line
    assert "podman-compose" in line and "apt-get install podman-compose" in line, line
    assert calls(log) == [], "nothing but `info` may run without podman-compose"
