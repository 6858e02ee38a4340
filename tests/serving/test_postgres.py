"""Two endpoint processes sharing one PostgreSQL ledger: a budget lives in the database, so 50
concurrent requests spread over both never overspend it; each process's /metrics matches its
own rows (`verify`). Skips, saying why, when no PostgreSQL server is available."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import List

import httpx
import psycopg
import pytest

from tests.serving.conftest import Server, cli, make_key

pytestmark = pytest.mark.slow


async def _spread(urls: List[str], key: str, n: int) -> List[httpx.Response]:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=n), timeout=120) as c:
        return await asyncio.gather(*[
            c.post(urls[i % len(urls)] + "/v1/analyze", json={"text": "好"},
                   headers={"Authorization": f"Bearer {key}"}) for i in range(n)])


def test_two_processes_share_one_budget_and_never_overspend(model_dir, pg_dsn, tmp_path):
    per_request = Decimal("0.000022")  # "好": 3 input + 8 output tokens at $0.002/1K
    key = make_key(pg_dsn, "u-pg", "--budget-usd", str(per_request * 10))
    servers = [Server(model_dir, pg_dsn, tmp_path / f"s{i}.log").launch() for i in range(2)]
    try:
        for s in servers:
            s.wait_ready()
        responses = asyncio.run(_spread([s.url for s in servers], key, 50))
        codes = [r.status_code for r in responses]
        assert codes.count(200) == 10, codes
        assert codes.count(429) == 40
        assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == \
            {"insufficient_quota"}
        with psycopg.connect(pg_dsn) as conn:
            n, spent = conn.execute(
                "SELECT COUNT(*), SUM(cost_micro) "
                "FROM billing_events WHERE user_id = 'u-pg'").fetchone()
            [(spend_row,)] = conn.execute("SELECT micro_usd FROM spend").fetchall()
        assert n == 10 and Decimal(spent) / 10 ** 6 == per_request * 10
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
