"""Billing under PostgreSQL faults, end to end: a real server under real HTTP load while the
database is stopped hard and started again, while its sessions are killed, and while another
session holds a row lock. Each time the endpoint answers 503 (never a 500, never a stall past
its deadline) while the database cannot bill, recovers by itself, and afterwards every 200 a
client saw is in the ledger exactly once, no row exists without its 200, and `verify` finds no
drift between the ledger and the server's metrics. Results go to the README's fault table
(tests/serving/faults.py).
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable, Iterator, List, Optional

import httpx
import psycopg
import pytest

from tests.serving.conftest import ROOT, Server, cli, make_key
from tests.serving.faults import Load, drive, reconcile, record

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

DEADLINE_S = 10.0  # TOKENMETER_BILLING_DEADLINE_S of the servers below
CLIENTS = 8


class OwnPostgres:
    """A PostgreSQL cluster of this test alone (it is stopped hard, which the shared test server
    must not be), started and restarted with scripts/postgres.sh on its own port."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="tm-chaos-pg-", dir="/tmp")  # postgres can enter
        self.env = {**os.environ, "TOKENMETER_PG_DIR": self.dir}
        self.env.pop("TOKENMETER_PG_PORT", None)
        self.dsn = self.start()

    def start(self) -> str:
        r = subprocess.run(["bash", str(ROOT / "scripts" / "postgres.sh")], env=self.env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.strip()

    def pg_ctl(self, *args: str) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        pg_ctl = bins[-1] if bins else shutil.which("pg_ctl") or "pg_ctl"
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_user, pg_ctl, "-D", f"{self.dir}/data", *args],
                       capture_output=True, timeout=120)

    def stop_hard(self) -> None:
        self.pg_ctl("stop", "-m", "immediate")  # a crash: no checkpoint, sessions cut

    def remove(self) -> None:
        self.pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_pg() -> Iterator[OwnPostgres]:
    pg = OwnPostgres()
    yield pg
    pg.remove()


def serve(model_dir: Path, dsn: str, tmp_path: Path, **env: str) -> Server:
    return Server(model_dir, dsn, tmp_path / "server.log",
                  {"TOKENMETER_BILLING_DEADLINE_S": str(DEADLINE_S), **env}).start()


def ledger_ids(dsn: str) -> List[str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM billing_events").fetchall()]


async def load_with_fault(server: Server, key: str, seconds: float,
                          fault: Callable[[], Awaitable[None]]) -> Load:
    load, _ = await asyncio.gather(drive(server.url, key, seconds, CLIENTS), fault())
    return load


def wait_ready(server: Server, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    last: Optional[httpx.Response] = None
    while time.monotonic() < end:
        try:
            last = httpx.get(server.url + "/readyz", timeout=10)
            if last.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not ready again after {timeout} s: "
                         f"{last.text if last else 'no answer'}\n{server.log()[-2000:]}")


def check_and_record(name: str, server: Server, dsn: str, load: Load, after_s: float) -> None:
    """The invariants every fault must keep, then the row for the README table."""
    wait_ready(server)
    result = reconcile(name, load, ledger_ids(dsn))
    record(result)
    summary = f"{result}\n{server.log()[-1500:]}"
    assert not {s for s in load.statuses() if s >= 500 and s != 503}, summary  # no 500
    assert result.lost == 0 and result.doubled == 0, summary
    assert load.count(503) > 0, "the fault never showed: " + summary
    assert any(s.status == 200 and s.at > after_s for s in load.sent), \
        "no 200 after the fault ended: " + summary
    assert result.longest_stall_s < DEADLINE_S + 3, summary
    v = cli(dsn, "verify", "--url", server.url, check=False)
    assert v.returncode == 0, v.stdout + v.stderr  # the ledger agrees with /metrics


def test_postgresql_stopped_hard_under_load_then_started(model_dir, own_pg, tmp_path):
    server = serve(model_dir, own_pg.dsn, tmp_path)
    try:
        key = make_key(own_pg.dsn, "chaos-stop")

        async def crash_and_restart() -> None:
            await asyncio.sleep(3)
            await asyncio.to_thread(own_pg.stop_hard)
            await asyncio.sleep(3)
            await asyncio.to_thread(own_pg.start)

        load = asyncio.run(load_with_fault(server, key, 16, crash_and_restart))
        check_and_record("PostgreSQL stopped hard (`pg_ctl stop -m immediate`) for 3 s, then "
                         "started", server, own_pg.dsn, load, after_s=9)
    finally:
        server.stop()


def test_postgresql_sessions_killed_under_load(model_dir, pg_dsn, tmp_path):
    server = serve(model_dir, pg_dsn, tmp_path)
    try:
        key = make_key(pg_dsn, "chaos-kill")

        def kill_sessions() -> None:  # in a thread, as hold_lock below
            with psycopg.connect(pg_dsn, autocommit=True) as admin:
                for _ in range(6):
                    time.sleep(1)
                    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                  " WHERE datname = current_database()"
                                  " AND pid <> pg_backend_pid()")

        load = asyncio.run(load_with_fault(server, key, 10,
                                           lambda: asyncio.to_thread(kill_sessions)))
        check_and_record("PostgreSQL sessions killed (`pg_terminate_backend`, 6 times in 6 s)",
                         server, pg_dsn, load, after_s=7)
    finally:
        server.stop()


def test_a_row_lock_held_elsewhere_fails_fast_not_stalls(model_dir, pg_dsn, tmp_path):
    lock_timeout_ms = 1000
    server = serve(model_dir, pg_dsn, tmp_path,
                   TOKENMETER_PG_LOCK_TIMEOUT_MS=str(lock_timeout_ms))
    try:
        key = make_key(pg_dsn, "chaos-lock")

        def hold_lock() -> None:  # in a thread: the clients' event loop never waits on it
            time.sleep(2)
            with psycopg.connect(pg_dsn, autocommit=True) as other:
                other.execute("BEGIN")
                other.execute("SELECT * FROM user_spend WHERE user_id = 'chaos-lock'"
                              " FOR UPDATE")
                time.sleep(5)
                other.execute("ROLLBACK")

        load = asyncio.run(load_with_fault(server, key, 10,
                                           lambda: asyncio.to_thread(hold_lock)))
        check_and_record("PostgreSQL row lock held by another session for 5 s "
                         "(lock_timeout 1 s)", server, pg_dsn, load, after_s=7.5)
        # A request waits out at most the group being written and its own: 2 x lock_timeout.
        assert load.longest_s < 3 * lock_timeout_ms / 1000, load.longest_s
    finally:
        server.stop()
