"""Per-key RPM and TPM limits shared by every replica, held in a store they all use: Redis
here (RedisRateLimiter), PostgreSQL in serving.pg_limits. settings.limit_store picks one.

One atomic Lua script per admission keeps each key's sliding 60-second log in a sorted set,
scored by Redis's own clock (replicas' clocks never meet), each entry carrying the tokens it
reserved. The rules are serving.limits.RateLimiter's: a request is admitted only if the last
60 s of its key stay within both limits, tokens counted at their worst case.

When the store does not answer, each replica falls back to its own in-memory limiter at its
share of each limit (limit // `replicas`, at least 1), so the replicas together still admit at
most about the limit: an outage costs headroom, never the bound. (Failing open multiplies the
limit by the replica count; failing closed turns a limiter outage into an API outage, while
budgets, the money, are held by the ledger either way.) The store is tried again after
`retry_s`. SharedRateLimiter holds that part for every store. Knows nothing about HTTP or money.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from abc import ABC, abstractmethod
from typing import Any, Callable, Optional, Tuple, Type
from urllib.parse import urlsplit, urlunsplit

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


def redacted(url: str) -> str:
    """`url` without its password, for logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host  # IPv6
        netloc = f"{parts.username or ''}@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:  # not a URL we can read: say nothing of it
        return "<store>"


class SharedRateLimiter(ABC):
    """RPM/TPM per key across replicas, with the local fallback above; subclasses say how one
    admission is asked of their store (`_ask`).

    `admit` is a coroutine: a store round trip must not hold the event loop, and a store that
    stopped answering costs at most the subclass's timeout, once per `retry_s`. `on_store` is
    told True/False on every admission that asked the store (the gauge
    tokenmeter_limit_store_up). `window_s` is for tests (a window that frees in a second);
    the local fallback always uses 60 s.
    """

    store = "shared"  # what logs and the metric's label call it
    # What a store that does not answer raises; subclasses add their client's errors.
    store_errors: Tuple[Type[BaseException], ...] = (OSError,)

    def __init__(self, where: str, replicas: int = 1, retry_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_store: Optional[Callable[[bool], None]] = None,
                 window_s: float = WINDOW_S):
        self.where = redacted(where)  # the store's address in logs, no password
        self.replicas, self.retry_s, self.clock = replicas, retry_s, clock
        self.window_ms = int(window_s * 1000)
        self.local = RateLimiter(clock)
        self.on_store = on_store
        self.store_up = True
        self._retry_at = 0.0

    @abstractmethod
    async def _ask(self, key_id: str, tokens: int, rpm: int, tpm: int) -> Tuple[int, float]:
        """(kind, wait_ms) as the ADMIT script answers (see `refusal`); raises one of
        `store_errors` when the store does not answer in time."""

    @abstractmethod
    async def close(self) -> None:
        """Let go of the store's connections."""

    def _mark(self, up: bool, why: str = "") -> None:
        if up != self.store_up:
            if up:
                log.warning("rate-limit store %s (%s) answers again: limits are shared",
                            self.where, self.store)
            else:
                log.warning("rate-limit store %s (%s) is unavailable (%s): each replica now "
                            "limits at 1/%d of every limit until it answers", self.where,
                            self.store, why, self.replicas)
        self.store_up = up
        if self.on_store is not None:
            self.on_store(up)

    async def admit(self, key_id: str, tokens: int, rpm: int, tpm: int) -> Optional[Refusal]:
        if rpm <= 0 and tpm <= 0:  # no limits: the store is never asked
            return None
        if self.clock() >= self._retry_at:
            try:
                kind, wait_ms = await self._ask(key_id, tokens, rpm, tpm)
            except self.store_errors as exc:
                self._retry_at = self.clock() + self.retry_s
                self._mark(False, (f"{type(exc).__name__}: {exc}".splitlines() or [""])[0][:200])
            else:
                self._mark(True)
                return refusal(int(kind), float(wait_ms), rpm, tpm, tokens)
        return self.local.admit(key_id, tokens, share(rpm, self.replicas),
                                share(tpm, self.replicas))


class RedisRateLimiter(SharedRateLimiter):
    """The limits in Redis at `url`: one Lua script (ADMIT) per admission."""

    store = "redis"

    def __init__(self, url: str, replicas: int = 1, timeout_s: float = 0.25,
                 retry_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 on_store: Optional[Callable[[bool], None]] = None,
                 window_s: float = WINDOW_S):
        import redis.asyncio

        super().__init__(url, replicas, retry_s, clock, on_store, window_s)
        # Imported here: only replicas using Redis need the package.
        self.store_errors = (redis.RedisError, OSError)
        self.url = url
        self.client: Any = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.script = self.client.register_script(ADMIT)

    async def _ask(self, key_id: str, tokens: int, rpm: int, tpm: int) -> Tuple[int, float]:
        kind, wait_ms = await self.script(keys=[PREFIX + key_id],
                                          args=[rpm, tpm, tokens, self.window_ms,
                                                uuid.uuid4().hex])
        return int(kind), float(wait_ms)

    async def close(self) -> None:
        await self.client.aclose()
