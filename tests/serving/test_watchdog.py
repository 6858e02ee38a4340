"""The watchdog restarts a worker thread that died (serving/watchdog.py): the ledger writer and
the model runner are killed for real (an asynchronous SystemExit raised inside the thread, as an
uncaught error would end it) while holding work; the watchdog notices, starts a new thread, and
what is queued or submitted afterwards is served. A stopped thread is not restarted."""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Callable, List

import numpy as np
import pytest

from serving.keys import create_key
from serving.ledger import open_ledger
from serving.runner import MicroBatcher
from serving.watchdog import Watchdog, Watched
from tests.serving.test_ledger import event

# The threads die of SystemExit on purpose; pytest would report each as unhandled.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")


def kill(thread: threading.Thread, wake: Callable[[], object]) -> None:
    """End `thread` with SystemExit raised inside it; `wake` gives it work so that it runs
    Python code (a thread blocked in a lock gets the exception only when it wakes)."""
    assert thread.ident is not None
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                   ctypes.py_object(SystemExit))
    assert n == 1
    wake()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the thread did not die"


def test_a_dead_ledger_writer_is_restarted_and_commits_what_comes_next(tmp_path):
    led = open_ledger(str(tmp_path / "ledger.sqlite3"))
    led.start()
    key, _ = create_key(led, "wd")
    restarted: List[str] = []
    dog = Watchdog([Watched("ledger writer", led.writer_alive, led.restart_writer)],
                   on_restart=restarted.append)
    try:
        assert dog.check() == []  # alive: nothing to do
        old = led._writer
        assert old is not None
        held = event(key)
        kill(old, lambda: led.commit_event(held))
        assert not led.writer_alive()
        assert dog.check() == ["ledger writer"] and restarted == ["ledger writer"]
        assert led.writer_alive()
        later = event(key)
        assert led.commit_event(later).result(timeout=30).status == "billed"
        assert later.id in set(led.event_ids())
        assert dog.restarts == {"ledger writer": 1}
    finally:
        led.stop()
        led.close()
    assert dog.check() == []  # stopped on purpose: not restarted
    assert not led.writer_alive()


def test_a_dead_model_runner_is_restarted_by_the_watchdog_thread():
    def predict(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.tile(np.array([[0.25, 0.75]], np.float32), (len(ids), 1))

    b = MicroBatcher(predict, buckets=[4], max_batch=4, max_wait_s=0.0)
    b.start()
    dog = Watchdog([Watched("model runner", b.alive, b.restart)], interval_s=0.05)
    dog.start()
    try:
        kill(b._thread, lambda: b.submit([[1, 2]]))
        end = time.monotonic() + 10
        while not b.alive() and time.monotonic() < end:
            time.sleep(0.02)
        assert b.alive() and dog.restarts == {"model runner": 1}
        out = b.submit([[1, 2, 3]]).result(timeout=10)
        assert out.shape == (1, 2) and float(out[0, 1]) == 0.75
    finally:
        dog.stop()
        b.stop()
    assert not b.restart()  # stopped on purpose: not restarted
