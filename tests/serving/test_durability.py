"""SIGKILL during load: every 200 a client received is in the ledger exactly once, and after a
restart, retries with the same Idempotency-Key return the first answer without billing again."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from decimal import Decimal
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
    assert all(r.status_code == 200 for r in got.values())  # no answer other than 200s

    with sqlite3.connect(ledger) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        before = {idem: (eid, resp, (inp, out, cost)) for eid, idem, resp, inp, out, cost in
                  conn.execute("SELECT id, idempotency_key, response, input_tokens, "
                               "output_tokens, cost_micro FROM billing_events")}
    # Every answered 200 is on disk as that request's row, holding the very answer the client
    # got (byte for byte), billed with the tokens and cost that answer stated.
    for i, r in got.items():
        assert f"req-{i}" in before, f"request {i} got a 200 but has no ledger row"
        eid, resp, billed = before[f"req-{i}"]
        assert eid == ok[i]["id"] and resp == r.text
        usage, cost = ok[i]["usage"], Decimal(ok[i]["cost"]["total"])
        assert billed == (usage["input_tokens"], usage["output_tokens"], cost * 10 ** 6)
    assert len(before) <= REQUESTS
    # Rows with no answer (billed, then killed before the answer left) are allowed; their
    # retries below must replay them rather than bill again.
    unanswered_but_billed = {idem for idem in before if int(idem[4:]) not in got}

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
    for i, r in retry.items():
        replayed = r.headers.get("idempotent-replayed") == "true"
        assert replayed == (f"req-{i}" in before), i  # billed before the crash <=> replayed
        if replayed:
            assert r.text == before[f"req-{i}"][1]  # the first answer, not a new bill
    for i, body in ok.items():
        assert retry[i].json() == body
    for idem in unanswered_but_billed:
        assert retry[int(idem[4:])].json()["id"] == before[idem][0]
    with sqlite3.connect(ledger) as conn:
        rows = conn.execute("SELECT idempotency_key, id, cost_micro FROM billing_events"
                            ).fetchall()
    after = {idem: eid for idem, eid, _ in rows}
    # Each request billed exactly once across the crash: one row per request, the rows from
    # before the crash unchanged, and the new rows are the retries' answers.
    assert len(rows) == REQUESTS and set(after) == {f"req-{i}" for i in range(REQUESTS)}
    assert all(after[idem] == eid for idem, (eid, _, _) in before.items())
    assert all(after[f"req-{i}"] == r.json()["id"] for i, r in retry.items())
    report = json.loads(cli(ledger, "report", "--format", "json").stdout)
    [user] = report["users"]
    assert user["requests"] == REQUESTS
    assert Decimal(user["cost_usd"]) * 10 ** 6 == sum(c for _, _, c in rows)
