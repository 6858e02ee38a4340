"""Three replicas behind HAProxy, as deploy/haproxy/haproxy.cfg runs them (that file, its ports
rewritten): one PostgreSQL ledger, one Redis for the rate limits. A key's RPM and TPM hold
across the replicas exactly; a budget is never overspent; every 200 is billed once; a replica
killed under load loses no billed answer (the clients retry with their Idempotency-Keys) and
the balancer routes around it. Marked postgres, redis and haproxy: skipped at collection,
naming what is missing."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Dict, List

import httpx
import psycopg
import pytest

from pipeline.benchmark.cluster import Cluster
from pipeline.benchmark.process import ProcessError
from pipeline.benchmark.scratch_db import scratch_database
from tests.serving.conftest import PG_ENV, Server, make_key, post_all, priciest_text
from tests.serving.redis_server import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis, pytest.mark.haproxy]

REPLICAS = 3


@pytest.fixture(scope="module")
def cluster(model_dir, facts, tmp_path_factory):
    # One scratch database for the module's three tests (pg_dsn is per test).
    with scratch_database(os.environ[PG_ENV], "tm_") as dsn:
        yield from _cluster(model_dir, facts, dsn, tmp_path_factory.mktemp("replicas"))


def _cluster(model_dir, facts, pg_dsn: str, d: Path):
    redis = RedisServer(d).start()
    env = {"TOKENMETER_REDIS_URL": redis.url, "TOKENMETER_LIMIT_REPLICAS": str(REPLICAS)}
    servers = [Server(model_dir, pg_dsn, d / f"r{i}.log", env=env) for i in range(REPLICAS)]
    # deploy/haproxy/haproxy.cfg with this run's ports (pipeline.benchmark.cluster).
    balanced = Cluster(servers, d)
    try:
        try:
            balanced.start()
        except ProcessError as exc:
            raise AssertionError(f"{exc}: {exc.tail()}") from None
        url = balanced.url
        text, per = priciest_text(url, make_key(pg_dsn, "u-probe"), facts)
        yield {"url": url, "servers": servers, "dsn": pg_dsn, "text": text, "per": per}
    finally:
        balanced.stop()
        redis.stop()


def rows(dsn: str, user: str) -> List[tuple]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT instance_id, idempotency_key FROM billing_events"
                            " WHERE user_id = %s", (user,)).fetchall()


def test_a_key_s_rpm_holds_across_the_replicas(cluster):
    key = make_key(cluster["dsn"], "u-rpm", "--rpm", "10")
    out = post_all([cluster["url"]], [key], 25, {"text": cluster["text"]})
    codes = Counter(r.status_code for r in out)
    assert codes == {200: 10, 429: 15}, codes
    assert {r.json()["error"]["code"] for r in out if r.status_code == 429} == \
        {"rate_limit_exceeded"}
    billed = rows(cluster["dsn"], "u-rpm")
    assert len(billed) == 10
    assert len({instance for instance, _ in billed}) >= 2  # the balancer spread them


def test_a_key_s_tpm_holds_across_the_replicas(cluster, facts):
    # Admission reserves input + the longest label: for the priciest text that is exactly
    # what a request uses, so a TPM of four requests' tokens admits four.
    tokens = facts.input_tokens([cluster["text"]]) + facts.max_output_tokens
    key = make_key(cluster["dsn"], "u-tpm", "--tpm", str(4 * tokens))
    out = post_all([cluster["url"]], [key], 12, {"text": cluster["text"]})
    codes = Counter(r.status_code for r in out)
    assert codes == {200: 4, 429: 8}, codes
    assert len(rows(cluster["dsn"], "u-tpm")) == 4


def test_a_budget_never_overspends_across_the_replicas(cluster):
    # A budget of exactly 7 requests' cost: 30 at once through the balancer, landing on all
    # three replicas, whose key and spend caches each see only their own share.
    budget = Decimal(7 * cluster["per"]) / 10 ** 6
    key = make_key(cluster["dsn"], "u-budget", "--budget-usd", f"{budget:.6f}")
    out = post_all([cluster["url"]], [key], 30, {"text": cluster["text"]})
    codes = Counter(r.status_code for r in out)
    assert codes == {200: 7, 429: 23}, codes
    assert {r.json()["error"]["code"] for r in out if r.status_code == 429} == \
        {"insufficient_quota"}
    with psycopg.connect(cluster["dsn"]) as conn:
        (n, spent), = conn.execute("SELECT COUNT(*), SUM(cost_micro) FROM billing_events"
                                   " WHERE user_id = 'u-budget'").fetchall()
    assert (n, spent) == (7, 7 * cluster["per"])


async def _until_answered(c: httpx.AsyncClient, url: str, key: str, text: str, idem: str,
                          attempts: Dict[str, int]) -> httpx.Response:
    """What a careful client does: on a 5xx or a broken connection, the same request again
    with the same Idempotency-Key."""
    for _ in range(20):
        attempts[idem] = attempts.get(idem, 0) + 1
        try:
            r = await c.post(url + "/v1/analyze", json={"text": text},
                             headers={"Authorization": f"Bearer {key}",
                                      "Idempotency-Key": idem})
        except httpx.TransportError:
            await asyncio.sleep(0.2)
            continue
        if r.status_code < 500:
            return r
        await asyncio.sleep(0.2)
    raise AssertionError(f"{idem}: no answer after 20 tries")


def test_a_replica_killed_under_load_loses_no_billed_answer(cluster):
    key = make_key(cluster["dsn"], "u-kill")
    victim = cluster["servers"][1]
    attempts: Dict[str, int] = {}

    async def scenario() -> List[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as c:
            done = 0
            sem = asyncio.Semaphore(6)

            async def one(i: int) -> httpx.Response:
                nonlocal done
                async with sem:
                    r = await _until_answered(c, cluster["url"], key, cluster["text"],
                                              f"kill-{i}", attempts)
                done += 1
                if done == 20:
                    victim.kill()  # SIGKILL to its process group, mid-load
                return r

            return await asyncio.gather(*[one(i) for i in range(80)])

    out = asyncio.run(scenario())
    assert [r.status_code for r in out] == [200] * 80
    assert victim.proc is not None and victim.proc.poll() is not None
    billed = rows(cluster["dsn"], "u-kill")
    # Every request billed exactly once, whatever the retries (answers replayed, not re-run).
    assert sorted(idem for _, idem in billed) == sorted(f"kill-{i}" for i in range(80))
    ids = [r.json()["id"] for r in out]
    assert len(set(ids)) == 80
    # After the kill the balancer answers from the two replicas left, each in turn.
    from serving.metrics import parse_billing_totals

    survivors = {parse_billing_totals(httpx.get(s.url + "/metrics", timeout=30).text)
                 ["instance_id"] for s in cluster["servers"] if s is not victim}
    key = make_key(cluster["dsn"], "u-after")
    after = post_all([cluster["url"]], [key], 12, {"text": cluster["text"]})
    assert [r.status_code for r in after] == [200] * 12
    assert {instance for instance, _ in rows(cluster["dsn"], "u-after")} == survivors
