"""The billing flow without HTTP (serving.billing.Billing): the real model runner in this process,
a real SQLite ledger, the real tokenizer and pricing file. Every refusal has its kind and code
and bills nothing; a billed answer agrees with the model's own files, the ledger and the
metrics. Expected figures come from ModelFacts (plain tokenizers + yaml), not from serving."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
import threading
import time
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Iterator, List

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.billing import Billing, Refused
from serving.keys import create_key
from serving.ledger import Ledger, now_iso, open_ledger
from serving.metering import Meter
from serving.metrics import Metrics, parse_billing_totals
from serving.model_dir import TOKENIZER_FILE
from serving.pricing import cost, price_for
from serving.runner import MicroBatcher, ModelInfo
from serving.settings import Settings
from serving.tokenization import default_buckets
from tests.serving.conftest import PRICING_FILE, ModelFacts

INSTANCE = "billing-test"
MAX_TEXTS = 4


@pytest.fixture
def ledger(tmp_path) -> Iterator[Ledger]:
    led = open_ledger(str(tmp_path / "ledger.sqlite3"))
    led.start()
    yield led
    led.stop()
    led.close()


def make_billing(runner, ledger: Ledger, model_dir: Path, **settings) -> Billing:
    s = Settings(model_dir=model_dir, ledger="unused", max_texts=MAX_TEXTS, **settings)
    info = runner.info
    meter = Meter(model_dir / TOKENIZER_FILE, info.max_tokens, info.labels)
    return Billing(s, runner, ledger, meter, price_for(PRICING_FILE, info.name), INSTANCE,
                   Metrics(INSTANCE, info.name, info.version))


@pytest.fixture
def billing(runner, ledger, model_dir) -> Billing:
    return make_billing(runner, ledger, model_dir)


def body(*texts: str, **extra) -> bytes:
    payload = {"text": texts[0]} if len(texts) == 1 else {"texts": list(texts)}
    return json.dumps({**payload, **extra}, ensure_ascii=False).encode()


def refusal(coro) -> Refused:
    with pytest.raises(Refused) as info:
        asyncio.run(coro)
    return info.value


def refusal_and_model_calls(b: Billing, coro) -> "tuple[Refused, List[int]]":
    """The refusal, and the model calls made while reaching it (batch sizes)."""
    calls: List[int] = []
    b.runner.set_batch_hook(calls.append)
    try:
        return refusal(coro), calls
    finally:
        b.runner.set_batch_hook(None)


def billed(b: Billing) -> dict:
    rows = b.ledger.totals_for_instance(INSTANCE)
    assert parse_billing_totals(b.metrics.render().decode())["requests"] == rows["requests"]
    return rows


def test_a_request_is_billed_once_as_the_model_files_say(billing, facts: ModelFacts):
    key, _ = create_key(billing.ledger, "ana")
    texts = ["很好", "太差了，退货"]
    answer = asyncio.run(billing.analyze(key, body(*texts), request_id="req-1"))
    out = json.loads(answer.body)
    assert not answer.replayed
    labels = [r["label"] for r in out["results"]]
    assert set(labels) <= set(facts.labels) and len(labels) == 2
    n_in, n_out = facts.input_tokens(texts), facts.output_tokens(labels)
    assert out["usage"] == {"input_tokens": n_in, "output_tokens": n_out,
                            "total_tokens": n_in + n_out}
    cost = facts.cost_micro(n_in, n_out)
    assert Decimal(out["cost"]["total"]) * 1_000_000 == cost
    assert billed(billing) == {"requests": 1, "input_tokens": n_in, "output_tokens": n_out,
                               "cost_micro": cost}
    assert billing.ledger.event_ids() == [out["id"]]


def test_each_refusal_has_its_kind_and_code_and_bills_nothing(billing, facts: ModelFacts):
    b = billing
    key, _ = create_key(b.ledger, "bo")
    other, _ = create_key(b.ledger, "cy")
    cases = [
        (b.authenticate(None), "authentication", "missing_api_key"),
        (b.authenticate("Bearer tm_not-a-key"), "authentication", "invalid_api_key"),
        (b.analyze(key, b"{not json"), "invalid", "invalid_json"),
        (b.analyze(key, body(*["好"] * (MAX_TEXTS + 1))), "invalid", "too_many_texts"),
        (b.analyze(key, body("好", truncate="yes")), "invalid", "invalid_truncate"),
        (b.analyze(key, body("好"), idempotency_key="has space"), "invalid",
         "invalid_idempotency_key"),
        (b.analyze(key, body(facts.too_long_text())), "too_long", "input_too_long"),
        (b.usage(key, other.user_id, None, None), "permission", "forbidden"),
        (b.usage(key, None, "2026-13-01", None), "invalid", "invalid_date"),
        (b.usage(key, None, None, "9999-12-31"), "invalid", "invalid_date"),
        (b.analyze(key, b"[" * 2048 + b"]" * 2048), "invalid", "invalid_json"),
    ]
    for coro, kind, code in cases:
        r = refusal(coro)
        assert (r.kind, r.code) == (kind, code), r.message
    assert billed(b)["requests"] == 0
    plain_key, plaintext = create_key(b.ledger, "dee")
    b.ledger.revoke_key(plain_key.id)
    r = refusal(b.authenticate(f"Bearer {plaintext}"))
    assert (r.kind, r.code) == ("authentication", "revoked_api_key")


def test_rate_limit_and_budget_refuse_before_the_model_and_bill_nothing(billing, facts):
    b = billing
    limited, _ = create_key(b.ledger, "eve", rpm=1)
    asyncio.run(b.analyze(limited, body("好")))
    r = refusal(b.analyze(limited, body("好")))
    assert (r.kind, r.code) == ("rate_limit", "rate_limit_exceeded")
    assert r.retry_after_s is not None and 1 <= r.retry_after_s <= 60
    # One micro-USD cannot pay for any answer: refused by the pre-check, before the model.
    poor, _ = create_key(b.ledger, "fay", budget_micro_usd=1)
    r, model_calls = refusal_and_model_calls(b, b.analyze(poor, body("好")))
    assert (r.kind, r.code, model_calls) == ("quota", "insufficient_quota", [])
    assert billed(b)["requests"] == 1  # only eve's first request


def test_a_revoked_key_is_refused_once_its_cached_record_expires(runner, ledger, model_dir):
    now = [100.0]
    b = make_billing(runner, ledger, model_dir, key_cache_s=5)
    b.keys.clock = lambda: now[0]
    record, plaintext = create_key(ledger, "ivy")
    header = f"Bearer {plaintext}"
    assert asyncio.run(b.authenticate(header)).id == record.id
    ledger.revoke_key(record.id)
    now[0] += 4.9  # within the documented bound the cached record still answers
    assert asyncio.run(b.authenticate(header)).id == record.id
    now[0] += 0.1
    r = refusal(b.authenticate(header))
    assert (r.kind, r.code) == ("authentication", "revoked_api_key")


def test_the_budget_pre_check_counts_what_this_process_billed(billing, facts):
    # Room for exactly one worst case of "好" (input + the longest label): the first request
    # runs and is billed; the second is refused before the model from the cached spend,
    # which the first commit updated (no ledger read in between: the cache is fresh).
    worst = facts.input_tokens(["好"]) + facts.max_output_tokens
    key, _ = create_key(billing.ledger, "jon", budget_tokens=worst)
    asyncio.run(billing.analyze(key, body("好")))
    r, model_calls = refusal_and_model_calls(billing, billing.analyze(key, body("好")))
    assert (r.kind, r.code, model_calls) == ("quota", "insufficient_quota", [])
    assert billed(billing)["requests"] == 1


def test_a_budget_set_after_the_key_was_cached_holds_at_commit(billing):
    # The cached key record says "no user budget"; the budget set since is read by the
    # commit's conditional update itself, so nothing is billed past it.
    key, plaintext = create_key(billing.ledger, "lea")
    cached = asyncio.run(billing.authenticate(f"Bearer {plaintext}"))
    assert not cached.has_budget
    billing.ledger.set_user_budget("lea", 1, None)  # 1 micro-USD: less than any answer
    r, model_calls = refusal_and_model_calls(billing, billing.analyze(cached, body("好")))
    assert (r.kind, r.code) == ("quota", "insufficient_quota")
    assert model_calls  # the pre-check trusted the cached record; the commit refused
    assert billed(billing)["requests"] == 0


def test_an_idempotent_retry_replays_the_first_answer_and_bills_once(billing):
    key, _ = create_key(billing.ledger, "gus")
    first = asyncio.run(billing.analyze(key, body("非常满意"), idempotency_key="order-7"))
    again = asyncio.run(billing.analyze(key, body("非常满意"), idempotency_key="order-7"))
    assert again.replayed and not first.replayed
    assert again.body == first.body
    assert billed(billing)["requests"] == 1


def test_an_idempotency_key_reused_for_another_request_is_a_conflict_and_not_billed(billing):
    key, _ = create_key(billing.ledger, "kim")
    first = asyncio.run(billing.analyze(key, body("很好"), idempotency_key="k-1"))
    r = refusal(billing.analyze(key, body("很差"), idempotency_key="k-1"))
    assert (r.kind, r.code) == ("conflict", "idempotency_key_reused")
    r = refusal(billing.analyze(key, body("很好", truncate=True), idempotency_key="k-1"))
    assert r.code == "idempotency_key_reused"  # truncate changes the request too
    assert asyncio.run(billing.analyze(key, body("很好"), idempotency_key="k-1")).body \
        == first.body
    # The same holds when the other request reaches the commit first (a concurrent race):
    # the ledger's unique key reports the duplicate with the first request's hash.
    racing = billing.event(billing.versions.default, "evt_" + "0" * 32, now_iso(), key, 3, 1,
                           cost(billing.price, 3, 1), 1, "race", "k-1", "{}")
    racing.request_hash = "not-the-first-request"
    r = refusal(billing.commit(racing, key))
    assert r.code == "idempotency_key_reused"
    assert billed(billing)["requests"] == 1


def test_concurrent_duplicates_wait_for_the_first_and_replay_it(billing):
    """20 identical requests with one Idempotency-Key at once: one model call, one row, and
    every caller gets the first answer's bytes."""
    key, _ = create_key(billing.ledger, "dee")
    calls: List[int] = []

    async def twenty():
        return await asyncio.gather(*(billing.analyze(key, body("非常满意"),
                                                      idempotency_key="pay-20")
                                      for _ in range(20)))

    billing.runner.set_batch_hook(calls.append)
    try:
        answers = asyncio.run(twenty())
    finally:
        billing.runner.set_batch_hook(None)
    assert len({a.body for a in answers}) == 1
    assert sum(not a.replayed for a in answers) == 1
    assert calls == [1]  # the model ran once, for the first request
    assert billed(billing)["requests"] == 1
    # A concurrent duplicate with another body is a conflict, not a replay.
    async def pair():
        return await asyncio.gather(
            billing.analyze(key, body("很好"), idempotency_key="pay-21"),
            billing.analyze(key, body("很差"), idempotency_key="pay-21"),
            return_exceptions=True)

    first, second = asyncio.run(pair())
    assert not isinstance(first, BaseException) and not first.replayed
    assert isinstance(second, Refused) and second.code == "idempotency_key_reused"
    assert billed(billing)["requests"] == 2


def test_an_idempotency_key_is_free_again_after_the_retention_window(runner, tmp_path,
                                                                    model_dir):
    led = open_ledger(str(tmp_path / "retention.sqlite3"), idempotency_retention_s=1.0)
    led.start()
    try:
        b = make_billing(runner, led, model_dir)
        key, _ = create_key(led, "eli")
        first = asyncio.run(b.analyze(key, body("很好"), idempotency_key="monthly-run"))
        within = asyncio.run(b.analyze(key, body("很好"), idempotency_key="monthly-run"))
        assert within.replayed and within.body == first.body
        time.sleep(1.2)  # past the window: the key is forgotten
        later = asyncio.run(b.analyze(key, body("很差"), idempotency_key="monthly-run"))
        assert not later.replayed  # another request under the old key: billed, no conflict
        ids = {json.loads(a.body)["id"] for a in (first, later)}
        assert len(ids) == 2 and set(led.event_ids()) == ids
        again = asyncio.run(b.analyze(key, body("很差"), idempotency_key="monthly-run"))
        assert again.replayed and again.body == later.body  # the new use is remembered
        assert led.totals_for_instance(INSTANCE)["requests"] == 2
    finally:
        led.stop()
        led.close()


def test_cancelled_requests_kill_no_thread_and_bill_only_what_was_taken(billing):
    """Requests cancelled at random points (a client gone, a timeout wrapper): the runner and
    the writer live on, every completed answer is billed once, and a cancelled request is billed
    only if its row had already been taken by the writer."""
    key, _ = create_key(billing.ledger, "fay")
    rng = random.Random(7)

    async def storm():
        tasks = [asyncio.ensure_future(billing.analyze(key, body(f"好{i}")))
                 for i in range(120)]
        loop = asyncio.get_running_loop()
        for t in tasks[::2]:  # each at its own moment, from parsing to waiting on the ledger
            loop.call_later(rng.random() * 0.05, t.cancel)
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(storm())
    done = [r for r in results if not isinstance(r, BaseException)]
    cancelled = sum(isinstance(r, asyncio.CancelledError) for r in results)
    assert len(done) + cancelled == len(results)  # nothing else went wrong
    assert cancelled >= 10  # the storm did cancel requests mid-flight
    rows = set(billing.ledger.event_ids())
    assert {json.loads(a.body)["id"] for a in done} <= rows
    assert len(done) <= len(rows) <= len(done) + cancelled
    assert billing.runner.alive() and billing.ledger.writer_alive()
    after = asyncio.run(billing.analyze(key, body("很好")))
    assert json.loads(after.body)["id"] in set(billing.ledger.event_ids())


def test_unmetered_answers_without_a_key_and_bills_nothing(runner, ledger, model_dir, facts):
    b = make_billing(runner, ledger, model_dir, metering="off", allow_unmetered=True)
    assert not b.metered
    out = json.loads(asyncio.run(b.analyze(None, body("很好"))).body)
    assert out["usage"]["input_tokens"] == facts.input_tokens(["很好"])
    assert ledger.event_ids() == []


class GatedRunner:
    """The real micro-batcher (queue of one) in front of a model that waits at a gate, so the
    test decides when the queue is full. Satisfies serving.billing.Runner."""

    def __init__(self, info: ModelInfo):
        self.info, self.gate, self.entered = info, threading.Event(), threading.Event()
        self.batcher = MicroBatcher(self._predict, default_buckets(info.max_tokens),
                                    max_batch=1, max_wait_s=0.0, queue_size=1)
        self.batcher.start()

    def _predict(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait(30)
        return np.full((len(ids), len(self.info.labels)), 1 / len(self.info.labels))

    def submit(self, rows: List[List[int]], priority: bool = False):
        return self.batcher.submit(rows, priority)

    def depth(self) -> int:
        return self.batcher.depth()


def test_a_full_queue_is_refused_as_overloaded_and_only_answers_are_billed(runner, ledger,
                                                                           model_dir):
    gated = GatedRunner(runner.info)
    b = make_billing(gated, ledger, model_dir)
    key, _ = create_key(ledger, "hal")

    async def scenario():
        running = asyncio.ensure_future(b.analyze(key, body("好")))
        await asyncio.to_thread(gated.entered.wait, 30)  # the model holds request 1
        queued = asyncio.ensure_future(b.analyze(key, body("好")))
        while gated.depth() < 1:  # request 2 fills the queue of one
            await asyncio.sleep(0.01)
        with pytest.raises(Refused) as third:
            await b.analyze(key, body("好"))
        gated.gate.set()
        await asyncio.gather(running, queued)
        return third.value

    r = asyncio.run(scenario())
    gated.batcher.stop()
    assert (r.kind, r.code, r.retry_after_s) == ("overloaded", "overloaded", 1)
    assert billed(b)["requests"] == 2


class FailingRunner(GatedRunner):
    """GatedRunner's micro-batcher in front of a model call that fails with an error nobody
    planned for, plus what create_app asks of a runner."""

    ready = True

    def _predict(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        raise RuntimeError("the model broke")

    def alive(self) -> bool:
        return self.batcher.alive()

    def restart(self) -> bool:
        return False

    def set_batch_hook(self, hook) -> None:
        self.batcher.on_batch = hook


def test_the_app_answers_each_outcome_of_analyze_as_json_counted_by_route_and_status(
        runner, ledger, model_dir):
    """POST /v1/analyze skips the router (serving.app.CountRequests): its refusals, a model
    that fails unexpectedly and a wrong method still get their JSON error, are counted under
    the route's path, and bill nothing."""
    import httpx

    from serving.app import Components, create_app

    failing = FailingRunner(runner.info)
    b = make_billing(failing, ledger, model_dir)
    app = create_app(Components(b.settings, failing, ledger, b.meter, b.price, INSTANCE))
    _, secret = create_key(ledger, "eve")

    async def calls() -> List[httpx.Response]:
        # The 500's exception is re-raised to the server after the answer, as uvicorn gets it.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            url, auth = "/v1/analyze", {"Authorization": f"Bearer {secret}"}
            return [await client.post(url, content=body("好")),  # no key
                    await client.post(url, content=b"{", headers=auth),
                    await client.post(url, content=body("好"), headers=auth),  # model fails
                    await client.get(url, headers=auth)]

    try:
        r = asyncio.run(calls())
    finally:
        failing.batcher.stop()
    assert [x.status_code for x in r] == [401, 400, 500, 405]
    assert [x.json()["error"]["code"] for x in r] == [
        "missing_api_key", "invalid_json", "internal_error", "method_not_allowed"]
    assert r[0].headers["www-authenticate"] == "Bearer"
    assert r[3].headers["allow"] == "POST"
    counted = {(s.labels["route"], s.labels["status"]): s.value
               for family in text_string_to_metric_families(app.state.metrics.render().decode())
               if family.name == "tokenmeter_requests" for s in family.samples
               if s.name == "tokenmeter_requests_total"}
    assert counted == {("/v1/analyze", "401"): 1, ("/v1/analyze", "400"): 1,
                       ("/v1/analyze", "500"): 1, ("/v1/analyze", "405"): 1}
    assert billed(app.state.billing)["requests"] == 0


def test_readyz_says_not_ready_when_the_ledger_writer_is_gone(runner, ledger, model_dir):
    import httpx

    from serving.app import Components, create_app

    b = make_billing(runner, ledger, model_dir)
    app = create_app(Components(b.settings, runner, ledger, b.meter, b.price, INSTANCE))

    async def readyz() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.get("/readyz")

    r = asyncio.run(readyz())
    assert r.status_code == 200 and r.json()["ledger_writer_alive"] is True
    ledger.stop()  # as if the writer thread had died: every commit would wait forever
    r = asyncio.run(readyz())
    assert r.status_code == 503
    assert r.json()["ledger_writer_alive"] is False and r.json()["model_runner_alive"] is True


def test_a_stopped_ledger_answers_unavailable_and_a_full_one_busy_never_billed(
        runner, tmp_path, model_dir):
    led = open_ledger(str(tmp_path / "small.sqlite3"), max_pending=1)
    b = make_billing(runner, led, model_dir)
    key, _ = create_key(led, "max")
    # No writer running (stopped, or died): refused at once, instead of waiting forever.
    r = refusal(b.analyze(key, body("好")))
    assert (r.kind, r.code, r.retry_after_s) == ("unavailable", "ledger_unavailable", 1)
    led.start()
    # Hold the writer on the database lock, so queued rows stay queued (a stalled database).
    import sqlite3

    blocker = sqlite3.connect(str(tmp_path / "small.sqlite3"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        async def until(condition) -> None:
            for _ in range(3000):
                if condition():
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("condition not reached in 30 s")

        async def three_at_once():
            model_calls: List[int] = []
            runner.set_batch_hook(model_calls.append)
            first = asyncio.ensure_future(b.analyze(key, body("好")))
            await until(lambda: model_calls)  # its row goes to the writer next...
            await until(lambda: led._queue.qsize() == 0)  # ...which holds it, waiting
            second = asyncio.ensure_future(b.analyze(key, body("很好")))
            await until(lambda: led._queue.qsize() == 1)  # the one free slot is taken
            with pytest.raises(Refused) as third:
                await b.analyze(key, body("差"))
            blocker.execute("ROLLBACK")  # the database is usable again
            await asyncio.gather(first, second)
            return third.value

        try:
            r = asyncio.run(three_at_once())
        finally:
            runner.set_batch_hook(None)
    finally:
        blocker.close()
    assert (r.kind, r.code, r.retry_after_s) == ("overloaded", "ledger_busy", 1)
    assert led.totals_for_instance(INSTANCE)["requests"] == 2  # the queued two, not the third
    led.stop()
    led.close()


@pytest.mark.postgres
def test_postgresql_backend_killed_or_row_locked_answers_503_then_recovers(
        runner, model_dir, pg_dsn):
    import psycopg

    led = open_ledger(pg_dsn, pg_lock_timeout_ms=300)
    led.start()
    b = make_billing(runner, led, model_dir)
    key, _ = create_key(led, "pat")
    answered = [asyncio.run(b.analyze(key, body("好")))]

    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        # The writer's connection is killed (a failover, an admin): that group is unbilled and
        # answered 503; the next one reconnects.
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                      " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        r = refusal(b.analyze(key, body("很好")))
        assert (r.kind, r.code) == ("unavailable", "ledger_unavailable")
        answered.append(asyncio.run(b.analyze(key, body("很好"))))

        # A row lock held elsewhere past lock_timeout: 503, not a stall; then it works again.
        admin.execute("BEGIN")
        admin.execute("SELECT * FROM user_spend WHERE user_id = 'pat' FOR UPDATE")
        r = refusal(b.analyze(key, body("差")))
        assert (r.kind, r.code) == ("unavailable", "ledger_unavailable")
        admin.execute("ROLLBACK")
        answered.append(asyncio.run(b.analyze(key, body("差"))))

    ids = {json.loads(a.body)["id"] for a in answered}
    assert set(led.event_ids()) == ids  # every answer billed once, no refusal billed
    led.stop()
    led.close()


def test_the_context_length_tier_is_charged_stored_and_budgeted(billing, facts: ModelFacts):
    """A request with more input tokens than the tier's edge is billed, whole, at the
    long-context rates: the answer says so, the ledger row keeps those rates and the tier, and
    the budget pre-check prices the worst case at them. At the edge itself: standard."""
    text = "很好"
    n = facts.input_tokens([text])
    rates = (Decimal("0.010"), Decimal("0.030"))
    base = billing.price
    key, _ = create_key(billing.ledger, "lux")
    seen = []
    for above, tier in ((n, "standard"), (n - 1, "long_context")):
        billing.price = replace(base, long_context_above=above, long_input_per_1k=rates[0],
                                long_output_per_1k=rates[1])
        out = json.loads(asyncio.run(billing.analyze(key, body(text))).body)
        n_out = facts.output_tokens([out["results"][0]["label"]])
        r_in, r_out = (base.input_per_1k, base.output_per_1k) if tier == "standard" else rates
        want = facts.side_micro(n, r_in) + facts.side_micro(n_out, r_out)
        assert out["cost"]["tier"] == tier
        assert Decimal(out["cost"]["total"]) * 1_000_000 == want
        seen.append((out["id"], tier, str(r_in), str(r_out), want))
    with sqlite3.connect(billing.ledger.path) as db:  # type: ignore[attr-defined]
        rows = db.execute("SELECT id, price_tier, input_price_per_1k, output_price_per_1k,"
                          " cost_micro FROM billing_events ORDER BY ts").fetchall()
    assert [tuple(r) for r in rows] == seen
    # A key whose budget fits the standard worst case but not the long-context one is refused
    # before the model runs.
    worst_standard = facts.side_micro(n, base.input_per_1k) + facts.side_micro(
        facts.max_output_tokens, base.output_per_1k)
    tight, _ = create_key(billing.ledger, "mia", budget_micro_usd=worst_standard)
    r, calls = refusal_and_model_calls(billing, billing.analyze(tight, body(text)))
    assert (r.code, calls) == ("insufficient_quota", [])
    billing.price = base
    assert not asyncio.run(billing.analyze(tight, body(text))).replayed  # standard: it fits
