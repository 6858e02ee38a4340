"""A throw-away PostgreSQL database: created on the server a DSN names, given to the caller as
its own DSN, dropped `WITH (FORCE)` afterwards (open connections included). Used by the
benchmark's ledger capacity and by the PostgreSQL tests (`pg_dsn`).

Creates and drops one database; knows nothing of the ledger's schema (the ledger migrates it).
"""

from __future__ import annotations

import secrets
from contextlib import contextmanager
from typing import Iterator


def sibling_dsn(dsn: str, name: str) -> str:
    """`dsn` (a postgresql:// URL) naming database `name` instead; its query is kept."""
    base, sep, query = dsn.partition("?")
    if base.count("/") > 2:  # scheme://netloc/db: drop the database
        base = base.rsplit("/", 1)[0]
    return f"{base}/{name}{sep}{query}"


@contextmanager
def scratch_database(dsn: str, prefix: str = "tm_", connect_timeout: int = 10) -> Iterator[str]:
    """Create an empty database `<prefix><12 hex>` next to `dsn`'s and yield its DSN; drop it on
    leaving, whatever happened. Errors creating it (psycopg's, or ImportError) propagate."""
    import psycopg
    from psycopg import sql

    name = prefix + secrets.token_hex(6)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield sibling_dsn(dsn, name)
    finally:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=connect_timeout) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))
