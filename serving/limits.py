"""Per-key requests-per-minute and tokens-per-minute limits over a sliding 60-second window.

Held in this process's memory: one replica's limiter, and every replica's fallback while the
shared store is down (serving.shared_limits holds the limits replicas share). Budgets, which are
money, live in the ledger instead. Knows nothing about HTTP or money.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, Optional, Tuple

WINDOW_S = 60.0


@dataclass
class Refusal:
    code: str  # "rate_limit_exceeded" (RPM) | "token_rate_limit_exceeded" (TPM)
    message: str
    retry_after_s: int


class RateLimiter:
    """Admits a request only if the last 60 s of this key stay within its RPM and TPM.

    Tokens are reserved at admission (input tokens + the largest possible output), so
    concurrent requests cannot all slip under the limit together.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._log: Dict[str, Deque[Tuple[float, int]]] = {}

    def admit(self, key_id: str, tokens: int, rpm: int, tpm: int) -> Optional[Refusal]:
        if rpm <= 0 and tpm <= 0:
            return None
        now = self.clock()
        with self._lock:
            log = self._log.setdefault(key_id, deque())
            while log and log[0][0] <= now - WINDOW_S:
                log.popleft()
            if rpm > 0 and len(log) >= rpm:
                wait = log[len(log) - rpm][0] + WINDOW_S - now
                return Refusal("rate_limit_exceeded",
                               f"more than {rpm} requests per minute for this key",
                               max(1, math.ceil(wait)))
            if tpm > 0:
                if tokens > tpm:
                    return Refusal("token_rate_limit_exceeded",
                                   f"this request ({tokens} tokens) exceeds the key's "
                                   f"{tpm} tokens per minute", int(WINDOW_S))
                used = sum(n for _, n in log)
                if used + tokens > tpm:
                    # Wait until enough old entries leave the window.
                    freed, wait = 0, WINDOW_S
                    for t, n in log:
                        freed += n
                        if used - freed + tokens <= tpm:
                            wait = t + WINDOW_S - now
                            break
                    return Refusal("token_rate_limit_exceeded",
                                   f"more than {tpm} tokens per minute for this key",
                                   max(1, math.ceil(wait)))
            log.append((now, tokens))
        return None
