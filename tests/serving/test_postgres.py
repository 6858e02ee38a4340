"""Two endpoint processes sharing one PostgreSQL ledger: a budget lives in the database, so 50
concurrent requests spread over both never overspend it; each process's /metrics matches its
own rows (`verify`). Marked `postgres`: skipped, saying so, where TOKENMETER_TEST_PG_DSN is
empty."""

from __future__ import annotations

import json
from decimal import Decimal

import httpx
import psycopg
import pytest

from tests.serving.conftest import Server, cli, make_key, post_all, priciest_text

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


def test_two_processes_share_one_budget_and_never_overspend(model_dir, facts, pg_dsn,
                                                             tmp_path):
    servers = [Server(model_dir, pg_dsn, tmp_path / f"s{i}.log").launch() for i in range(2)]
    try:
        for s in servers:
            s.wait_ready()
        # A text whose answer costs what admission reserves (labels asked of the server on
        # another user's key; counts and prices from the model's own files): room for 10.
        text, per = priciest_text(servers[0].url, make_key(pg_dsn, "u-probe"), facts)
        budget = Decimal(10 * per) / 10 ** 6
        key = make_key(pg_dsn, "u-pg", "--budget-usd", f"{budget:.6f}")
        responses = post_all([s.url for s in servers], [key], 50, {"text": text})
        codes = [r.status_code for r in responses]
        assert codes.count(200) == 10, codes
        assert codes.count(429) == 40
        assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == \
            {"insufficient_quota"}
        with psycopg.connect(pg_dsn) as conn:
            n, spent = conn.execute(
                "SELECT COUNT(*), SUM(cost_micro) "
                "FROM billing_events WHERE user_id = 'u-pg'").fetchone()
            [(spend_row,)] = conn.execute(
                "SELECT s.micro_usd FROM spend s JOIN api_keys k ON k.id = s.key_id "
                "WHERE k.user_id = 'u-pg'").fetchall()
        assert n == 10 and spent == 10 * per
        assert spend_row == spent
        for s in servers:
            report = json.loads(cli(pg_dsn, "verify", "--url", s.url).stdout)
            assert report["ok"] is True
        u = httpx.get(servers[0].url + "/v1/usage",
                      headers={"Authorization": f"Bearer {key}"}).json()
        assert u["total"]["requests"] == 10
    finally:
        for s in servers:
            s.stop()
