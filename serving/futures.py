"""Settling the futures that worker threads (the model runner, the ledger writer) hand back to
the event loop. Knows nothing else; it must never raise into the thread that calls it.
"""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from typing import Any, Optional


def settle(future: Future, result: Any = None, error: Optional[BaseException] = None) -> None:
    """Give a future its outcome unless it already has one. A caller that gave up (a client
    gone, a timeout wrapper) cancels its future, and `set_result` on it raises
    InvalidStateError: that must not kill the thread that answers everyone else."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass
