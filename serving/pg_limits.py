"""Per-key RPM and TPM limits shared by every replica, held in PostgreSQL: the store when the
ledger is PostgreSQL and no Redis is configured (settings.limit_store).

The same rules, refusals and outage fallback as serving.shared_limits (SharedRateLimiter holds
them); only the store differs. Each admission is one round trip: a call of the function
tokenmeter_rate_admit, a single statement (so its own transaction, in autocommit) that takes
`pg_advisory_xact_lock(LOCK_CLASS, hashtext(key id))`, so one admission of a key runs at a time
across every replica, then reads the clock (`clock_timestamp()`: the database's, after the
lock, so a key's entries are in time order), drops the key's entries older than the window,
counts and sums the rest, and inserts the new entry if admitted -- the Lua script of the Redis
store, in PL/pgSQL. Under READ COMMITTED each statement of the function sees what the previous
lock holder committed.

The table (tokenmeter_rate_window) and the function are this module's own, created on first
use (not ledger migrations). The table is UNLOGGED: no WAL per admission, and a database crash
empties it -- that forgets at most the last minute's window, i.e. one limit's worth of extra
headroom, never money (budgets are in the ledger). A standby has no copy, so after a failover
the windows start empty, which is the same minute.

Blocking psycopg calls run in this limiter's own threads (`pool_size` of them, with a psycopg
ConnectionPool of as many connections), not psycopg's async connections: a pool of those is
bound to one event loop (tests drive the app from several), and cancelling an async query on a
dead link waits up to 10 s for the server's answer to the cancel, while a thread can be left
behind at the deadline. Own threads, not anyio's shared ones: an admission must not queue
behind model and ledger work and then miss its deadline. So a store that does not answer costs
a request at most `timeout_s` (the connection wait, the server-side statement and lock
timeouts, and a deadline on the whole call); then the store is treated as down, its pool is
dropped (a restarted server leaves every pooled connection broken) and a fresh one is tried
after `retry_s`. Knows nothing about HTTP or money.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional, Tuple

from serving.limits import WINDOW_S
from serving.shared_limits import SharedRateLimiter

# The names and lock numbers below are written out in the SQL (no string formatting of SQL:
# bandit B608); these constants name them for the tests, and the check after SETUP keeps
# the two in step.
TABLE = "tokenmeter_rate_window"
SETUP_LOCK = 727275  # pg_advisory_xact_lock(bigint) while creating (the ledger's is 727274)
LOCK_CLASS = 727276  # pg_advisory_xact_lock(LOCK_CLASS, hashtext(key)): its own lock space

# Returns (kind, wait_ms) as the Redis ADMIT script: 0 admitted; 1 over RPM; 2 over TPM;
# 3 a request larger than the TPM on its own. Keys that stop sending leave their last window
# behind; one admission in a thousand clears every key's expired entries.
ADMIT_FUNCTION = """
CREATE OR REPLACE FUNCTION tokenmeter_rate_admit(
    p_key text, p_rpm bigint, p_tpm bigint, p_tokens bigint, p_window_ms bigint,
    OUT kind integer, OUT wait_ms double precision)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    win interval := p_window_ms * interval '1 millisecond';
    t timestamptz;
    n bigint;
    used bigint;
    edge timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(727276, hashtext(p_key));
    t := clock_timestamp();
    DELETE FROM tokenmeter_rate_window w WHERE w.key_id = p_key AND w.admitted_at <= t - win;
    SELECT count(*), coalesce(sum(w.tokens), 0) INTO n, used
        FROM tokenmeter_rate_window w WHERE w.key_id = p_key;
    kind := 0;
    wait_ms := 0;
    IF p_rpm > 0 AND n >= p_rpm THEN
        SELECT w.admitted_at INTO edge FROM tokenmeter_rate_window w WHERE w.key_id = p_key
            ORDER BY w.admitted_at OFFSET n - p_rpm LIMIT 1;
        kind := 1;
        wait_ms := extract(epoch FROM edge + win - t) * 1000;
        RETURN;
    END IF;
    IF p_tpm > 0 THEN
        IF p_tokens > p_tpm THEN
            kind := 3;
            wait_ms := p_window_ms;
            RETURN;
        END IF;
        IF used + p_tokens > p_tpm THEN
            -- Wait until enough old entries leave the window.
            SELECT s.admitted_at INTO edge FROM (
                SELECT w.admitted_at, sum(w.tokens) OVER (
                    ORDER BY w.admitted_at ROWS UNBOUNDED PRECEDING) AS freed
                FROM tokenmeter_rate_window w WHERE w.key_id = p_key) s
                WHERE used - s.freed + p_tokens <= p_tpm ORDER BY s.admitted_at LIMIT 1;
            kind := 2;
            wait_ms := coalesce(extract(epoch FROM edge + win - t) * 1000, p_window_ms);
            RETURN;
        END IF;
    END IF;
    INSERT INTO tokenmeter_rate_window (key_id, admitted_at, tokens) VALUES (p_key, t, p_tokens);
    IF random() < 0.001 THEN
        DELETE FROM tokenmeter_rate_window w WHERE w.admitted_at <= t - win;
    END IF;
END
$fn$
"""

SETUP = [
    "SELECT pg_advisory_xact_lock(727275)",  # replicas starting together take turns
    """CREATE UNLOGGED TABLE IF NOT EXISTS tokenmeter_rate_window (
        key_id TEXT NOT NULL,
        admitted_at TIMESTAMPTZ NOT NULL,
        tokens BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS tokenmeter_rate_window_key_at"
    " ON tokenmeter_rate_window (key_id, admitted_at)",
    ADMIT_FUNCTION,
]

if not (f"pg_advisory_xact_lock({LOCK_CLASS}, " in ADMIT_FUNCTION and TABLE in SETUP[1]
        and f"pg_advisory_xact_lock({SETUP_LOCK})" in SETUP[0]):
    raise RuntimeError("pg_limits: the constants and the SQL name different objects")

ADMIT = "SELECT kind, wait_ms FROM tokenmeter_rate_admit(%s, %s, %s, %s, %s)"


class PgRateLimiter(SharedRateLimiter):
    """The limits in the PostgreSQL database at `dsn` (the ledger's), shared by the replicas;
    the fallback while it does not answer is SharedRateLimiter's."""

    store = "postgres"

    def __init__(self, dsn: str, replicas: int = 1, timeout_s: float = 0.5,
                 retry_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 on_store: Optional[Callable[[bool], None]] = None,
                 window_s: float = WINDOW_S, pool_size: int = 4):
        import psycopg

        super().__init__(dsn, replicas, retry_s, clock, on_store, window_s)
        # psycopg_pool's PoolTimeout and PoolClosed are psycopg.OperationalErrors; the
        # deadline raises asyncio.TimeoutError (not TimeoutError before Python 3.11).
        self.store_errors = (psycopg.Error, asyncio.TimeoutError, TimeoutError, OSError)
        self.dsn, self.timeout_s, self.pool_size = dsn, timeout_s, pool_size
        ms = max(1, int(timeout_s * 1000))
        self.connect_kwargs = dict(
            autocommit=True,
            connect_timeout=max(2, int(timeout_s + 1)),  # libpq's least; the pool waits less
            # READ COMMITTED whatever the server's default: the function's reads must see
            # what the previous holder of the key's lock committed.
            options=f"-c statement_timeout={ms} -c lock_timeout={ms}"
                    r" -c default_transaction_isolation=read\ committed",
            # A thread left behind on a dead link ends when the kernel gives up on it.
            tcp_user_timeout=max(2000, 4 * ms),
            application_name="tokenmeter-limits")
        self._executor = ThreadPoolExecutor(max_workers=pool_size,
                                            thread_name_prefix="pg-limits")
        self._pool: Any = None
        self._ready = False  # the table and function exist (checked once per pool)
        self._lock = threading.Lock()

    def _get_pool(self) -> Any:
        from psycopg_pool import ConnectionPool

        with self._lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self.dsn, kwargs=self.connect_kwargs, min_size=1, max_size=self.pool_size,
                    timeout=self.timeout_s, open=False, name="tokenmeter-limits")
                self._pool.open(wait=False)
                self._ready = False
            return self._pool

    def _drop_pool(self, pool: Any) -> None:
        """Forget `pool` (if still the current one) and close it in the background: its
        connections may all be broken, and closing waits for its workers."""
        with self._lock:
            if pool is None or self._pool is not pool:
                return
            self._pool = None
        threading.Thread(target=pool.close, kwargs={"timeout": 1.0}, daemon=True,
                         name="pg-limits-close").start()

    def _ask_blocking(self, key_id: str, tokens: int, rpm: int, tpm: int) -> Tuple[int, float]:
        pool = self._get_pool()
        try:
            with pool.connection(timeout=self.timeout_s) as conn:
                if not self._ready:
                    with conn.transaction():
                        for sql in SETUP:
                            conn.execute(sql)
                    self._ready = True
                row = conn.execute(ADMIT, (key_id, rpm, tpm, tokens, self.window_ms)).fetchone()
        except BaseException:
            self._drop_pool(pool)
            raise
        return int(row[0]), float(row[1])

    async def _ask(self, key_id: str, tokens: int, rpm: int, tpm: int) -> Tuple[int, float]:
        pool = self._pool
        call = asyncio.get_running_loop().run_in_executor(
            self._executor, self._ask_blocking, key_id, tokens, rpm, tpm)
        try:
            # Past the deadline a call not yet started is cancelled; one under way is left to
            # its thread (an entry it still inserts only makes the window stricter).
            return await asyncio.wait_for(call, self.timeout_s)
        except asyncio.TimeoutError:
            self._drop_pool(self._pool if pool is None else pool)
            raise TimeoutError(f"no answer within {self.timeout_s:g} s") from None

    async def close(self) -> None:
        self._executor.shutdown(wait=False)
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:  # closing waits for the pool's threads: not on the event loop
            await asyncio.get_running_loop().run_in_executor(None, pool.close)
