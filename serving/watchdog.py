"""The watchdog of the endpoint's worker threads (the model runner, the ledger writer): checks
them every second and starts a new one, with an error in the log, when one has died.

Both loops already survive a failing batch or row; a thread can still die of what they cannot
catch (an error in a logging handler, MemoryError, a bug). Their queues outlive the thread, so
the new one serves what is waiting; what the dead one held is settled by the requests' own
deadlines (BILLING_DEADLINE_S: 503, never billed twice). It must not touch requests or queues.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

log = logging.getLogger("tokenmeter")


@dataclass(frozen=True)
class Watched:
    name: str
    alive: Callable[[], bool]
    restart: Callable[[], bool]  # True if it started a new thread


class Watchdog:
    def __init__(self, watched: Sequence[Watched], interval_s: float = 1.0,
                 on_restart: Optional[Callable[[str], None]] = None):
        self.watched, self.interval_s, self.on_restart = list(watched), interval_s, on_restart
        self.restarts: Dict[str, int] = {w.name: 0 for w in self.watched}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def add(self, watched: Watched) -> None:
        """Watch one more thread (a model version loaded while serving)."""
        self.restarts.setdefault(watched.name, 0)
        self.watched = self.watched + [watched]  # a new list: the loop may be iterating

    def check(self) -> List[str]:
        """Restart every watched thread found dead; their names."""
        restarted = []
        for w in self.watched:
            if w.alive():
                continue
            try:
                started = w.restart()
            except Exception:  # keep watching the others; say why this one did not start
                log.exception("watchdog: could not restart the %s thread", w.name)
                continue
            if started:
                log.error("watchdog: the %s thread had died; started a new one", w.name)
                self.restarts[w.name] += 1
                restarted.append(w.name)
                if self.on_restart is not None:
                    self.on_restart(w.name)
        return restarted

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.check()
