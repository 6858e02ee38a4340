"""In-process caches of what the ledger knows, so a request needs no database round trip (and no
thread-pool hop) on the hot path: key records by key hash, and month-to-date spend by key and
by user. Each entry is kept `ttl_s` seconds (TOKENMETER_KEY_CACHE_S), which bounds staleness:

- a key revoked in the database (by `keys revoke`, from any process) is refused at most ttl_s
  later; a key is never accepted that the database never held;
- cached records and spend only serve the budget *pre-check*, which refuses early; the
  authority is the ledger's conditional update at commit, which reads the budgets from the
  database itself, so a stale figure can never overspend a budget.

Unknown keys are not cached (random keys must not fill memory). Knows nothing about HTTP.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, Generic, Hashable, Optional, Tuple, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class TtlCache(Generic[K, V]):
    """A dict whose entries expire `ttl_s` after they were stored; at most `max_entries`
    (when full, expired entries go first, then the whole cache: simple and bounded)."""

    def __init__(self, ttl_s: float, max_entries: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self.max_entries, self.clock = ttl_s, max_entries, clock
        self._data: Dict[K, Tuple[float, V]] = {}
        self._lock = threading.Lock()

    def get(self, key: K) -> Optional[V]:
        if self.ttl_s <= 0:
            return None
        hit = self._data.get(key)
        if hit is None or self.clock() - hit[0] >= self.ttl_s:
            return None
        return hit[1]

    def put(self, key: K, value: V) -> None:
        if self.ttl_s <= 0:
            return
        now = self.clock()
        with self._lock:
            if len(self._data) >= self.max_entries:
                self._data = {k: v for k, v in self._data.items() if now - v[0] < self.ttl_s}
                if len(self._data) >= self.max_entries:
                    self._data.clear()
            self._data[key] = (now, value)

    def update(self, key: K, change: Callable[[V], V]) -> None:
        """Replace a cached value by `change(value)`, keeping its age (e.g. add what this
        process billed since the read; other processes' spend shows after the next read)."""
        with self._lock:
            hit = self._data.get(key)
            if hit is not None:
                self._data[key] = (hit[0], change(hit[1]))

    def drop(self, key: K) -> None:
        with self._lock:
            self._data.pop(key, None)
