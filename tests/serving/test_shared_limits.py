"""Rate limits shared by replicas (serving/shared_limits.py) against a real `redis-server` on a
loopback port: limiters standing for separate replicas admit, together, exactly what one key's
RPM and TPM allow; while Redis is stopped each admits its share, so together they still hold
the limit; once Redis is back they share again. Marked `redis`: skipped at collection, naming
the package, where `redis-server` is not installed."""

from __future__ import annotations

import asyncio
import time
from typing import Iterator, List, Optional, Tuple

import pytest

from serving.limits import RateLimiter, Refusal
from serving.shared_limits import RedisRateLimiter
from tests.serving.conftest import free_port
from tests.serving.redis_server import RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def admitted(results: List[Optional[Refusal]]) -> int:
    return sum(r is None for r in results)


async def _round_robin(limiters, n: int, key: str, tokens: int, rpm: int, tpm: int
                       ) -> List[Optional[Refusal]]:
    return [await limiters[i % len(limiters)].admit(key, tokens, rpm, tpm) for i in range(n)]


def run(coro):
    return asyncio.run(coro)


async def timed_admits(lim, n: int) -> Tuple[List[Optional[Refusal]], float]:
    """`n` admissions of key "k" one after another (1 token, RPM 4): the results and the
    seconds they took."""
    t0 = time.monotonic()
    out = [await lim.admit("k", 1, 4, 0) for _ in range(n)]
    return out, time.monotonic() - t0


def replicas(url: str, n: int, **kw) -> List[RedisRateLimiter]:
    return [RedisRateLimiter(url, replicas=n, **kw) for _ in range(n)]


def test_replicas_share_one_rpm_and_one_tpm(redis_server):
    async def scenario():
        three = replicas(redis_server.url, 3)
        rpm = await _round_robin(three, 12, "key_rpm", 1, rpm=5, tpm=0)
        tpm = await _round_robin(three, 6, "key_tpm", 30, rpm=0, tpm=100)
        huge = await three[0].admit("key_huge", 101, 0, 100)
        other = await _round_robin(three, 3, "key_other", 1, rpm=5, tpm=0)
        for lim in three:
            await lim.close()
        return rpm, tpm, huge, other

    rpm, tpm, huge, other = run(scenario())
    # Five of twelve, spread over three replicas: the first five, then refusals saying when.
    assert [r is None for r in rpm] == [True] * 5 + [False] * 7
    assert {r.code for r in rpm[5:] if r} == {"rate_limit_exceeded"}
    assert all(1 <= r.retry_after_s <= 60 for r in rpm[5:] if r)
    # 30 tokens each against 100 a minute: three fit, the fourth would make 120.
    assert [r is None for r in tpm] == [True] * 3 + [False] * 3
    assert {r.code for r in tpm[3:] if r} == {"token_rate_limit_exceeded"}
    assert huge is not None and "exceeds" in huge.message
    assert admitted(other) == 3  # another key has its own window
    # What the same traffic gets from per-process limiters: each replica its own five.
    local = [RateLimiter() for _ in range(3)]
    assert sum(local[i % 3].admit("k", 1, 5, 0) is None for i in range(12)) == 12


def test_without_redis_each_replica_limits_at_its_share_and_shares_again_after(redis_server):
    states: List[bool] = []

    async def scenario():
        three = replicas(redis_server.url, 3, retry_s=0.2, on_store=states.append)
        redis_server.stop()
        # RPM 6 over three replicas, Redis down: each admits its 2, so together 6, not 18.
        down = await _round_robin(three, 12, "key_down", 1, rpm=6, tpm=0)
        assert not any(lim.store_up for lim in three)
        redis_server.start()
        await asyncio.sleep(0.3)  # past retry_s: the next admission asks Redis again
        back = await _round_robin(three, 12, "key_back", 1, rpm=6, tpm=0)
        up = [lim.store_up for lim in three]
        for lim in three:
            await lim.close()
        return down, back, up

    down, back, up = run(scenario())
    assert admitted(down) == 6
    assert all(admitted(down[i::3]) == 2 for i in range(3))
    assert all(up) and admitted(back) == 6
    assert [r is None for r in back] == [True] * 6 + [False] * 6  # shared again: the first six
    assert False in states and states[-1] is True  # what the metric gauge is told


def test_a_store_that_never_answered_is_the_same_fallback(tmp_path):
    """REDIS_URL pointing at nothing (a typo, Redis not started yet): the replica serves at
    its share instead of failing every request, and each try costs at most the timeout."""
    async def scenario():
        lim = RedisRateLimiter(f"redis://127.0.0.1:{free_port()}/0", replicas=2,
                                timeout_s=0.2, retry_s=60)
        out, took = await timed_admits(lim, 5)
        await lim.close()
        return out, took, lim.store_up

    out, took, up = run(scenario())
    assert admitted(out) == 2 and up is False
    assert took < 5  # one failed try, then the local limiter until retry_s
