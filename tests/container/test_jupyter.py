"""A real Jupyter Server started with the exact docker/jupyter_server_config.py.

Only the bind address and port are overridden on the command line (the image listens on
0.0.0.0:8888; tests stay on 127.0.0.1 and a free port). As in the image, the server runs as
a non-root user: when the tests run as root it is started as `nobody`, unless `nobody` cannot
execute this interpreter (e.g. a pyenv Python under /root); then, and only then, it runs as
root with `--ServerApp.allow_root=True` added (test_refuses_to_run_as_root shows the
config alone refuses root).
"""

from __future__ import annotations

import functools
import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Optional

import httpx
import pytest

from pipeline.benchmark.process import free_port
from tests.container.conftest import DOCKER, output, wait_until

# httpx and jupyter-server are locked dependencies of the test environment: no skip for them.

CONFIG = DOCKER / "jupyter_server_config.py"
NOBODY = 65534


@pytest.fixture
def jupyter_home():
    """A HOME/workspace that the server's user can write (not under pytest's 0700 tmp)."""
    home = Path(tempfile.mkdtemp(prefix="tm-jupyter-"))
    (home / "workspace").mkdir()
    (home / "workspace" / "hello.txt").write_text("hi\n")
    if os.geteuid() == 0:
        for p in (home, home / "workspace", home / "workspace" / "hello.txt"):
            os.chown(p, NOBODY, NOBODY)
    yield home
    subprocess.run(["rm", "-rf", str(home)], check=False)


def server_argv(port: int, exact: bool = False) -> list:
    argv = [sys.executable, "-m", "jupyter_server", f"--config={CONFIG}",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}"]
    if not exact and os.geteuid() == 0 and not nobody_can_run_python():
        argv.append("--ServerApp.allow_root=True")
    return argv


def server_env(home: Path, token: Optional[str]) -> Dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           # Keep the user's own Jupyter config and runtime files out of the test.
           "JUPYTER_CONFIG_DIR": str(home / "cfg"), "JUPYTER_DATA_DIR": str(home / "data"),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime"), "JUPYTER_PLATFORM_DIRS": "1",
           "TOKENMETER_WORKSPACE": str(home / "workspace"),
           "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    if token is not None:
        env["JUPYTER_TOKEN"] = token
    return env


@functools.lru_cache(maxsize=None)
def nobody_can_run_python() -> bool:
    try:
        return subprocess.run([sys.executable, "-c", "pass"], user=NOBODY, group=NOBODY,
                              extra_groups=[], capture_output=True, timeout=60).returncode == 0
    except PermissionError:
        return False


def as_user() -> Dict[str, object]:
    # The config sets allow_root = False, as the image runs Jupyter as its own user.
    if os.geteuid() == 0 and nobody_can_run_python():
        return {"user": NOBODY, "group": NOBODY, "extra_groups": []}
    return {}


def _api_up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def jupyter(spawn, jupyter_home):
    token = secrets.token_hex(24)
    port = free_port()
    proc = spawn(server_argv(port), env=server_env(jupyter_home, token), **as_user())
    wait_until(lambda: _api_up(port), proc, "jupyter server", deadline_s=90)
    return f"http://127.0.0.1:{port}", token, proc


def test_api_refuses_requests_without_the_token(jupyter):
    base, _, _ = jupyter
    assert httpx.get(f"{base}/api/status", timeout=10).status_code == 403
    assert httpx.get(f"{base}/api/contents", timeout=10).status_code == 403


def test_api_refuses_a_wrong_token(jupyter):
    base, token, _ = jupyter
    wrong = {"Authorization": "token " + secrets.token_hex(24)}
    assert httpx.get(f"{base}/api/status", headers=wrong, timeout=10).status_code == 403


def test_api_answers_with_the_token_and_serves_the_workspace(jupyter):
    base, token, _ = jupyter
    auth = {"Authorization": f"token {token}"}
    assert httpx.get(f"{base}/api/status", headers=auth, timeout=10).status_code == 200
    listing = httpx.get(f"{base}/api/contents", headers=auth, timeout=10)
    assert listing.status_code == 200
    # root_dir comes from TOKENMETER_WORKSPACE (the mounted project in the image).
    assert [f["name"] for f in listing.json()["content"]] == ["hello.txt"]


@pytest.mark.parametrize("token", [None, "", "   ", "short-token"])
def test_refuses_to_start_without_a_real_token(token, jupyter_home):
    port = free_port()
    proc = subprocess.run(server_argv(port), env=server_env(jupyter_home, token),
                          capture_output=True, text=True, timeout=60, **as_user())
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "JUPYTER_TOKEN is empty or shorter than 16 characters" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to show that root is refused")
def test_refuses_to_run_as_root(jupyter_home, spawn):
    port = free_port()
    proc = spawn(server_argv(port, exact=True),
                 env=server_env(jupyter_home, secrets.token_hex(24)))
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("jupyter started as root: " + output(proc)[-2000:])
    assert proc.returncode != 0
    assert "--allow-root" in output(proc)


def _healthcheck(run_dir: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DOCKER / "healthcheck.py")],
                          env={"PATH": os.environ.get("PATH", ""),
                               "TOKENMETER_RUN_DIR": str(run_dir), **env},
                          capture_output=True, text=True, timeout=60)


def test_healthcheck_follows_the_mode_the_entrypoint_recorded(jupyter, tmp_path):
    base, _, _ = jupyter
    port = base.rsplit(":", 1)[1]
    (tmp_path / "mode").write_text("dev\n")
    healthy = _healthcheck(tmp_path, JUPYTER_PORT=port, TOKENMETER_SSH="0")
    assert healthy.returncode == 0, healthy.stdout
    # Same server, but sshd expected on 2222 (nothing listens there in this test).
    no_sshd = _healthcheck(tmp_path, JUPYTER_PORT=port, TOKENMETER_SSH="1")
    assert no_sshd.returncode == 1 and "sshd not listening" in no_sshd.stdout
    (tmp_path / "mode").write_text("serve\n")
    no_endpoint = _healthcheck(tmp_path, TOKENMETER_PORT=str(free_port()))
    assert no_endpoint.returncode == 1 and "/healthz not answering" in no_endpoint.stdout
    (tmp_path / "mode").unlink()
    assert _healthcheck(tmp_path).returncode == 0  # a plain command: healthy while it runs
