"""Helpers for the container tests: paths into docker/, free loopback ports, and servers
started in their own process group and always stopped (with every child) after the test, with
the project's one process helper (pipeline.benchmark.process).

No Docker engine is used: each part of the image is checked with the real program it runs.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

from pipeline.benchmark.process import (
    ProcessError,
    read_log,
    start_group,
    stop_group,
    wait_ready,
)
from tests.conftest import find_program, program_missing

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def need_binary(name: str, package: str, path: Optional[str] = None) -> str:
    """The binary's path (see tests/conftest.py's find_program). A test that calls this carries
    `pytest.mark.binary(name, package[, path])`, which skips it at collection, naming the
    package, where the binary is missing; missing here anyway is a failure, never a skip."""
    found = find_program(name, path)
    assert found, (f"{program_missing(name, package)}, yet the test ran: mark it "
                   f"pytest.mark.binary({name!r}, {package!r})")
    return found


def output(proc: subprocess.Popen) -> str:
    """What a process started by `spawn` wrote so far (stdout and stderr together)."""
    return read_log(getattr(proc, "log_path", None))


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, what: str,
               deadline_s: float = 60.0) -> None:
    """Poll `ready` until true; fail early with the output if the process died."""
    try:
        wait_ready(proc, ready, deadline_s, what, getattr(proc, "log_path", None), poll_s=0.2)
    except ProcessError as exc:
        pytest.fail(f"{exc}:\n{exc.tail()}")


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def spawn(tmp_path):
    """spawn(argv, env=..., **popen_kw) -> Popen in a new session, its output in a log file
    (a pipe nobody reads could block a chatty server); stopped with its group at teardown."""
    procs: List[subprocess.Popen] = []

    def _spawn(argv: List[str], env: Optional[Dict[str, str]] = None, **kw) -> subprocess.Popen:
        log_path = tmp_path / f"proc-{len(procs)}.log"
        proc = start_group(argv, log_path, env, stdin=subprocess.DEVNULL, text=True, **kw)
        proc.log_path = log_path  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield _spawn
    for proc in procs:
        stop_group(proc, grace_s=10)


# --- The built image (tests marked `container`; tests/conftest.py skips them, naming what is
# missing, where no engine runs or we are not root).

@pytest.fixture(scope="session")
def engine():
    from image.engine import detect

    return detect()


@pytest.fixture(scope="session")
def image_ref(engine) -> str:
    """The debian-based CPU image, built from nothing with `invoke build --base debian --fresh`
    (no layer cache, a new root filesystem), as CI does; TOKENMETER_TEST_IMAGE=REF reuses an
    image built before (e.g. while working on the tests)."""
    ref = os.environ.get("TOKENMETER_TEST_IMAGE")
    if ref:
        return ref
    ref = "localhost/tokenmeter-test:debian-cpu"
    invoke = str(Path(sys.executable).parent / "invoke")
    result = subprocess.run([invoke, "build", "--base", "debian", "--fresh", "--tag", ref],
                            cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert f"built {ref} with {engine.name}" in result.stdout, result.stdout[-2000:]
    print(result.stdout.strip().splitlines()[-1])
    return ref


@pytest.fixture(scope="module")
def containers(engine, image_ref):
    from tests.container.live import Containers

    made = Containers(engine, image_ref)
    yield made
    made.cleanup()
