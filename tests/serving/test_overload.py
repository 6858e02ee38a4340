"""Overload: with a one-slot model queue, one row per model call and heavy requests, a burst must
overflow the queue: some requests get 503 `overloaded` (with Retry-After and the error
contract), and only the 200s are billed."""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests.serving.conftest import Server, make_key, post_all

pytestmark = pytest.mark.slow

BURST = 48
TEXTS = 32  # the default TOKENMETER_MAX_TEXTS


def test_full_queue_answers_503_and_bills_only_the_200s(model_dir, facts, tmp_path):
    ledger = str(tmp_path / "l.sqlite3")
    key = make_key(ledger, "u-busy")
    # MAX_BATCH=1: each request's 32 texts, cut to the model's maximum length, are 32 model
    # calls in a row, while the queue holds one waiting request; the other 46 requests of the
    # burst arrive meanwhile, so the queue cannot take them all.
    server = Server(model_dir, ledger, tmp_path / "s.log",
                    env={"TOKENMETER_QUEUE_SIZE": "1", "TOKENMETER_MAX_BATCH": "1",
                         "TOKENMETER_MAX_TEXTS": str(TEXTS)}).start()
    body = json.dumps({"texts": [facts.too_long_text()] * TEXTS, "truncate": True}).encode()
    try:
        responses = post_all([server.url], [key], BURST, content=body, timeout=300,
                             headers={"Content-Type": "application/json"})
    finally:
        server.stop()
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 503}, codes
    busy = [r for r in responses if r.status_code == 503]
    for r in busy:
        assert r.json() == {"error": {"type": "overloaded_error", "code": "overloaded",
                                      "message": r.json()["error"]["message"]}}
        assert r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
    answered = {r.json()["id"]: r.json() for r in responses if r.status_code == 200}
    with sqlite3.connect(ledger) as conn:
        billed = dict(conn.execute("SELECT id, input_tokens FROM billing_events").fetchall())
    assert billed == {i: b["usage"]["input_tokens"] for i, b in answered.items()}
    assert all(n == facts.max_tokens * TEXTS for n in billed.values())  # cut, billed as cut
    logged = [e["id"] for e in server.billing_lines()]
    assert sorted(logged) == sorted(answered)
