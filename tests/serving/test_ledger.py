"""The ledger on real databases: SQLite files and PostgreSQL (the `postgres`-marked parameter,
skipped where TOKENMETER_TEST_PG_DSN is empty) — migrations, billing rows, Idempotency-Key
uniqueness, budgets that concurrent writers cannot overspend, and keys stored only as hashes."""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path

import pytest

from serving.keys import AuthError, authenticate, create_key, hash_key
from serving.ledger import (
    MIGRATIONS,
    BillingEvent,
    CommitResult,
    Ledger,
    now_iso,
    open_ledger,
)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def target(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "ledger.sqlite3")
    return request.getfixturevalue("pg_dsn")


def event(key, cost=22, tokens=(3, 8), idem=None, response='{"a":1}') -> BillingEvent:
    eid = "evt_" + uuid.uuid4().hex
    return BillingEvent(id=eid, ts=now_iso(), key_id=key.id, user_id=key.user_id, model="m",
                        model_version="1", input_tokens=tokens[0], output_tokens=tokens[1],
                        currency="USD", input_price_per_1k="0.002", output_price_per_1k="0.002",
                        input_cost_micro=cost // 2, output_cost_micro=cost - cost // 2,
                        cost_micro=cost, latency_us=1, request_id=eid, instance_id="test",
                        idempotency_key=idem, response=response)


def commit(ledger: Ledger, ev: BillingEvent, key) -> CommitResult:
    return ledger.commit_event(ev).result(timeout=60)


def test_migrations_are_idempotent(target):
    a = open_ledger(target)
    b = open_ledger(target)  # a second start (or replica) applies nothing twice
    assert a.schema_version() == b.schema_version() == MIGRATIONS[-1][0]
    a.close()
    b.close()


def test_billed_event_is_readable_after_commit(target):
    ledger = open_ledger(target)
    ledger.start()
    key, _ = create_key(ledger, "alice")
    ev = event(key)
    assert commit(ledger, ev, key).status == "billed"
    # A different connection (as another process would) sees the committed row.
    other = open_ledger(target)
    assert other.event_ids() == [ev.id]
    assert other.spent(key.id, ev.ts[:7]) == (22, 11)
    assert other.totals_for_instance("test") == {"requests": 1, "input_tokens": 3,
                                                 "output_tokens": 8, "cost_micro": 22}
    ledger.close()
    other.close()


def test_a_cancelled_commit_future_does_not_stop_the_writer(target):
    # A caller that gives up (client gone, timeout wrapper) cancels its future; the writer then
    # cannot set its result and must carry on committing for everyone else.
    ledger = open_ledger(target)
    ledger.start()
    key, _ = create_key(ledger, "alice")
    gone = event(key)
    assert ledger.commit_event(gone).cancel()  # still queued: its fsync is ahead
    later = event(key)
    assert commit(ledger, later, key).status == "billed"
    assert later.id in ledger.event_ids()
    ledger.close()


def test_same_idempotency_key_bills_once_and_returns_the_first_answer(target):
    ledger = open_ledger(target)
    ledger.start()
    key, _ = create_key(ledger, "alice")
    first = commit(ledger, event(key, idem="abc", response='{"first":1}'), key)
    again = commit(ledger, event(key, idem="abc", response='{"second":1}'), key)
    assert first.status == "billed"
    assert again.status == "duplicate" and again.response == '{"first":1}'
    assert len(ledger.event_ids()) == 1
    other_key, _ = create_key(ledger, "bob")  # keys are scoped per API key
    assert commit(ledger, event(other_key, idem="abc"), other_key).status == "billed"
    ledger.close()


def test_concurrent_writers_never_overspend_a_budget(target):
    """50 concurrent commits from two ledger instances (two connections and writer threads,
    as two processes would have) against a budget of exactly 10 events."""
    a, b = open_ledger(target), open_ledger(target)
    a.start()
    b.start()
    key, _ = create_key(a, "alice", budget_micro_usd=220)
    results, lock = [], threading.Lock()

    def one(i: int):
        r = commit(a if i % 2 else b, event(key, cost=22), key)
        with lock:
            results.append(r.status)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results.count("billed") == 10
    assert results.count("insufficient_quota") == 40
    assert a.spent(key.id, now_iso()[:7]) == (220, 110)
    assert len(a.event_ids()) == 10
    a.close()
    b.close()


def test_token_budget_is_enforced(target):
    ledger = open_ledger(target)
    ledger.start()
    key, _ = create_key(ledger, "alice", budget_tokens=25)
    statuses = [commit(ledger, event(key, tokens=(3, 8)), key).status for _ in range(3)]
    assert statuses == ["billed", "billed", "insufficient_quota"]
    ledger.close()


def test_revoked_keys_and_listing(target):
    ledger = open_ledger(target)
    key, _ = create_key(ledger, "alice", rpm=5)
    assert ledger.revoke_key(key.id) is True
    assert ledger.revoke_key(key.id) is False
    [listed] = ledger.list_keys()
    assert listed.revoked_at is not None and listed.rpm == 5
    ledger.close()


def stored_text(target: str) -> str:
    """Everything the database holds, as text: the SQLite files' raw bytes (database, WAL and
    shared memory), or every row of every table of the PostgreSQL database."""
    if "://" not in target:
        files = sorted(Path(target).parent.glob(Path(target).name + "*"))
        assert files
        return b"".join(f.read_bytes() for f in files).decode("latin-1")
    import psycopg
    from psycopg import sql

    with psycopg.connect(target) as conn:
        tables = [t for (t,) in conn.execute(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = current_schema()")]
        assert "api_keys" in tables
        return "\n".join(str(row) for t in tables for row in conn.execute(
            sql.SQL("SELECT t::text FROM {} t").format(sql.Identifier(t))))


def test_a_plaintext_key_is_stored_and_logged_nowhere(target, caplog):
    """The whole life of a key (create, authenticate, bill, revoke, refuse): only its sha256
    reaches the database or the log; the plaintext appears in neither."""
    caplog.set_level(logging.DEBUG)
    ledger = open_ledger(target)
    ledger.start()
    key, plaintext = create_key(ledger, "alice", budget_micro_usd=10 ** 6)
    assert authenticate(ledger, f"Bearer {plaintext}").id == key.id
    assert commit(ledger, event(key), key).status == "billed"
    ledger.revoke_key(key.id)
    with pytest.raises(AuthError) as refused:
        authenticate(ledger, f"Bearer {plaintext}")
    ledger.close()
    assert refused.value.code == "revoked_api_key" and plaintext not in str(refused.value)
    stored = stored_text(target)
    assert hash_key(plaintext) in stored and key.id in stored  # the scan does see the rows
    assert plaintext not in stored
    assert plaintext[len(key.prefix):] not in stored  # not even the part after the prefix
    assert plaintext not in caplog.text


@pytest.mark.postgres
def test_writer_recovers_after_losing_its_postgres_connection(pg_dsn):
    import psycopg

    ledger = open_ledger(pg_dsn)
    ledger.start()
    key, _ = create_key(ledger, "alice")
    assert commit(ledger, event(key), key).status == "billed"
    with psycopg.connect(pg_dsn, autocommit=True) as admin:  # as a database restart would
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")
    lost = ledger.commit_event(event(key))
    with pytest.raises(Exception, match="ledger commit failed"):
        lost.result(timeout=60)  # reported, never silently dropped or half-written
    assert commit(ledger, event(key), key).status == "billed"
    assert len(ledger.event_ids()) == 2  # the reader reconnects too
    ledger.close()


def test_user_budget_spans_all_keys_of_the_user(target):
    ledger = open_ledger(target)
    ledger.start()
    ledger.set_user_budget("carol", 22 * 5, None)
    k1, _ = create_key(ledger, "carol")
    k2, _ = create_key(ledger, "carol", budget_micro_usd=22 * 100)
    k1, k2 = ledger.list_keys()  # as authenticate() reads them: with the user's budget
    assert k1.user_budget_micro_usd == 110 and k1.has_budget
    futures = [ledger.commit_event(event(k)) for k in [k1, k2] * 10]
    statuses = [f.result(timeout=60).status for f in futures]
    assert statuses.count("billed") == 5
    assert ledger.user_spent("carol", now_iso()[:7]) == (110, 55)
    assert ledger.spent(k1.id, now_iso()[:7])[0] + ledger.spent(k2.id, now_iso()[:7])[0] == 110
    ledger.set_user_budget("carol", None, None)  # cleared: unlimited again
    k1 = ledger.list_keys()[0]
    assert commit(ledger, event(k1), k1).status == "billed"
    ledger.close()


def test_a_version_1_sqlite_ledger_is_upgraded_in_place(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
                     "applied_at TEXT NOT NULL)")
        for sql in MIGRATIONS[0][1]:
            conn.execute(sql)
        conn.execute("INSERT INTO schema_migrations VALUES (1, 'then')")
    ledger = open_ledger(str(path))
    ledger.start()
    assert ledger.schema_version() == MIGRATIONS[-1][0]
    key, _ = create_key(ledger, "dave")
    [key] = ledger.list_keys()
    assert commit(ledger, event(key), key).status == "billed"
    ledger.close()
