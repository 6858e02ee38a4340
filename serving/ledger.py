"""The billing ledger: API keys, monthly spend and one row per billed request, in SQLite (WAL,
default) or PostgreSQL (from a DSN) with the same schema and migrations.

Billing rows go through one writer thread that commits them in groups; `commit_event` returns
only after the row is on disk, so the app can send the response after it. The budget check and
the spend update are one conditional UPDATE inside that transaction: concurrent requests, even
from several processes sharing PostgreSQL, cannot overspend. Knows nothing about HTTP.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Type,
)

from tenacity import (
    Retrying,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from serving.errors import first_line
from serving.futures import settle

if TYPE_CHECKING:  # settings are read by the caller; the ledger only takes their values
    from serving.settings import Settings

# Budgets left empty are stored as NULL; the conditional UPDATE compares against this.
NO_LIMIT = 2 ** 62
# PostgreSQL: how long a read waits for a pooled connection while the server is unreachable
# (the request then gets 503 ledger_unavailable).
POOL_WAIT_S = 5.0

MIGRATIONS: List[Tuple[int, List[str]]] = [
    (1, [
        """CREATE TABLE IF NOT EXISTS api_keys (
            id TEXT PRIMARY KEY,
            user_id TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL,
            name TEXT NOT NULL DEFAULT '',
            is_admin INTEGER NOT NULL DEFAULT 0,
            rpm INTEGER NOT NULL DEFAULT 0,
            tpm INTEGER NOT NULL DEFAULT 0,
            budget_micro_usd BIGINT,
            budget_tokens BIGINT,
            created_at TEXT NOT NULL,
            revoked_at TEXT)""",
        """CREATE TABLE IF NOT EXISTS spend (
            key_id TEXT NOT NULL,
            period TEXT NOT NULL,
            micro_usd BIGINT NOT NULL DEFAULT 0,
            tokens BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (key_id, period))""",
        """CREATE TABLE IF NOT EXISTS billing_events (
            id TEXT PRIMARY KEY,
            ts TEXT NOT NULL,
            key_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            model TEXT NOT NULL,
            model_version TEXT NOT NULL,
            input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL,
            currency TEXT NOT NULL,
            input_price_per_1k TEXT NOT NULL,
            output_price_per_1k TEXT NOT NULL,
            input_cost_micro BIGINT NOT NULL,
            output_cost_micro BIGINT NOT NULL,
            cost_micro BIGINT NOT NULL,
            latency_us BIGINT NOT NULL,
            request_id TEXT NOT NULL,
            instance_id TEXT NOT NULL,
            idempotency_key TEXT,
            response TEXT NOT NULL,
            UNIQUE (key_id, idempotency_key))""",
        "CREATE INDEX IF NOT EXISTS billing_events_user_ts ON billing_events (user_id, ts)",
        "CREATE INDEX IF NOT EXISTS billing_events_instance ON billing_events (instance_id)",
    ]),
    (2, [
        # Per-user monthly budgets, shared by all of a user's keys.
        """CREATE TABLE IF NOT EXISTS user_budgets (
            user_id TEXT PRIMARY KEY,
            budget_micro_usd BIGINT,
            budget_tokens BIGINT)""",
        """CREATE TABLE IF NOT EXISTS user_spend (
            user_id TEXT NOT NULL,
            period TEXT NOT NULL,
            micro_usd BIGINT NOT NULL DEFAULT 0,
            tokens BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (user_id, period))""",
    ]),
    (3, [
        # What the request was (texts, truncate, model): a key reused for another request is
        # refused instead of replaying an answer to a different question. NULL on older rows.
        "ALTER TABLE billing_events ADD COLUMN request_hash TEXT",
    ]),
    (4, [
        # Final invoices of closed months, stored once (serving.invoices): re-issuing one
        # returns these bytes, whatever was written to billing_events since.
        """CREATE TABLE IF NOT EXISTS invoices (
            user_id TEXT NOT NULL,
            period TEXT NOT NULL,
            number TEXT NOT NULL UNIQUE,
            issued_at TEXT NOT NULL,
            body TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            PRIMARY KEY (user_id, period))""",
    ]),
    (5, [
        # The price tier a request was billed at (serving.pricing.TIERS); NULL on older rows,
        # which were all standard.
        "ALTER TABLE billing_events ADD COLUMN price_tier TEXT",
    ]),
    (6, [
        # Which version of a model answers unpinned requests (serving.versions.Rollout), read
        # by every replica; and the validate gate's verdict per version (what may be promoted).
        """CREATE TABLE IF NOT EXISTS rollouts (
            model TEXT PRIMARY KEY,
            stable TEXT NOT NULL,
            canary TEXT,
            canary_percent INTEGER NOT NULL DEFAULT 0,
            previous TEXT,
            updated_at TEXT NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS model_gates (
            model TEXT NOT NULL,
            version TEXT NOT NULL,
            passed INTEGER NOT NULL,
            detail TEXT NOT NULL,
            recorded_at TEXT NOT NULL,
            PRIMARY KEY (model, version))""",
    ]),
]


class LedgerError(RuntimeError):
    """The ledger cannot be opened or written; the message says which and why."""


class LedgerBusy(LedgerError):
    """More billing rows are waiting for the writer than the queue holds (backpressure)."""


class OutcomeUnknown(LedgerError):
    """A COMMIT was sent and the database could not be asked afterwards whether it took: the
    row may exist. Only an Idempotency-Key retry can tell the client which."""


@dataclass
class KeyRecord:
    id: str
    user_id: str
    prefix: str
    name: str
    is_admin: bool
    rpm: int
    tpm: int
    budget_micro_usd: Optional[int]
    budget_tokens: Optional[int]
    created_at: str
    revoked_at: Optional[str]
    # The user's budget (all keys of the user together), read with the key.
    user_budget_micro_usd: Optional[int] = None
    user_budget_tokens: Optional[int] = None

    @property
    def has_budget(self) -> bool:
        return any(b is not None for b in (self.budget_micro_usd, self.budget_tokens,
                                           self.user_budget_micro_usd, self.user_budget_tokens))


SELECT_KEYS = ("SELECT k.id, k.user_id, k.prefix, k.name, k.is_admin, k.rpm, k.tpm,"
               " k.budget_micro_usd, k.budget_tokens, k.created_at, k.revoked_at,"
               " ub.budget_micro_usd, ub.budget_tokens"
               " FROM api_keys k LEFT JOIN user_budgets ub ON ub.user_id = k.user_id")


def _key(row) -> KeyRecord:
    return KeyRecord(row[0], row[1], row[2], row[3], bool(row[4]), int(row[5]), int(row[6]),
                     row[7], row[8], row[9], row[10], row[11], row[12])


@dataclass
class BillingEvent:
    id: str
    ts: str
    key_id: str
    user_id: str
    model: str
    model_version: str
    input_tokens: int
    output_tokens: int
    currency: str
    input_price_per_1k: str
    output_price_per_1k: str
    input_cost_micro: int
    output_cost_micro: int
    cost_micro: int
    latency_us: int
    request_id: str
    instance_id: str
    idempotency_key: Optional[str]
    response: str
    request_hash: Optional[str] = None
    price_tier: Optional[str] = None

    def columns(self) -> Tuple[Any, ...]:
        return (self.id, self.ts, self.key_id, self.user_id, self.model, self.model_version,
                self.input_tokens, self.output_tokens, self.currency, self.input_price_per_1k,
                self.output_price_per_1k, self.input_cost_micro, self.output_cost_micro,
                self.cost_micro, self.latency_us, self.request_id, self.instance_id,
                self.idempotency_key, self.response, self.request_hash, self.price_tier)


INSERT_EVENT = (
    "INSERT INTO billing_events (id, ts, key_id, user_id, model, model_version, input_tokens,"
    " output_tokens, currency, input_price_per_1k, output_price_per_1k, input_cost_micro,"
    " output_cost_micro, cost_micro, latency_us, request_id, instance_id, idempotency_key,"
    " response, request_hash, price_tier)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
# Within the retention window only: an older use of the key no longer counts (Stripe's 24 h).
FIND_IDEMPOTENT = ("SELECT response, request_hash FROM billing_events"
                   " WHERE key_id = ? AND idempotency_key = ? AND ts >= ?")
# Frees a key whose last use is past the window, so that a new request may take it (the
# column is UNIQUE per API key); the row itself, its tokens and cost stay as they were.
RELEASE_IDEMPOTENT = ("UPDATE billing_events SET idempotency_key = NULL"
                      " WHERE key_id = ? AND idempotency_key = ? AND ts < ?")
ENSURE_SPEND = "INSERT INTO spend (key_id, period) VALUES (?, ?) ON CONFLICT DO NOTHING"
# The atomic budget check + spend: the row only moves if it stays within both budgets, read
# in the same statement (a budget changed a moment ago counts, whatever the caller cached).
SPEND = ("UPDATE spend SET micro_usd = micro_usd + ?, tokens = tokens + ?"
         " WHERE key_id = ? AND period = ?"
         " AND micro_usd + ? <= COALESCE((SELECT budget_micro_usd FROM api_keys WHERE id = ?), ?)"
         " AND tokens + ? <= COALESCE((SELECT budget_tokens FROM api_keys WHERE id = ?), ?)")
ENSURE_USER_SPEND = ("INSERT INTO user_spend (user_id, period) VALUES (?, ?)"
                     " ON CONFLICT DO NOTHING")
USER_SPEND = ("UPDATE user_spend SET micro_usd = micro_usd + ?, tokens = tokens + ?"
              " WHERE user_id = ? AND period = ?"
              " AND micro_usd + ? <= COALESCE((SELECT budget_micro_usd FROM user_budgets"
              " WHERE user_id = ?), ?)"
              " AND tokens + ? <= COALESCE((SELECT budget_tokens FROM user_budgets"
              " WHERE user_id = ?), ?)")


@dataclass
class CommitResult:
    status: str  # "billed" | "duplicate" | "insufficient_quota"
    response: Optional[str] = None  # the first answer, for "duplicate"
    request_hash: Optional[str] = None  # the first request's, for "duplicate"
    # The row as written, for "billed" (priced in the transaction with volume tiers); not
    # part of equality: a result is its outcome.
    event: Optional[BillingEvent] = field(default=None, compare=False)


# The event of a request priced in the writer's transaction, given the tokens its user was
# billed earlier in its month (volume tiers: serving.pricing).
Reprice = Callable[[int], BillingEvent]


def now_iso(t: Optional[datetime] = None) -> str:
    t = t or datetime.now(timezone.utc)
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def period_of(ts: str) -> str:
    """Budgets are monthly, by UTC calendar month of the event time."""
    return ts[:7]


@dataclass
class _Pending:
    event: BillingEvent
    future: Future
    reprice: Optional[Reprice] = None
    result: Optional[CommitResult] = None
    error: Optional[Exception] = None


class Ledger:
    """Common logic; subclasses say how to connect and which SQL dialect details differ."""

    placeholder = "?"
    integrity_errors: Tuple[Type[Exception], ...] = (sqlite3.IntegrityError,)
    kind = "sqlite"
    # A user's tokens this month, read to price a request by volume. SQLite's writer holds the
    # database's write lock (BEGIN IMMEDIATE); PostgreSQL locks the row (another process may
    # be pricing the same user).
    month_tokens_sql = "SELECT tokens FROM user_spend WHERE user_id = ? AND period = ?"

    def __init__(self, commit_wait_s: float = 0.0, commit_max_batch: int = 256,
                 max_pending: int = 10_000, idempotency_retention_s: float = 86_400,
                 outcome_wait_s: float = 20.0):
        self.commit_wait_s, self.commit_max_batch = commit_wait_s, commit_max_batch
        self.max_pending = max_pending
        self.idempotency_retention_s = idempotency_retention_s
        # How long an unknown COMMIT outcome is asked after (the database may be restarting).
        self.outcome_wait_s = outcome_wait_s
        self._local = threading.local()
        # Bounded: a stalled database fills it, and callers are told (LedgerBusy) instead of
        # queueing without end. One slot more for the stop signal.
        self._queue: "queue.Queue[Optional[_Pending]]" = queue.Queue(max_pending + 1)
        self._writer: Optional[threading.Thread] = None
        self._writer_lock = threading.Lock()
        self._stopping = False

    # -- connections ---------------------------------------------------------------------
    def _connect(self):
        raise NotImplementedError

    def _sql(self, sql: str) -> str:
        return sql if self.placeholder == "?" else sql.replace("?", self.placeholder)

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A connection for reads and short writes (not the writer's): one per thread, replaced
        when it fails, since a database restart leaves it broken for good."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        try:
            yield conn
        except LedgerError:
            raise
        except Exception:
            self._drop_conn()
            raise

    def _exec(self, conn, sql: str, params: Sequence[Any] = ()):
        return conn.execute(self._sql(sql), tuple(params))

    def _begin_write(self, conn) -> None:
        self._exec(conn, "BEGIN")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> List[tuple]:
        # A connection found broken is replaced and the read tried once more.
        for attempt in Retrying(stop=stop_after_attempt(2), reraise=True,
                                retry=retry_if_not_exception_type(LedgerError)):
            with attempt, self._connection() as conn:
                return list(self._exec(conn, sql, params).fetchall())
        raise AssertionError("unreachable")  # Retrying re-raises the last error

    def _drop_conn(self) -> None:
        conn, self._local.conn = getattr(self._local, "conn", None), None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken; closing is best effort
                pass

    def _transaction(self, conn, statements: Sequence[Tuple[str, Sequence[Any]]]) -> List[int]:
        self._begin_write(conn)
        try:
            counts = [self._exec(conn, s, p).rowcount for s, p in statements]
            self._exec(conn, "COMMIT")
            return counts
        except BaseException:
            try:
                self._exec(conn, "ROLLBACK")
            except Exception:  # the connection broke: the server rolled back already
                pass
            raise

    def _write(self, statements: Sequence[Tuple[str, Sequence[Any]]]) -> List[int]:
        """Run statements in one transaction; return their rowcounts."""
        with self._connection() as conn:
            return self._transaction(conn, statements)

    # -- schema --------------------------------------------------------------------------
    def _lock_migrations(self, conn) -> None:
        """Held for the migration transaction, so two starting replicas do not race."""

    def migrate(self) -> int:
        with self._connection() as conn:
            self._begin_write(conn)
            try:
                self._lock_migrations(conn)
                self._exec(conn, "CREATE TABLE IF NOT EXISTS schema_migrations ("
                                 "version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
                done = {r[0] for r in self._exec(conn,
                                                 "SELECT version FROM schema_migrations")}
                for version, statements in MIGRATIONS:
                    if version in done:
                        continue
                    for s in statements:
                        self._exec(conn, s)
                    self._exec(conn, "INSERT INTO schema_migrations (version, applied_at) "
                                     "VALUES (?, ?)", (version, now_iso()))
                self._exec(conn, "COMMIT")
            except BaseException:
                self._exec(conn, "ROLLBACK")
                raise
        return max(v for v, _ in MIGRATIONS)

    def schema_version(self) -> int:
        return int(self._query("SELECT MAX(version) FROM schema_migrations")[0][0])

    def writable(self) -> bool:
        """True when a write transaction can be opened (used by /readyz)."""
        try:
            self._write([("UPDATE schema_migrations SET version = version WHERE version < 0",
                          ())])
            return True
        except Exception:
            return False

    # -- keys ----------------------------------------------------------------------------
    def add_key(self, key: KeyRecord, key_hash: str) -> None:
        self._write([("INSERT INTO api_keys (id, user_id, key_hash, prefix, name, is_admin, "
                      "rpm, tpm, budget_micro_usd, budget_tokens, created_at) "
                      "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (key.id, key.user_id, key_hash, key.prefix, key.name, int(key.is_admin),
                       key.rpm, key.tpm, key.budget_micro_usd, key.budget_tokens,
                       key.created_at))])

    def key_by_hash(self, key_hash: str) -> Optional[KeyRecord]:
        rows = self._query(SELECT_KEYS + " WHERE k.key_hash = ?", (key_hash,))
        return _key(rows[0]) if rows else None

    def list_keys(self) -> List[KeyRecord]:
        return [_key(r) for r in
                self._query(SELECT_KEYS + " ORDER BY k.created_at, k.id")]

    def revoke_key(self, key_id: str) -> bool:
        counts = self._write([("UPDATE api_keys SET revoked_at = ? "
                               "WHERE id = ? AND revoked_at IS NULL", (now_iso(), key_id))])
        return counts[0] == 1

    # -- billing -------------------------------------------------------------------------
    def idempotency_cutoff(self) -> str:
        """Uses of an Idempotency-Key before this time are forgotten (the retention window)."""
        return now_iso(datetime.now(timezone.utc)
                       - timedelta(seconds=self.idempotency_retention_s))

    def find_idempotent(self, key_id: str, idempotency_key: str
                        ) -> Optional[Tuple[str, Optional[str]]]:
        """(the first answer, its request hash) billed under this key's Idempotency-Key within
        the retention window."""
        rows = self._query(FIND_IDEMPOTENT, (key_id, idempotency_key,
                                             self.idempotency_cutoff()))
        return (rows[0][0], rows[0][1]) if rows else None

    def spent(self, key_id: str, period: str) -> Tuple[int, int]:
        """(micro-USD, tokens) billed to a key in a month."""
        rows = self._query("SELECT micro_usd, tokens FROM spend WHERE key_id = ? AND period = ?",
                           (key_id, period))
        return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)

    def user_spent(self, user_id: str, period: str) -> Tuple[int, int]:
        """(micro-USD, tokens) billed to all of a user's keys in a month."""
        rows = self._query("SELECT micro_usd, tokens FROM user_spend"
                           " WHERE user_id = ? AND period = ?", (user_id, period))
        return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)

    def user_budget(self, user_id: str) -> Tuple[Optional[int], Optional[int]]:
        """(micro-USD, tokens) monthly budget of a user; None where there is none."""
        rows = self._query("SELECT budget_micro_usd, budget_tokens FROM user_budgets"
                           " WHERE user_id = ?", (user_id,))
        return (rows[0][0], rows[0][1]) if rows else (None, None)

    def set_user_budget(self, user_id: str, budget_micro_usd: Optional[int],
                        budget_tokens: Optional[int]) -> None:
        """Set (or, with both None, clear) a user's monthly budget."""
        self._write([("INSERT INTO user_budgets (user_id, budget_micro_usd, budget_tokens)"
                      " VALUES (?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET"
                      " budget_micro_usd = excluded.budget_micro_usd,"
                      " budget_tokens = excluded.budget_tokens",
                      (user_id, budget_micro_usd, budget_tokens))])

    # -- model versions (serving.versions owns the rules; these are its rows) ----------------
    def rollout(self, model: str) -> Optional[Tuple[str, Optional[str], int, Optional[str]]]:
        """(stable, canary, canary_percent, previous) of a model; None: never set."""
        rows = self._query("SELECT stable, canary, canary_percent, previous FROM rollouts"
                           " WHERE model = ?", (model,))
        return (rows[0][0], rows[0][1], int(rows[0][2]), rows[0][3]) if rows else None

    def set_rollout(self, model: str, stable: str, canary: Optional[str], canary_percent: int,
                    previous: Optional[str]) -> None:
        self._write([("INSERT INTO rollouts (model, stable, canary, canary_percent, previous,"
                      " updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (model) DO UPDATE SET"
                      " stable = excluded.stable, canary = excluded.canary,"
                      " canary_percent = excluded.canary_percent,"
                      " previous = excluded.previous, updated_at = excluded.updated_at",
                      (model, stable, canary, canary_percent, previous, now_iso()))])

    def gate(self, model: str, version: str) -> Optional[Tuple[bool, str]]:
        """(passed, detail) of the validate gate recorded for a version; None: none."""
        rows = self._query("SELECT passed, detail FROM model_gates WHERE model = ? AND"
                           " version = ?", (model, version))
        return (bool(rows[0][0]), str(rows[0][1])) if rows else None

    def set_gate(self, model: str, version: str, passed: bool, detail: str) -> None:
        self._write([("INSERT INTO model_gates (model, version, passed, detail, recorded_at)"
                      " VALUES (?, ?, ?, ?, ?) ON CONFLICT (model, version) DO UPDATE SET"
                      " passed = excluded.passed, detail = excluded.detail,"
                      " recorded_at = excluded.recorded_at",
                      (model, version, int(passed), detail, now_iso()))])

    def start(self) -> None:
        with self._writer_lock:
            if self._writer is None:
                self._stopping = False
                self._writer = threading.Thread(target=self._write_loop, name="ledger-writer",
                                                daemon=True)
                self._writer.start()

    def stop(self) -> None:
        with self._writer_lock:
            writer, self._stopping = self._writer, True
        if writer is not None:
            self._queue.put(None)
            writer.join(timeout=10)
            self._writer = None

    def restart_writer(self) -> bool:
        """A new writer if the started one died (the watchdog); False if it runs or stopped.
        The queue outlives the thread: the new writer commits what waits there."""
        with self._writer_lock:
            if self._stopping or self._writer is None or self._writer.is_alive():
                return False
            self._writer = threading.Thread(target=self._write_loop, name="ledger-writer",
                                            daemon=True)
            self._writer.start()
            return True

    def writer_alive(self) -> bool:
        """Whether the writer thread runs (started and not dead): /readyz reports it."""
        return self._writer is not None and self._writer.is_alive()

    def commit_event(self, event: BillingEvent, reprice: Optional[Reprice] = None) -> Future:
        """Queue a billing row; the future resolves to a CommitResult once it is durable.

        It is billed only if it fits the key's and the user's budgets for its month, as the
        database holds them at commit (read there, never from a possibly cached key record).
        With `reprice`, the row written is `reprice(tokens its user was billed earlier in the
        month)`, read under the user's spend-row lock in the same transaction: concurrent
        requests of one user are priced one after the other, never both from the same figure."""
        if not self.writer_alive():  # nobody would ever resolve the future
            raise LedgerError("the ledger writer is not running")
        if self._queue.qsize() >= self.max_pending:
            raise LedgerBusy(f"{self.max_pending} billing rows are already waiting")
        fut: Future = Future()
        self._queue.put(_Pending(event, fut, reprice))
        return fut

    def _apply(self, conn, p: _Pending, cutoff: str) -> CommitResult:
        e = p.event
        if e.idempotency_key is not None:
            rows = self._exec(conn, FIND_IDEMPOTENT,
                              (e.key_id, e.idempotency_key, cutoff)).fetchall()
            if rows:
                return CommitResult("duplicate", rows[0][0], rows[0][1])
            self._exec(conn, RELEASE_IDEMPOTENT, (e.key_id, e.idempotency_key, cutoff))
        period = period_of(e.ts)
        user_row = False  # whether the user's spend row is known to exist (and locked, on PG)
        if p.reprice is not None:
            self._exec(conn, ENSURE_USER_SPEND, (e.user_id, period))
            row = self._exec(conn, self.month_tokens_sql, (e.user_id, period)).fetchone()
            e = p.event = p.reprice(int(row[0]))
            user_row = True
        tokens = e.input_tokens + e.output_tokens

        def spend(ensure: Optional[str], update: str, owner: str) -> bool:
            """Add this event to one spend row unless that would pass its budget."""
            if ensure is not None:
                self._exec(conn, ensure, (owner, period))
            return self._exec(conn, update, (
                e.cost_micro, tokens, owner, period, e.cost_micro, owner, NO_LIMIT,
                tokens, owner, NO_LIMIT)).rowcount == 1

        # User row before key row, groups sorted by (user, key): every transaction takes the
        # row locks in one global order, so two PostgreSQL writers cannot deadlock.
        if not spend(None if user_row else ENSURE_USER_SPEND, USER_SPEND, e.user_id):
            return CommitResult("insufficient_quota")
        if not spend(ENSURE_SPEND, SPEND, e.key_id):
            return CommitResult("insufficient_quota")
        self._exec(conn, INSERT_EVENT, e.columns())
        return CommitResult("billed", event=e)

    def _apply_guarded(self, conn, p: _Pending, cutoff: str) -> None:
        self._exec(conn, "SAVEPOINT ev")
        try:
            result = self._apply(conn, p, cutoff)
            if result.status == "insufficient_quota":
                self._exec(conn, "ROLLBACK TO SAVEPOINT ev")
            self._exec(conn, "RELEASE SAVEPOINT ev")
            p.result = result
        except self.integrity_errors:
            # Another process committed the same Idempotency-Key between our check and insert.
            self._exec(conn, "ROLLBACK TO SAVEPOINT ev")
            self._exec(conn, "RELEASE SAVEPOINT ev")
            rows = self._exec(conn, FIND_IDEMPOTENT,
                              (p.event.key_id, p.event.idempotency_key, cutoff)).fetchall()
            if not rows:
                raise
            p.result = CommitResult("duplicate", rows[0][0], rows[0][1])
        except Exception as exc:
            self._exec(conn, "ROLLBACK TO SAVEPOINT ev")
            self._exec(conn, "RELEASE SAVEPOINT ev")
            p.error = LedgerError(f"billing row not written: {first_line(exc)}")

    def _write_loop(self) -> None:
        conn = None  # the writer's own connection, reopened after a failure
        while True:
            group, stop = self._next_group()
            # A request that gave up before its row was taken (its future cancelled) is not
            # billed; once taken, the future can no longer be cancelled and the row stands.
            group = [p for p in group if p.future.set_running_or_notify_cancel()]
            if group:
                conn = self._commit_group(conn, group)
            if stop:
                return

    def _next_group(self) -> Tuple[List[_Pending], bool]:
        """The next rows to commit together, and whether the stop signal came after them."""
        first = self._queue.get()
        if first is None:
            return [], True
        group = [first]
        deadline = time.monotonic() + self.commit_wait_s
        while len(group) < self.commit_max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else \
                    self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return group, True
            group.append(item)
        return group, False

    def _commit_group(self, conn, group: List[_Pending]):
        """One transaction for the group; every future settled, here or by a resolver thread.
        Returns the connection to use next (None after a failure: the next group reconnects)."""
        commit_sent, session = False, None
        try:
            if conn is None:
                conn = self._connect()
            session = self._session_id(conn)
            self._begin_write(conn)
            cutoff = self.idempotency_cutoff()
            # Owners (user, key) whose row failed in this group, e.g. a row lock held elsewhere
            # past lock_timeout: their other rows fail at once instead of each waiting it out.
            failed: Dict[str, LedgerError] = {}
            for p in sorted(group, key=lambda p: (p.event.user_id, p.event.key_id)):
                p.result, p.error = None, None
                owners = ("user:" + p.event.user_id, "key:" + p.event.key_id)
                earlier = next((failed[o] for o in owners if o in failed), None)
                if earlier is not None:
                    p.error = earlier
                    continue
                self._apply_guarded(conn, p, cutoff)
                if p.error is not None:
                    failed.update(dict.fromkeys(owners, p.error))
            commit_sent = True
            self._exec(conn, "COMMIT")  # one fsync for the whole group
        except Exception as exc:
            if conn is not None:
                try:
                    self._exec(conn, "ROLLBACK")
                    conn.close()
                except Exception:  # the connection may be gone already
                    pass
            if commit_sent:
                # The COMMIT may have taken: ask the database, off this thread, so that new
                # groups are not held up while it is unreachable.
                threading.Thread(target=self._resolve, args=(group, exc, session),
                                 daemon=True, name="ledger-resolver").start()
            else:  # it failed before COMMIT: rolled back, nothing of it is stored
                for p in group:
                    settle(p.future, *self._unbilled(p, exc))
            return None
        for p in group:
            settle(p.future, p.result, p.error)
        return conn

    @staticmethod
    def _unbilled(p: _Pending, exc: Exception) -> Tuple[Optional[CommitResult],
                                                        Optional[Exception]]:
        """How a row of a group that did not commit is answered: a replay or a refusal as
        decided (neither wrote anything), else an error saying nothing was billed."""
        if p.result is not None and p.result.status != "billed":
            return p.result, None
        return None, LedgerError(f"ledger commit failed: {first_line(exc)}")

    def _session_id(self, conn) -> Optional[int]:
        """The database session behind a connection, where the server has one (PostgreSQL)."""
        return None

    def _session_alive(self, conn, session: int) -> bool:
        return False

    def _resolve(self, group: List[_Pending], exc: Exception,
                 session: Optional[int] = None) -> None:
        """Answer a group whose COMMIT raised. The COMMIT can reach the database and the
        connection break before its answer returns, so the outcome is looked up, never guessed:
        rows found are billed, the others were not. The lookup is retried with backoff while the
        database is unreachable (a restart), for up to outcome_wait_s; after that the answer
        says the outcome is unknown (an Idempotency-Key retry tells). The lookup waits until the
        broken session has ended: until then its COMMIT may still be taking effect."""
        try:
            found = self._existing_ids_retrying([p.event.id for p in group], session)
        except Exception as lookup_exc:
            for p in group:
                if p.result is not None and p.result.status != "billed":
                    settle(p.future, p.result)
                else:
                    settle(p.future, error=OutcomeUnknown(
                        f"ledger commit failed ({first_line(exc)}) and its outcome could not be "
                        f"read within {self.outcome_wait_s:g} s ({first_line(lookup_exc)})"))
            return
        for p in group:
            if p.event.id in found and p.result is not None:
                settle(p.future, p.result)
            else:
                settle(p.future, *self._unbilled(p, exc))

    def _existing_ids_retrying(self, ids: Sequence[str], session: Optional[int]) -> set:
        for attempt in Retrying(stop=stop_after_delay(self.outcome_wait_s), reraise=True,
                                wait=wait_exponential(multiplier=0.05, max=2)):
            with attempt:
                return self._existing_ids(ids, session)
        raise AssertionError("unreachable")  # Retrying re-raises the last error

    def _existing_ids(self, ids: Sequence[str], session: Optional[int] = None) -> set:
        """Which of `ids` are in billing_events, read on a new connection once `session` (the
        broken writer's) has ended."""
        conn = self._connect()
        try:
            if session is not None and self._session_alive(conn, session):
                raise LedgerError(f"session {session} is still finishing its transaction")
            # One lookup per id (a failed group is rare and at most COMMIT_MAX_BATCH rows);
            # a fixed statement rather than one built for the group's size.
            return {i for i in ids if self._exec(
                conn, "SELECT 1 FROM billing_events WHERE id = ?", (i,)).fetchall()}
        finally:
            conn.close()

    # -- reading -------------------------------------------------------------------------
    def usage(self, user_id: str, start: str, end_exclusive: str) -> List[Dict[str, Any]]:
        """Requests, tokens and cost by UTC day and model for one user, start <= day < end."""
        rows = self._query(
            "SELECT substr(ts, 1, 10) AS day, model, COUNT(*), SUM(input_tokens),"
            " SUM(output_tokens), SUM(cost_micro) FROM billing_events"
            " WHERE user_id = ? AND ts >= ? AND ts < ?"
            " GROUP BY substr(ts, 1, 10), model ORDER BY 1, 2",
            (user_id, start, end_exclusive))
        return [{"date": r[0], "model": r[1], "requests": int(r[2]),
                 "input_tokens": int(r[3]), "output_tokens": int(r[4]),
                 "cost_micro": int(r[5])} for r in rows]

    def daily_usage(self, start: str, end_exclusive: str) -> List[Dict[str, Any]]:
        """Requests, tokens and cost by UTC day, user, key and model, start <= ts < end (what
        serving.reports groups further)."""
        rows = self._query(
            "SELECT substr(ts, 1, 10), user_id, key_id, model, COUNT(*), SUM(input_tokens),"
            " SUM(output_tokens), SUM(cost_micro) FROM billing_events"
            " WHERE ts >= ? AND ts < ?"
            " GROUP BY substr(ts, 1, 10), user_id, key_id, model ORDER BY 1, 2, 3, 4",
            (start, end_exclusive))
        return [{"date": r[0], "user": r[1], "key_id": r[2], "model": r[3],
                 "requests": int(r[4]), "input_tokens": int(r[5]), "output_tokens": int(r[6]),
                 "cost_micro": int(r[7])} for r in rows]

    def report(self, start: str, end_exclusive: str) -> List[Dict[str, Any]]:
        rows = self._query(
            "SELECT user_id, COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cost_micro)"
            " FROM billing_events WHERE ts >= ? AND ts < ? GROUP BY user_id ORDER BY user_id",
            (start, end_exclusive))
        return [{"user": r[0], "requests": int(r[1]), "input_tokens": int(r[2]),
                 "output_tokens": int(r[3]), "cost_micro": int(r[4])} for r in rows]

    def invoice_lines(self, user_id: str, start: str, end_exclusive: str
                      ) -> List[Dict[str, Any]]:
        """A user's billed requests in [start, end) by model, price tier and unit prices:
        counts, tokens and the sums of the per-request amounts (micro-USD)."""
        rows = self._query(
            "SELECT model, COALESCE(price_tier, 'standard'), input_price_per_1k,"
            " output_price_per_1k, COUNT(*), SUM(input_tokens), SUM(output_tokens),"
            " SUM(input_cost_micro), SUM(output_cost_micro) FROM billing_events"
            " WHERE user_id = ? AND ts >= ? AND ts < ?"
            " GROUP BY model, COALESCE(price_tier, 'standard'), input_price_per_1k,"
            " output_price_per_1k ORDER BY 1, 2, 3, 4",
            (user_id, start, end_exclusive))
        return [{"model": r[0], "tier": r[1], "input_price_per_1k": r[2],
                 "output_price_per_1k": r[3], "requests": int(r[4]),
                 "input_tokens": int(r[5]), "output_tokens": int(r[6]),
                 "input_micro": int(r[7]), "output_micro": int(r[8])} for r in rows]

    def users_billed(self, start: str, end_exclusive: str) -> List[str]:
        return [r[0] for r in self._query(
            "SELECT DISTINCT user_id FROM billing_events WHERE ts >= ? AND ts < ?"
            " ORDER BY user_id", (start, end_exclusive))]

    def stored_invoice(self, user_id: str, period: str) -> Optional[Tuple[str, str]]:
        """(body, sha256) of the final invoice stored for a user and month."""
        rows = self._query("SELECT body, sha256 FROM invoices WHERE user_id = ? AND period = ?",
                           (user_id, period))
        return (rows[0][0], rows[0][1]) if rows else None

    def store_invoice(self, user_id: str, period: str, number: str, issued_at: str,
                      body: str, sha256: str) -> None:
        """Store a final invoice unless one is stored already (the first one stays)."""
        self._write([("INSERT INTO invoices (user_id, period, number, issued_at, body, sha256)"
                      " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                      (user_id, period, number, issued_at, body, sha256))])

    def totals_for_instance(self, instance_id: str) -> Dict[str, int]:
        r = self._query("SELECT COUNT(*), COALESCE(SUM(input_tokens), 0),"
                        " COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost_micro), 0)"
                        " FROM billing_events WHERE instance_id = ?", (instance_id,))[0]
        return {"requests": int(r[0]), "input_tokens": int(r[1]), "output_tokens": int(r[2]),
                "cost_micro": int(r[3])}

    def event_ids(self) -> List[str]:
        return [r[0] for r in self._query("SELECT id FROM billing_events")]

    def close(self) -> None:
        self.stop()
        self._drop_conn()


class SQLiteLedger(Ledger):
    kind = "sqlite"

    def __init__(self, path: Path, busy_timeout_ms: int = 5_000, **kw):
        super().__init__(**kw)
        self.path = Path(path)
        self.busy_timeout_ms = busy_timeout_ms
        if not self.path.parent.is_dir():
            raise LedgerError(f"ledger folder {self.path.parent} does not exist")

    def _connect(self):
        # isolation_level=None: we issue BEGIN/COMMIT ourselves (one transaction per group).
        # A lock held elsewhere fails the write after busy_timeout_ms (503, unbilled) rather
        # than stalling the writer and every request queued behind it.
        wait_s = self.busy_timeout_ms / 1000
        try:
            conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=wait_s)
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is fsynced before commit_event returns (the row is on disk).
            conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the SQLite ledger {self.path}: "
                              + first_line(exc)) from exc
        return conn

    def _begin_write(self, conn) -> None:
        # IMMEDIATE takes the write lock up front, so the budget read-modify-write in the
        # group cannot interleave with another writer (a second process, the keys CLI).
        self._exec(conn, "BEGIN IMMEDIATE")


class PostgresLedger(Ledger):
    kind = "postgresql"
    placeholder = "%s"
    month_tokens_sql = Ledger.month_tokens_sql + " FOR UPDATE"

    def __init__(self, dsn: str, statement_timeout_ms: int = 10_000,
                 lock_timeout_ms: int = 5_000, pool_size: int = 8, **kw):
        import psycopg

        super().__init__(**kw)
        self.dsn = dsn
        self.pool_size = pool_size
        self.integrity_errors = (psycopg.IntegrityError,)
        self._pool: Any = None
        self._pool_lock = threading.Lock()
        # autocommit: we issue BEGIN/COMMIT ourselves, as with SQLite. No statement may stall
        # the writer (and every request behind it) for long: a row lock held elsewhere or a
        # slow server fails the group, which answers 503, unbilled. TCP keepalives notice a
        # server that vanished (a partition) within about a minute.
        self.connect_kwargs: Dict[str, Any] = dict(
            autocommit=True, connect_timeout=10,
            options=f"-c statement_timeout={statement_timeout_ms}"
                    f" -c lock_timeout={lock_timeout_ms}",
            keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)

    def _connect(self):
        """A connection of its own (the writer's, an outcome lookup's), not from the pool."""
        import psycopg

        try:
            return psycopg.connect(self.dsn, **self.connect_kwargs)
        except psycopg.OperationalError as exc:
            raise LedgerError("cannot connect to PostgreSQL: "
                              + first_line(exc, "unreachable")) from exc

    def _get_pool(self):
        from psycopg_pool import ConnectionPool

        with self._pool_lock:
            if self._pool is None:
                # check: a connection broken by a server restart is found and replaced when it
                # is taken out, not handed to a request.
                self._pool = ConnectionPool(
                    self.dsn, kwargs=self.connect_kwargs, min_size=1, max_size=self.pool_size,
                    timeout=POOL_WAIT_S, check=ConnectionPool.check_connection, open=True,
                    name="tokenmeter-ledger")
            return self._pool

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A pooled connection for reads and short writes (keys CLI, /readyz, spend reads)."""
        from psycopg_pool import PoolTimeout

        try:
            with self._get_pool().connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise LedgerError("cannot connect to PostgreSQL: " + first_line(exc)) from exc

    def _drop_conn(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()

    def _lock_migrations(self, conn) -> None:
        self._exec(conn, "SELECT pg_advisory_xact_lock(727274)")

    def _session_id(self, conn) -> Optional[int]:
        return int(conn.info.backend_pid)

    def _session_alive(self, conn, session: int) -> bool:
        # A backend whose client vanished still runs the COMMIT it had received; once it has
        # exited, its transaction is decided and a lookup is the truth.
        return bool(self._exec(conn, "SELECT 1 FROM pg_stat_activity WHERE pid = ?",
                               (session,)).fetchall())


def open_ledger(target: str, commit_wait_s: float = 0.0,
                commit_max_batch: int = 256, max_pending: int = 10_000,
                pg_statement_timeout_ms: int = 10_000, pg_lock_timeout_ms: int = 5_000,
                sqlite_busy_timeout_ms: int = 5_000, pg_pool_size: int = 8,
                idempotency_retention_s: float = 86_400, outcome_wait_s: float = 20.0
                ) -> Ledger:
    """A migrated ledger: `postgresql://...` (or `postgres://`) or a SQLite file path."""
    kw: Dict[str, Any] = dict(commit_wait_s=commit_wait_s, commit_max_batch=commit_max_batch,
                              max_pending=max_pending,
                              idempotency_retention_s=idempotency_retention_s,
                              outcome_wait_s=outcome_wait_s)
    if target.startswith(("postgresql://", "postgres://")):
        ledger: Ledger = PostgresLedger(target, pg_statement_timeout_ms, pg_lock_timeout_ms,
                                        pg_pool_size, **kw)
        # One direct connection first: an unreachable server is named at once, with its
        # reason, rather than after the pool's wait.
        ledger._connect().close()
    else:
        ledger = SQLiteLedger(Path(target), sqlite_busy_timeout_ms, **kw)
    try:
        ledger.migrate()
    except LedgerError:
        raise
    except Exception as exc:
        raise LedgerError(f"cannot open the ledger {ledger.kind}: {exc}") from exc
    return ledger


def open_ledger_from(s: "Settings") -> Ledger:
    """The ledger the settings describe (TOKENMETER_LEDGER and its timeouts), migrated."""
    return open_ledger(s.ledger, s.commit_wait_ms / 1000, s.commit_max_batch,
                       s.ledger_queue_size, s.pg_statement_timeout_ms, s.pg_lock_timeout_ms,
                       s.sqlite_busy_timeout_ms, s.pg_pool_size, s.idempotency_retention_s,
                       s.billing_deadline_s * 0.8)


def day_range(start: Optional[str], end: Optional[str]) -> Tuple[str, str]:
    """Inclusive YYYY-MM-DD dates (default: this UTC month so far) -> [start, end) timestamps."""
    today = datetime.now(timezone.utc).date()
    s = datetime.strptime(start, "%Y-%m-%d").date() if start else today.replace(day=1)
    e = datetime.strptime(end, "%Y-%m-%d").date() if end else today
    if e < s:
        raise ValueError("end is before start")
    if e == date.max:  # the day after it does not exist (OverflowError)
        raise ValueError(f"end must be before {date.max.isoformat()}")
    return s.isoformat(), (e + timedelta(days=1)).isoformat()


def month_bounds(period: str) -> Tuple[datetime, datetime]:
    """[first instant, first instant of the next month) of a `YYYY-MM` period, UTC."""
    try:
        start = datetime.strptime(period, "%Y-%m").replace(tzinfo=timezone.utc)
    except ValueError:
        raise ValueError(f"period must be YYYY-MM, e.g. 2026-11: {period!r}") from None
    if len(period) != 7:
        raise ValueError(f"period must be YYYY-MM, e.g. 2026-11: {period!r}")
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end
