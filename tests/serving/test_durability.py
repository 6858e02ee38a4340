"""SIGKILL during load: every 200 a client received is in the ledger exactly once, and after a
restart, retries with the same Idempotency-Key return the first answer without billing again."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Dict

import httpx
import pytest

from tests.serving.conftest import Server, cli, make_key

pytestmark = pytest.mark.slow

REQUESTS = 160
CONCURRENCY = 8
KILL_AFTER = 40  # 200s received before the SIGKILL


async def _load(server: Server, key: str) -> Dict[int, httpx.Response]:
    """Send REQUESTS requests, CONCURRENCY at a time; SIGKILL the server mid-way."""
    got: Dict[int, httpx.Response] = {}
    todo = list(range(REQUESTS))

    async def worker(client: httpx.AsyncClient):
        while todo:
            i = todo.pop(0)
            try:
                r = await client.post(server.url + "/v1/analyze", json={"text": f"第{i}条评论 好"},
                                      headers={"Authorization": f"Bearer {key}",
                                               "Idempotency-Key": f"req-{i}"})
            except httpx.HTTPError:
                continue  # the server died under this request: no answer, maybe billed
            got[i] = r
            if sum(1 for x in got.values() if x.status_code == 200) >= KILL_AFTER and \
                    server.proc.poll() is None:
                server.proc.kill()

    async with httpx.AsyncClient(timeout=60) as client:
        await asyncio.gather(*[worker(client) for _ in range(CONCURRENCY)])
    return got


def test_sigkill_under_load_loses_no_answered_request(model_dir, tmp_path):
    ledger = str(tmp_path / "ledger.sqlite3")
    key = make_key(ledger, "u-kill")
    server = Server(model_dir, ledger, tmp_path / "server.log").start()
    try:
        got = asyncio.run(_load(server, key))
    finally:
        server.kill()
    ok = {i: r.json() for i, r in got.items() if r.status_code == 200}
    assert len(ok) >= KILL_AFTER and len(got) < REQUESTS  # the kill really cut the load short
    assert all(r.status_code == 200 for r in got.values())

    with sqlite3.connect(ledger) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = [row[0] for row in conn.execute("SELECT id FROM billing_events")]
    assert len(ids) == len(set(ids))
    assert {b["id"] for b in ok.values()} <= set(ids)  # every answered 200 is on disk

    # Restart on the same ledger and retry everything with the same Idempotency-Keys.
    again = Server(model_dir, ledger, tmp_path / "server2.log").start()
    try:
        with httpx.Client(timeout=60) as client:
            retry = {i: client.post(again.url + "/v1/analyze", json={"text": f"第{i}条评论 好"},
                                    headers={"Authorization": f"Bearer {key}",
                                             "Idempotency-Key": f"req-{i}"})
                     for i in range(REQUESTS)}
    finally:
        again.stop()
    assert all(r.status_code == 200 for r in retry.values())
    for i, body in ok.items():
        assert retry[i].json() == body  # the first answer, not a new bill
    with sqlite3.connect(ledger) as conn:
        n, keys = conn.execute("SELECT COUNT(*), COUNT(DISTINCT idempotency_key) "
                               "FROM billing_events").fetchone()
    assert n == keys == REQUESTS  # each request billed exactly once across the crash
    assert cli(ledger, "report", "--format", "json").returncode == 0
