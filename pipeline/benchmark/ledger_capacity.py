"""Ledger capacity for the benchmark: billed rows per second the serving ledger commits durably on
its own (group commit, a bounded number in flight), on SQLite and, when a server is given, on a
scratch PostgreSQL database that is dropped afterwards. No HTTP, no model.
"""

from __future__ import annotations

import collections
import contextlib
import secrets
import time
from pathlib import Path
from typing import Dict, Optional

from pipeline.benchmark.loadgen import percentile
from pipeline.benchmark.scratch_db import scratch_database


def _event(key, n: int):
    from serving.ledger import BillingEvent, now_iso

    eid = f"evt_bench{n:08d}{secrets.token_hex(4)}"
    return BillingEvent(
        id=eid, ts=now_iso(), key_id=key.id, user_id=key.user_id, model="ledger-bench",
        model_version="1", input_tokens=50, output_tokens=8, currency="USD",
        input_price_per_1k="0.002", output_price_per_1k="0.002", input_cost_micro=100,
        output_cost_micro=16, cost_micro=116, latency_us=0, request_id=eid,
        instance_id="ledger-bench", idempotency_key=None, response="{}")


def measure(target: str, events: int, inflight: int, seconds: float) -> Dict[str, object]:
    """Commit up to `events` rows (stopping after `seconds`) with `inflight` outstanding."""
    from serving.keys import create_key
    from serving.ledger import open_ledger

    ledger = open_ledger(target)
    try:
        key, _ = create_key(ledger, "ledger-bench")
        ledger.start()
        pending: "collections.deque" = collections.deque()
        committed, n = 0, 0
        t0 = time.perf_counter()
        while n < events and time.perf_counter() - t0 < seconds:
            pending.append(ledger.commit_event(_event(key, n)))
            n += 1
            if len(pending) >= inflight:
                committed += pending.popleft().result(timeout=60).status == "billed"
        while pending:
            committed += pending.popleft().result(timeout=60).status == "billed"
        elapsed = time.perf_counter() - t0
        # One request alone (concurrency 1) pays a whole commit, its fsync included (the
        # group-commit wait is 0 by default: it only groups what queued meanwhile). With the
        # key lookup this is the metering cost on an idle endpoint.
        single, lookup = [], []
        for i in range(min(events, 100)):
            t = time.perf_counter()
            ledger.commit_event(_event(key, n + i)).result(timeout=60)
            single.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            ledger.key_by_hash("0" * 64)
            lookup.append((time.perf_counter() - t) * 1000)
        committed += len(single)
        rows = ledger.totals_for_instance("ledger-bench")["requests"]
    finally:
        ledger.close()
    return {"backend": ledger.kind, "events": committed, "rows_on_disk": rows,
            "seconds": round(elapsed, 4), "events_per_s": round((committed - len(single))
                                                                / elapsed, 1),
            "inflight": inflight, "single_commit_p50_ms": round(percentile(single, 50), 3),
            "key_lookup_p50_ms": round(percentile(lookup, 50), 3)}


def remove_sqlite(path: Path) -> None:
    """A SQLite ledger file and its WAL and shared-memory files, where present."""
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def sqlite(folder: Path, events: int, inflight: int, seconds: float) -> Dict[str, object]:
    path = folder / "ledger-capacity.sqlite3"
    remove_sqlite(path)
    try:
        return measure(str(path), events, inflight, seconds)
    finally:
        remove_sqlite(path)


def postgresql(dsn: Optional[str], events: int, inflight: int,
               seconds: float) -> Dict[str, object]:
    """On a scratch database created next to `dsn`'s; {"not_run": why} when impossible."""
    if not dsn:
        return {"not_run": "no PostgreSQL DSN (benchmark.ledger_pg_dsn or "
                           "TOKENMETER_TEST_PG_DSN)"}
    with contextlib.ExitStack() as stack:
        try:
            target = stack.enter_context(scratch_database(dsn, "tm_bench_", connect_timeout=5))
        except Exception as exc:  # psycopg raises many kinds; any of them means "not run"
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return {"not_run": f"cannot create a scratch database: {first}"}
        return measure(target, events, inflight, seconds)
