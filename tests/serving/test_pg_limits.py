"""Rate limits shared by replicas in PostgreSQL (serving/pg_limits.py), the store when the ledger
is PostgreSQL and no Redis is configured: two limiters on their own connections, standing for
two replicas, admit together exactly what one key's RPM and TPM allow, even when every admission
is in flight at once; the window frees as it slides; a database that does not answer (none
there, or its connections cut and refused through tests/serving/tcp_proxy.py) turns each
limiter into its local share within a bounded time, and the store is shared again once it
answers. Also settings.limit_store's choice and shared_limiter's wiring. The tests that need
a server are marked `postgres` (skipped at collection without one); the others run anywhere."""

from __future__ import annotations

import asyncio
import time
from typing import List, Optional
from urllib.parse import urlsplit

import psycopg
import pytest
from pydantic import ValidationError

from serving.limits import Refusal
from serving.pg_limits import LOCK_CLASS, TABLE, PgRateLimiter
from serving.settings import Settings
from tests.serving.conftest import cli, free_port
from tests.serving.tcp_proxy import CommitCuttingProxy
from tests.serving.test_shared_limits import admitted, run, timed_admits

NOWHERE = "postgresql://tokenmeter@127.0.0.1:{port}/tokenmeter"


async def _gather(limiters, n: int, key: str, tokens: int, rpm: int, tpm: int
                  ) -> List[Optional[Refusal]]:
    """n admissions in flight together, spread over the limiters."""
    return list(await asyncio.gather(*(limiters[i % len(limiters)].admit(key, tokens, rpm, tpm)
                                       for i in range(n))))


async def _round_robin(limiters, n: int, key: str, tokens: int, rpm: int, tpm: int
                       ) -> List[Optional[Refusal]]:
    return [await limiters[i % len(limiters)].admit(key, tokens, rpm, tpm) for i in range(n)]


async def _close(limiters) -> None:
    for lim in limiters:
        await lim.close()


@pytest.mark.postgres
def test_two_replicas_hold_rpm_and_tpm_exactly_under_concurrent_admission(pg_dsn):
    async def scenario():
        # A generous timeout: on a busy test machine the first connections must not count
        # as an outage (the outage tests below use short ones).
        two = [PgRateLimiter(pg_dsn, replicas=2, timeout_s=10) for _ in range(2)]
        for lim in two:  # each opens its pool (and creates the table once, in turns)
            assert await lim.admit("warm", 1, 1000, 0) is None
        rpm = await _gather(two, 40, "key_rpm", 1, rpm=10, tpm=0)
        tpm = await _gather(two, 30, "key_tpm", 7, rpm=0, tpm=50)
        huge = await two[1].admit("key_huge", 51, 0, 50)
        other = await _gather(two, 4, "key_other", 1, rpm=10, tpm=0)
        seq = await _round_robin(two, 8, "key_seq", 1, rpm=5, tpm=0)
        up = [lim.store_up for lim in two]
        await _close(two)
        return rpm, tpm, huge, other, seq, up

    rpm, tpm, huge, other, seq, up = run(scenario())
    assert all(up)  # every answer came from the database, none from a fallback
    assert admitted(rpm) == 10
    assert {r.code for r in rpm if r} == {"rate_limit_exceeded"}
    assert all(1 <= r.retry_after_s <= 60 for r in rpm if r)
    assert admitted(tpm) == 7  # 7 x 7 = 49 <= 50; an eighth would make 56
    assert {r.code for r in tpm if r} == {"token_rate_limit_exceeded"}
    assert huge is not None and "exceeds" in huge.message and huge.retry_after_s == 60
    assert admitted(other) == 4  # another key has its own window
    assert [r is None for r in seq] == [True] * 5 + [False] * 3  # the first five, in order
    with psycopg.connect(pg_dsn) as conn:
        rows = dict(conn.execute(f"SELECT key_id, sum(tokens) FROM {TABLE} GROUP BY key_id")
                    .fetchall())
        persistence = conn.execute("SELECT relpersistence FROM pg_class WHERE relname = %s",
                                   (TABLE,)).fetchone()
    assert rows["key_rpm"] == 10 and rows["key_tpm"] == 49  # refusals left nothing behind
    assert persistence == ("u",)  # unlogged


@pytest.mark.postgres
def test_the_window_slides(pg_dsn):
    async def scenario():
        two = [PgRateLimiter(pg_dsn, replicas=2, timeout_s=10, window_s=1.0)
               for _ in range(2)]
        first = await _round_robin(two, 4, "k", 10, rpm=3, tpm=0)
        tokens = await _round_robin(two, 3, "t", 20, rpm=0, tpm=45)
        await asyncio.sleep(1.2)  # past the window: both are free again
        again = await _round_robin(two, 4, "k", 10, rpm=3, tpm=0)
        tokens_again = await _round_robin(two, 3, "t", 20, rpm=0, tpm=45)
        await _close(two)
        return first, tokens, again, tokens_again

    first, tokens, again, tokens_again = run(scenario())
    for window in (first, again):
        assert [r is None for r in window] == [True] * 3 + [False]
        assert window[3] is not None and window[3].retry_after_s == 1  # the window's rest
    for window in (tokens, tokens_again):
        assert [r is None for r in window] == [True, True, False]


def test_a_database_that_is_not_there_is_the_local_share_at_once():
    """A DSN with no server behind it: the replica serves at its share instead of failing
    requests, the gauge's callback says down, and the one try costs about the timeout."""
    states: List[bool] = []

    async def scenario():
        lim = PgRateLimiter(NOWHERE.format(port=free_port()), replicas=2, timeout_s=0.3,
                            retry_s=60, on_store=states.append)
        out, took = await timed_admits(lim, 5)
        await lim.close()
        return out, took, lim.store_up

    out, took, up = run(scenario())
    assert admitted(out) == 2 and up is False  # 4 // 2
    assert took < 2  # one failed try (0.3 s), then the local limiter until retry_s
    assert states == [False]


def test_keys_without_limits_never_touch_the_store():
    states: List[bool] = []

    async def scenario():
        lim = PgRateLimiter(NOWHERE.format(port=free_port()), on_store=states.append)
        out = [await lim.admit("k", 100, 0, 0) for _ in range(3)]
        pool = lim._pool
        await lim.close()
        return out, pool

    out, pool = run(scenario())
    assert out == [None] * 3 and pool is None and states == []


@pytest.mark.postgres
def test_an_outage_is_the_local_share_and_the_store_is_shared_again_after(pg_dsn):
    """The database's connections are cut and new ones refused (a proxy in front of it), then
    it answers again: each of two replicas admits its half meanwhile, and shares after."""
    url = urlsplit(pg_dsn)
    proxy = CommitCuttingProxy((url.hostname or "127.0.0.1", url.port or 5432))
    states: List[bool] = []

    def cut() -> None:
        proxy.refuse = True
        with psycopg.connect(pg_dsn, autocommit=True) as conn:  # not through the proxy
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE application_name = 'tokenmeter-limits'")

    async def scenario():
        two = [PgRateLimiter(proxy.dsn(pg_dsn), replicas=2, timeout_s=0.5, retry_s=0.3,
                             on_store=states.append) for _ in range(2)]
        assert admitted(await _round_robin(two, 2, "warm", 1, 100, 0)) == 2
        assert all(lim.store_up for lim in two)
        cut()
        t0 = time.monotonic()
        down = await _round_robin(two, 12, "key_down", 1, rpm=6, tpm=0)
        took = time.monotonic() - t0
        was_up = [lim.store_up for lim in two]
        proxy.refuse = False
        await asyncio.sleep(0.4)  # past retry_s: the next admission asks the database again
        back = await _round_robin(two, 12, "key_back", 1, rpm=6, tpm=0)
        up = [lim.store_up for lim in two]
        await _close(two)
        return down, took, was_up, back, up

    try:
        down, took, was_up, back, up = run(scenario())
    finally:
        proxy.close()
    # RPM 6 over two replicas, database unreachable: each admits its 3, so together 6, not 12.
    assert not any(was_up)
    assert admitted(down) == 6 and all(admitted(down[i::2]) == 3 for i in range(2))
    assert took < 5  # failed tries cost at most the timeout, once per retry_s
    assert all(up)
    assert [r is None for r in back] == [True] * 6 + [False] * 6  # shared again: the first six
    assert False in states and states[-1] is True  # what the metric gauge is told


@pytest.mark.postgres
def test_a_database_that_does_not_answer_in_time_is_the_local_share(pg_dsn):
    """A key's lock held elsewhere (a wedged session): the admission gives up at its deadline
    instead of holding the request, and the replica limits at its share until retry_s."""
    states: List[bool] = []

    async def scenario():
        lim = PgRateLimiter(pg_dsn, replicas=2, timeout_s=0.3, retry_s=60, on_store=states.append)
        assert await lim.admit("k", 1, 4, 0) is None  # the table and function exist now
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f"SELECT pg_advisory_lock({LOCK_CLASS}, hashtext('k'))")
            out, took = await timed_admits(lim, 4)
        await lim.close()
        return out, took, lim.store_up

    out, took, up = run(scenario())
    assert admitted(out) == 2 and up is False  # 4 // 2, counted locally
    assert took < 2
    assert states == [True, False]


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("REDIS_URL", "LIMIT_STORE", "LEDGER"):
        monkeypatch.delenv(f"TOKENMETER_{name}", raising=False)


PG_LEDGER = "postgresql://tokenmeter@127.0.0.1:5432/tokenmeter"


@pytest.mark.parametrize("ledger, redis_url, store, chosen", [
    (PG_LEDGER, None, "auto", "postgres"),
    ("postgres://u@db/x", None, "auto", "postgres"),
    (PG_LEDGER, "redis://127.0.0.1:6379/0", "auto", "redis"),
    ("ledger.sqlite3", "redis://127.0.0.1:6379/0", "auto", "redis"),
    ("ledger.sqlite3", None, "auto", "memory"),
    (PG_LEDGER, None, "memory", "memory"),
    (PG_LEDGER, "redis://127.0.0.1:6379/0", "postgres", "postgres"),
])
def test_limit_store_auto_and_explicit(clean_env, ledger, redis_url, store, chosen):
    s = Settings(ledger=ledger, redis_url=redis_url, limit_store=store)
    assert s.limit_store == chosen


@pytest.mark.parametrize("ledger, redis_url, store, says", [
    ("ledger.sqlite3", None, "redis", "redis needs TOKENMETER_REDIS_URL"),
    ("ledger.sqlite3", "redis://127.0.0.1:6379/0", "postgres", "needs a PostgreSQL ledger"),
    (PG_LEDGER, None, "etcd", "must be one of auto, memory, redis, postgres"),
])
def test_limit_store_refuses_what_cannot_work(clean_env, ledger, redis_url, store, says):
    with pytest.raises(ValidationError) as err:
        Settings(ledger=ledger, redis_url=redis_url, limit_store=store)
    assert says in str(err.value)
    assert "limit_store" in str(err.value)


def test_a_malformed_redis_url_stops_the_start_before_the_model_loads(clean_env, tmp_path):
    with pytest.raises(ValidationError, match="must be a redis://"):
        Settings(redis_url="127.0.0.1:6379")
    # The command names the setting, though the model directory does not exist either: the
    # settings are checked first, so a typo costs no model load.
    r = cli(str(tmp_path / "ledger.sqlite3"), "serve", env={
        "TOKENMETER_REDIS_URL": "127.0.0.1:6379",
        "TOKENMETER_MODEL_DIR": str(tmp_path / "no-model")}, check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: settings: TOKENMETER_REDIS_URL: Value error, must be a redis://, rediss:// or "
        "unix:// URL, e.g. redis://127.0.0.1:6379/0"]


def test_shared_limiter_builds_the_chosen_store_without_connecting(clean_env):
    from prometheus_client import generate_latest

    from serving.app import shared_limiter
    from serving.metrics import Metrics
    from serving.shared_limits import RedisRateLimiter

    nowhere = NOWHERE.format(port=free_port())
    metrics = Metrics("i", "m", "1")
    lim = shared_limiter(Settings(ledger=nowhere), metrics)
    assert isinstance(lim, PgRateLimiter) and lim._pool is None  # nothing connected yet
    assert b'tokenmeter_limit_store_up{store="postgres"} 1.0' in generate_latest(metrics.registry)
    run(lim.close())
    assert shared_limiter(Settings(ledger="x.sqlite3"), Metrics("i", "m", "1")) is None
    assert shared_limiter(Settings(ledger=nowhere, limit_store="memory"),
                          Metrics("i", "m", "1")) is None
    redis = shared_limiter(Settings(ledger=nowhere, redis_url=f"redis://127.0.0.1:{free_port()}"),
                           Metrics("i", "m", "1"))
    assert isinstance(redis, RedisRateLimiter)
    run(redis.close())
