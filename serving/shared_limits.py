"""Per-key RPM and TPM limits shared by every replica, held in Redis.

One atomic Lua script per admission keeps each key's sliding 60-second log in a sorted set,
scored by Redis's own clock (replicas' clocks never meet), each entry carrying the tokens it
reserved. The rules are serving.limits.RateLimiter's: a request is admitted only if the last
60 s of its key stay within both limits, tokens counted at their worst case.

When Redis does not answer, each replica falls back to its own in-memory limiter at its share
of each limit (limit // `replicas`, at least 1), so the replicas together still admit at most
about the limit: an outage costs headroom, never the bound. (Failing open multiplies the limit
by the replica count; failing closed turns a limiter outage into an API outage, while budgets,
the money, are held by the ledger either way.) Redis is tried again after `retry_s`.
Knows nothing about HTTP or money.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from typing import Any, Callable, Optional

from serving.limits import WINDOW_S, RateLimiter, Refusal

log = logging.getLogger("tokenmeter")

# KEYS[1]: the key's log. ARGV: rpm, tpm, tokens, window (ms), a unique member id.
# Returns {0, 0} admitted; {1, wait_ms} over RPM; {2, wait_ms} over TPM; {3, wait_ms} a request
# larger than the TPM on its own. Members are "<tokens>:<id>".
ADMIT = """
local key = KEYS[1]
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local tokens, window = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
local n = redis.call('ZCARD', key)
if rpm > 0 and n >= rpm then
  local edge = redis.call('ZRANGE', key, n - rpm, n - rpm, 'WITHSCORES')
  return {1, tonumber(edge[2]) + window - now}
end
if tpm > 0 then
  if tokens > tpm then
    return {3, window}
  end
  local entries = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local used = 0
  for i = 1, #entries, 2 do
    used = used + tonumber(string.match(entries[i], '^(%d+):'))
  end
  if used + tokens > tpm then
    local freed, wait = 0, window
    for i = 1, #entries, 2 do
      freed = freed + tonumber(string.match(entries[i], '^(%d+):'))
      if used - freed + tokens <= tpm then
        wait = tonumber(entries[i + 1]) + window - now
        break
      end
    end
    return {2, wait}
  end
end
redis.call('ZADD', key, now, tokens .. ':' .. ARGV[5])
redis.call('PEXPIRE', key, window)
return {0, 0}
"""

PREFIX = "tokenmeter:limits:"


def share(limit: int, replicas: int) -> int:
    """One replica's part of a limit while the store is down (0 stays 0: no limit)."""
    return max(1, limit // replicas) if limit > 0 else 0


def refusal(kind: int, wait_ms: float, rpm: int, tpm: int, tokens: int) -> Optional[Refusal]:
    """The script's answer as serving.limits' Refusal (None: admitted)."""
    wait = max(1, math.ceil(wait_ms / 1000))
    if kind == 0:
        return None
    if kind == 1:
        return Refusal("rate_limit_exceeded", f"more than {rpm} requests per minute for this key",
                       wait)
    if kind == 3:
        return Refusal("token_rate_limit_exceeded", f"this request ({tokens} tokens) exceeds the "
                       f"key's {tpm} tokens per minute", int(WINDOW_S))
    return Refusal("token_rate_limit_exceeded", f"more than {tpm} tokens per minute for this key",
                   wait)


class SharedRateLimiter:
    """RPM/TPM per key across replicas (Redis at `url`), with the local fallback above.

    `admit` is a coroutine: a Redis round trip must not hold the event loop, and a Redis that
    stopped answering costs at most `timeout_s`, once per `retry_s`.
    """

    def __init__(self, url: str, replicas: int = 1, timeout_s: float = 0.25,
                 retry_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 on_store: Optional[Callable[[bool], None]] = None):
        import redis.asyncio

        # What a store that does not answer raises (imported here: only replicas need redis).
        self.store_errors = (redis.RedisError, OSError)
        self.url, self.replicas, self.retry_s, self.clock = url, replicas, retry_s, clock
        self.client: Any = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.script = self.client.register_script(ADMIT)
        self.local = RateLimiter(clock)
        self.on_store = on_store  # told True/False as the store answers or stops answering
        self.store_up = True
        self._retry_at = 0.0

    def _mark(self, up: bool, why: str = "") -> None:
        if up != self.store_up:
            if up:
                log.warning("rate-limit store %s answers again: limits are shared", self.url)
            else:
                log.warning("rate-limit store %s is unavailable (%s): each replica now limits "
                            "at 1/%d of every limit until it answers", self.url, why,
                            self.replicas)
        self.store_up = up
        if self.on_store is not None:
            self.on_store(up)

    async def admit(self, key_id: str, tokens: int, rpm: int, tpm: int) -> Optional[Refusal]:
        if rpm <= 0 and tpm <= 0:
            return None
        if self.clock() >= self._retry_at:
            try:
                kind, wait_ms = await self.script(keys=[PREFIX + key_id],
                                                  args=[rpm, tpm, tokens, int(WINDOW_S * 1000),
                                                        uuid.uuid4().hex])
            except self.store_errors as exc:
                self._retry_at = self.clock() + self.retry_s
                self._mark(False, f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
            else:
                self._mark(True)
                return refusal(int(kind), float(wait_ms), rpm, tpm, tokens)
        return self.local.admit(key_id, tokens, share(rpm, self.replicas),
                                share(tpm, self.replicas))

    async def close(self) -> None:
        await self.client.aclose()
