"""A COMMIT whose reply is lost is resolved, never guessed (PostgreSQL through a real TCP proxy
that cuts the connection at that moment, tests/serving/tcp_proxy.py).

- reply lost, database reachable again: the rows exist, so those requests are billed;
- COMMIT dropped before the database saw it: nothing stored, the requests are refused;
- reply lost and the database unreachable for longer than the lookup may wait: the answer says
  the outcome is unknown (the rows do exist: saying "not billed" would have been a lie).
Each time the ledger keeps working afterwards.
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import Future, wait
from typing import Iterator, List, Tuple
from urllib.parse import urlsplit

import pytest

from serving.keys import create_key
from serving.ledger import (
    CommitResult,
    Ledger,
    LedgerError,
    OutcomeUnknown,
    open_ledger,
)
from tests.serving.tcp_proxy import DROP_COMMIT, LOSE_REPLY, CommitCuttingProxy
from tests.serving.test_billing import INSTANCE, body, make_billing, refusal
from tests.serving.test_ledger import event

pytestmark = pytest.mark.postgres


@pytest.fixture
def proxied(pg_dsn) -> Iterator[Tuple[CommitCuttingProxy, Ledger]]:
    url = urlsplit(pg_dsn)
    proxy = CommitCuttingProxy((url.hostname or "127.0.0.1", url.port or 5432))
    # A group waits 0.2 s for more rows, so the five rows below share one COMMIT.
    led = open_ledger(proxy.dsn(pg_dsn), commit_wait_s=0.2, outcome_wait_s=1.5)
    led.start()
    yield proxy, led
    led.close()
    proxy.close()


def five_rows(led: Ledger, proxy: CommitCuttingProxy, mode: str,
              then_refuse: bool = False) -> Tuple[List[str], List[Future]]:
    """Five rows committed with the fault armed (the writer connected before)."""
    key, _ = create_key(led, "oz")
    assert led.commit_event(event(key)).result(timeout=30).status == "billed"
    proxy.arm(mode, then_refuse)
    events = [event(key) for _ in range(5)]
    futures = [led.commit_event(e) for e in events]
    done, pending = wait(futures, timeout=30)
    assert not pending, "the writer left requests waiting"
    return [e.id for e in events], futures


def outcomes(futures: List[Future]) -> List[object]:
    return [f.exception() or f.result() for f in futures]


def still_works(led: Ledger) -> None:
    key, _ = create_key(led, "after")
    e = event(key)
    assert led.commit_event(e).result(timeout=30).status == "billed"
    assert e.id in set(led.event_ids())


def test_a_lost_commit_reply_is_looked_up_and_answered_billed(proxied):
    proxy, led = proxied
    ids, futures = five_rows(led, proxy, LOSE_REPLY)
    assert proxy.cut.is_set(), f"the fault did not happen: {outcomes(futures)}"
    assert [f.result() for f in futures] == [CommitResult("billed")] * 5
    assert set(ids) <= set(led.event_ids())
    still_works(led)


def test_a_commit_that_never_arrived_is_answered_not_billed(proxied):
    proxy, led = proxied
    ids, futures = five_rows(led, proxy, DROP_COMMIT)
    assert proxy.cut.is_set(), f"the fault did not happen: {outcomes(futures)}"
    for f in futures:
        exc = f.exception()
        assert isinstance(exc, LedgerError) and not isinstance(exc, OutcomeUnknown), exc
    assert not set(ids) & set(led.event_ids())
    still_works(led)


def test_an_outcome_that_cannot_be_read_is_reported_unknown_not_unbilled(proxied):
    proxy, led = proxied
    # The lookups after the cut find no database for the 1.5 s they may wait.
    ids, futures = five_rows(led, proxy, LOSE_REPLY, then_refuse=True)
    assert proxy.cut.is_set(), f"the fault did not happen: {outcomes(futures)}"
    for f in futures:
        assert isinstance(f.exception(), OutcomeUnknown), f.exception()
    proxy.refuse = False
    assert set(ids) <= set(led.event_ids())  # they were billed: "unknown" was the truth
    still_works(led)


def test_the_endpoint_answers_an_unknown_outcome_as_such_and_a_retry_replays(proxied, runner,
                                                                            model_dir):
    """Through the billing flow: 503 ledger_outcome_unknown (not "nothing was billed"), and the
    retry with the same Idempotency-Key returns the answer that was in fact billed, once."""
    proxy, led = proxied
    b = make_billing(runner, led, model_dir)
    key, _ = create_key(led, "uma")
    asyncio.run(b.analyze(key, body("好")))  # the writer is connected
    proxy.arm(LOSE_REPLY, then_refuse=True)
    r = refusal(b.analyze(key, body("很好"), idempotency_key="retry-me"))
    assert proxy.cut.is_set(), "the fault did not happen"
    assert (r.kind, r.code, r.retry_after_s) == ("unavailable", "ledger_outcome_unknown", 1)
    proxy.refuse = False
    again = asyncio.run(b.analyze(key, body("很好"), idempotency_key="retry-me"))
    assert again.replayed  # it had been billed; the retry does not bill it twice
    assert json.loads(again.body)["id"] in set(led.event_ids())
    assert led.totals_for_instance(INSTANCE)["requests"] == 2
