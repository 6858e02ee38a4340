"""Keys through the real CLI and a real SQLite ledger: shown once, stored only as a hash,
listed without secrets, revocable; header parsing."""

from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest

from serving.keys import AuthError, authenticate, bearer_token
from serving.ledger import open_ledger
from tests.serving.conftest import cli


def test_key_is_printed_once_and_stored_hashed(tmp_path):
    ledger = str(tmp_path / "l.sqlite3")
    out = cli(ledger, "keys", "create", "--user", "alice", "--rpm", "7", "--budget-usd", "2.5")
    [plaintext] = [ln.split(": ", 1)[1] for ln in out.stdout.splitlines()
                   if ln.startswith("key: ")]
    assert plaintext.startswith("tm_") and len(plaintext) > 40
    with sqlite3.connect(ledger) as conn:
        [(stored, budget, rpm)] = conn.execute(
            "SELECT key_hash, budget_micro_usd, rpm FROM api_keys").fetchall()
    assert stored == hashlib.sha256(plaintext.encode()).hexdigest()
    assert (budget, rpm) == (2_500_000, 7)
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert plaintext.encode() not in raw  # not in the database file or its WAL
    listed = cli(ledger, "keys", "list").stdout + cli(ledger, "keys", "list", "--json").stdout
    assert plaintext not in listed and stored not in listed and "alice" in listed


def test_revoke_and_authenticate(tmp_path):
    ledger_path = str(tmp_path / "l.sqlite3")
    key = json.loads(cli(ledger_path, "keys", "create", "--user", "bob", "--json").stdout)
    ledger = open_ledger(ledger_path)
    assert authenticate(ledger, f"Bearer {key['key']}").user_id == "bob"
    cli(ledger_path, "keys", "revoke", key["id"])
    with pytest.raises(AuthError) as e:
        authenticate(ledger, f"Bearer {key['key']}")
    assert e.value.code == "revoked_api_key"
    again = cli(ledger_path, "keys", "revoke", key["id"], check=False)
    assert again.returncode == 2 and again.stderr.startswith("error: no active key")
    ledger.close()


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic abc", "token"])
def test_missing_or_malformed_authorization_is_missing_api_key(header):
    with pytest.raises(AuthError) as e:
        bearer_token(header)
    assert e.value.code == "missing_api_key"


def test_cli_errors_are_one_line(tmp_path):
    r = cli(str(tmp_path / "nodir" / "l.sqlite3"), "keys", "list", check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr
    r = cli(str(tmp_path / "l.sqlite3"), "report", "--start", "2026-13-01", check=False)
    assert r.returncode == 2 and r.stderr.startswith("error: --start/--end")
    r = cli(str(tmp_path / "l.sqlite3"), "serve", env={"TOKENMETER_EXECUTION": "fast"},
            check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert r.stderr.startswith("error: settings: TOKENMETER_EXECUTION")


@pytest.mark.parametrize("args", [["--budget-usd", "Infinity"], ["--budget-usd", "NaN"],
                                  ["--rpm", "-1"], ["--tpm", "-5"], ["--budget-tokens", "-1"],
                                  ["--rpm", "ten"]])
def test_impossible_limits_and_budgets_are_one_line_errors_and_create_nothing(tmp_path, args):
    ledger = str(tmp_path / "l.sqlite3")
    r = cli(ledger, "keys", "create", "--user", "u", *args, check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].count("error") == 1 and "Traceback" not in r.stderr
    assert json.loads(cli(ledger, "keys", "list", "--json").stdout) == []


def test_users_budget_changes_only_what_is_given_and_clear_removes_it(tmp_path):
    ledger_path = str(tmp_path / "l.sqlite3")
    cli(ledger_path, "users", "budget", "--user", "ann", "--budget-usd", "20")
    cli(ledger_path, "users", "budget", "--user", "ann", "--budget-tokens", "5000")
    ledger = open_ledger(ledger_path)
    assert ledger.user_budget("ann") == (20_000_000, 5000)  # the USD budget stayed
    cli(ledger_path, "users", "budget", "--user", "ann", "--budget-usd", "3.5")
    assert ledger.user_budget("ann") == (3_500_000, 5000)
    neither = cli(ledger_path, "users", "budget", "--user", "ann", check=False)
    assert neither.returncode == 2 and neither.stderr.startswith("error: give --budget-usd")
    assert ledger.user_budget("ann") == (3_500_000, 5000)
    cli(ledger_path, "users", "budget", "--user", "ann", "--clear")
    assert ledger.user_budget("ann") == (None, None)
    ledger.close()
