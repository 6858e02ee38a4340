"""Fixtures for the endpoint tests: the smoke model, a real uvicorn server in a subprocess on a
free loopback port, keys made with the real CLI, and a fresh PostgreSQL database per test
(skipped, saying why, when no server is available)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
PG_ENV = "TOKENMETER_TEST_PG_DSN"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(ledger: str, *args: str, env: Optional[Dict[str, str]] = None,
        check: bool = True) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {}), "TOKENMETER_LEDGER": ledger}
    r = subprocess.run([sys.executable, "-m", "serving", *args], cwd=ROOT, env=full,
                       capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def make_key(ledger: str, user: str, *extra: str) -> str:
    out = cli(ledger, "keys", "create", "--user", user, "--json", *extra).stdout
    return json.loads(out)["key"]


class Server:
    """`python -m serving serve` in a subprocess on 127.0.0.1, stderr to a log file."""

    def __init__(self, model_dir: Path, ledger: str, log: Path,
                 env: Optional[Dict[str, str]] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ledger, self.log_path = ledger, log
        self.env = {**os.environ, "TOKENMETER_MODEL_DIR": str(model_dir),
                    "TOKENMETER_LEDGER": ledger, "TOKENMETER_HOST": "127.0.0.1",
                    "TOKENMETER_PORT": str(self.port), **(env or {})}
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 180) -> "Server":
        return self.launch().wait_ready(timeout)

    def launch(self) -> "Server":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "serving", "serve"], cwd=ROOT,
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 180) -> "Server":
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"server not ready in {timeout}s: {self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def billing_lines(self) -> List[dict]:
        out = []
        for line in self.log().splitlines():
            if line.startswith("{") and '"billing_event"' in line:
                out.append(json.loads(line))
        return out

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture(scope="session")
def model_dir(request) -> Path:
    """The smoke model; TOKENMETER_TEST_MODEL_DIR reuses one already built (saves a minute)."""
    given = os.environ.get("TOKENMETER_TEST_MODEL_DIR")
    if given:
        return Path(given)
    return request.getfixturevalue("smoke_ws") / "models" / "sentiment" / "1"


def _pg_admin_dsn() -> str:
    dsn = os.environ.get(PG_ENV, "")
    if not dsn:
        pytest.skip(f"{PG_ENV} is not set: no PostgreSQL server (scripts/test starts one with "
                    "scripts/postgres.sh)")
    try:
        import psycopg

        with psycopg.connect(dsn, connect_timeout=5):
            pass
    except Exception as exc:
        pytest.skip(f"PostgreSQL at {PG_ENV} is not reachable: {exc}")
    return dsn


@pytest.fixture
def pg_dsn():
    """A fresh, empty database on the test server; dropped afterwards."""
    import psycopg
    from psycopg import sql

    admin = _pg_admin_dsn()
    name = "tm_" + secrets.token_hex(6)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield admin.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                     .format(sql.Identifier(name)))
