"""Two endpoint processes sharing one PostgreSQL ledger: a budget lives in the database, so 50
concurrent requests spread over both never overspend it; each process's /metrics matches its
own rows (`verify`). Marked `postgres`: skipped, saying so, where TOKENMETER_TEST_PG_DSN is
empty."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import List

import httpx
import psycopg
import pytest

from tests.serving.conftest import Server, cli, make_key, priciest_text

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


async def _spread(urls: List[str], key: str, text: str, n: int) -> List[httpx.Response]:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=n), timeout=120) as c:
        return await asyncio.gather(*[
            c.post(urls[i % len(urls)] + "/v1/analyze", json={"text": text},
                   headers={"Authorization": f"Bearer {key}"}) for i in range(n)])


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
        responses = asyncio.run(_spread([s.url for s in servers], key, text, 50))
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
