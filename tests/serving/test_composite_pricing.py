"""Composite prices for real: `python -m serving serve` reading a price file with a volume tier
over the user's month, a priority surcharge chosen by the `Tokenmeter-Priority` header and a
monthly minimum; concurrent requests; then the month's invoice.

Expected amounts come from the price file's rates through the test's own half-up rounding
(ModelFacts.side_micro) and the tier edges worked out here, never from serving.pricing. The
PostgreSQL case runs two server processes on one ledger: they price one user's requests one
after another, from the month as the database holds it (a row lock), never both from the
same figure."""

from __future__ import annotations

import math
import sqlite3
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Dict, List, Tuple

import httpx
import pytest
import yaml

from tests.serving.conftest import ModelFacts, Server, cli, make_key, post_all, priciest_text

pytestmark = pytest.mark.slow

EDGE = 60  # volume_1 applies once the user was billed this many tokens in the month
RATES = {  # (input, output) USD per 1K tokens
    "standard": (Decimal("0.002"), Decimal("0.002")),
    "volume_1": (Decimal("0.0012"), Decimal("0.0008")),
}
SURCHARGE = (Decimal("0.0030"), Decimal("0.0010"))
MINIMUM_USD = "1.00"


def write_prices(path: Path, model: str) -> Path:
    std, vol = RATES["standard"], RATES["volume_1"]
    path.write_text(yaml.safe_dump({
        "currency": "USD",
        "models": {model: {
            "input_per_1k": str(std[0]), "output_per_1k": str(std[1]),
            "volume_tiers": [{"from_tokens": EDGE, "input_per_1k": str(vol[0]),
                              "output_per_1k": str(vol[1])}],
            "priority_surcharge": {"input_per_1k": str(SURCHARGE[0]),
                                   "output_per_1k": str(SURCHARGE[1])}}},
        "monthly_minimum_usd": MINIMUM_USD}), encoding="utf-8")
    return path


def rates(tier: str) -> Tuple[Decimal, Decimal]:
    base, _, priority = tier.partition("+")
    r_in, r_out = RATES[base]
    return (r_in + SURCHARGE[0], r_out + SURCHARGE[1]) if priority else (r_in, r_out)


def micro(n_in: int, n_out: int, tier: str) -> int:
    r_in, r_out = rates(tier)
    return ModelFacts.side_micro(n_in, r_in) + ModelFacts.side_micro(n_out, r_out)


def headers(key: str, **extra: str) -> Dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


def standard_requests(tokens_each: int) -> int:
    """How many requests of `tokens_each` tokens a user sends before the month reaches EDGE:
    the ones that find the month at 0, t, 2t, ... below EDGE."""
    return math.ceil(EDGE / tokens_each)


def check_volume_run(responses: List[httpx.Response], rows: List[tuple], text: str,
                     per_text_out: int, facts: ModelFacts) -> None:
    """Every answer is billed as its ledger row says, at the tier its place in the month
    gives: exactly the first standard_requests() rows standard, the rest volume_1."""
    assert [r.status_code for r in responses] == [200] * len(responses), \
        [r.text for r in responses if r.status_code != 200][:3]
    n_in = facts.input_tokens([text])
    by_id = {row[0]: row for row in rows}
    tiers = []
    for r in responses:
        out = r.json()
        event_id, tier, p_in, p_out, cost = by_id[out["id"]]
        assert out["cost"]["tier"] == tier
        assert Decimal(out["cost"]["total"]) * 10 ** 6 == cost == micro(n_in, per_text_out, tier)
        assert (Decimal(p_in), Decimal(p_out)) == rates(tier)
        tiers.append(tier)
    k = standard_requests(n_in + per_text_out)
    assert len(responses) > k
    assert sorted(tiers) == ["standard"] * k + ["volume_1"] * (len(responses) - k)


@pytest.fixture(scope="module")
def served(model_dir, facts, tmp_path_factory):
    d = tmp_path_factory.mktemp("composite")
    ledger = str(d / "ledger.sqlite3")
    cli(ledger, "keys", "list")
    prices = write_prices(d / "prices.yaml", facts.name)
    server = Server(model_dir, ledger, d / "server.log",
                    env={"TOKENMETER_PRICING_FILE": str(prices)}).start()
    text, _ = priciest_text(server.url, make_key(ledger, "u-probe"), facts)
    yield server, prices, text
    server.stop()


def ledger_rows(path: str, user: str) -> List[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT id, price_tier, input_price_per_1k, output_price_per_1k,"
                            " cost_micro FROM billing_events WHERE user_id = ?",
                            (user,)).fetchall()


def test_concurrent_requests_cross_the_volume_edge_exactly_and_invoice_by_tier(served, facts):
    server, prices, text = served
    keys = [make_key(server.ledger, "u-volume") for _ in range(2)]  # one user, two keys
    n = standard_requests(facts.input_tokens([text]) + facts.max_output_tokens) + 8
    responses = post_all([server.url], keys, n, {"text": text})
    rows = ledger_rows(server.ledger, "u-volume")
    assert len(rows) == n
    check_volume_run(responses, rows, text, facts.max_output_tokens, facts)
    with sqlite3.connect(server.ledger) as conn:
        [(spend_micro, spend_tokens)] = conn.execute(
            "SELECT micro_usd, tokens FROM user_spend WHERE user_id = 'u-volume'").fetchall()
    assert spend_micro == sum(r[4] for r in rows)
    assert spend_tokens == n * (facts.input_tokens([text]) + facts.max_output_tokens)

    # The month's invoice, issued as if the month had closed: a line per tier, totals equal
    # to the ledger, and the minimum trued up.
    from serving.invoices import closes_at, issue, to_html
    from serving.ledger import now_iso, open_ledger

    period = now_iso()[:7]
    led = open_ledger(server.ledger)
    try:
        doc = issue(led, "u-volume", period, "USD", int(Decimal(MINIMUM_USD) * 10 ** 6),
                    now=closes_at(period) + timedelta(seconds=1)).document
    finally:
        led.close()
    by_tier = {line["tier"]: line for line in doc["lines"]}
    assert sorted(by_tier) == doc["tiers_applied"] == ["standard", "volume_1"]
    for tier, line in by_tier.items():
        tier_rows = [r for r in rows if r[1] == tier]
        assert line["requests"] == len(tier_rows)
        assert Decimal(line["amount"]) * 10 ** 6 == sum(r[4] for r in tier_rows)
        assert Decimal(line["input_price_per_1k"]) == rates(tier)[0]
    subtotal = sum(r[4] for r in rows)
    assert Decimal(doc["subtotal"]) * 10 ** 6 == subtotal
    assert Decimal(doc["total"]) == max(Decimal(MINIMUM_USD), Decimal(subtotal) / 10 ** 6)
    assert "(volume 1)" in to_html(doc)


def test_priority_is_priced_with_its_surcharge_budgeted_and_part_of_the_request(served,
                                                                                 facts):
    server, _, text = served
    key = make_key(server.ledger, "u-priority")
    r = httpx.post(server.url + "/v1/analyze", json={"text": text}, timeout=60,
                   headers=headers(key, **{"Tokenmeter-Priority": "high"}))
    assert r.status_code == 200, r.text
    out = r.json()
    n_in, n_out = out["usage"]["input_tokens"], out["usage"]["output_tokens"]
    assert out["cost"]["tier"] == "standard+priority"
    assert Decimal(out["cost"]["total"]) * 10 ** 6 == micro(n_in, n_out, "standard+priority")
    [(_, tier, p_in, p_out, cost)] = ledger_rows(server.ledger, "u-priority")
    assert (tier, Decimal(p_in), Decimal(p_out)) == ("standard+priority",
                                                      *rates("standard+priority"))

    # Priority changes the price, so an Idempotency-Key cannot be reused across it.
    first = httpx.post(server.url + "/v1/analyze", json={"text": text}, timeout=60,
                       headers=headers(key, **{"Idempotency-Key": "p-1"}))
    again = httpx.post(server.url + "/v1/analyze", json={"text": text}, timeout=60,
                       headers=headers(key, **{"Idempotency-Key": "p-1",
                                               "Tokenmeter-Priority": "high"}))
    assert (first.status_code, again.status_code) == (200, 409)
    assert again.json()["error"]["code"] == "idempotency_key_reused"

    bad = httpx.post(server.url + "/v1/analyze", json={"text": text}, timeout=60,
                     headers=headers(key, **{"Tokenmeter-Priority": "urgent"}))
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_priority"
    assert len(ledger_rows(server.ledger, "u-priority")) == 2  # neither refusal billed

    # A budget that fits the standard worst case but not the priority one: the priority
    # request is refused before the model runs, the standard one is served.
    worst = micro(n_in, facts.max_output_tokens, "standard")
    tight = make_key(server.ledger, "u-tight", "--budget-usd", f"{Decimal(worst) / 10**6:.6f}")
    refused = httpx.post(server.url + "/v1/analyze", json={"text": text}, timeout=60,
                         headers=headers(tight, **{"Tokenmeter-Priority": "high"}))
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "insufficient_quota"
    ok = httpx.post(server.url + "/v1/analyze", json={"text": text}, timeout=60,
                    headers=headers(tight))
    assert ok.status_code == 200 and ok.json()["cost"]["tier"] == "standard"


def test_the_documented_header_matches_the_price_file(served):
    server, _, _ = served
    spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
    params = spec["paths"]["/v1/analyze"]["post"]["parameters"]
    [priority] = [p for p in params if p["name"] == "Tokenmeter-Priority"]
    assert priority["schema"]["enum"] == ["standard", "high"]


@pytest.mark.postgres
def test_two_processes_price_one_user_s_month_one_request_after_another(model_dir, facts,
                                                                        pg_dsn, tmp_path):
    prices = write_prices(tmp_path / "prices.yaml", facts.name)
    env = {"TOKENMETER_PRICING_FILE": str(prices)}
    servers = [Server(model_dir, pg_dsn, tmp_path / f"s{i}.log", env=env).launch()
               for i in range(2)]
    try:
        for s in servers:
            s.wait_ready()
        text, _ = priciest_text(servers[0].url, make_key(pg_dsn, "u-probe"), facts)
        keys = [make_key(pg_dsn, "u-pg-volume") for _ in range(2)]
        n = standard_requests(facts.input_tokens([text]) + facts.max_output_tokens) + 16
        responses = post_all([s.url for s in servers], keys, n, {"text": text})
        import psycopg

        with psycopg.connect(pg_dsn) as conn:
            rows = conn.execute(
                "SELECT id, price_tier, input_price_per_1k, output_price_per_1k, cost_micro"
                " FROM billing_events WHERE user_id = 'u-pg-volume'").fetchall()
            instances = conn.execute(
                "SELECT COUNT(DISTINCT instance_id) FROM billing_events"
                " WHERE user_id = 'u-pg-volume'").fetchone()
        assert len(rows) == n and instances == (2,)  # both processes billed some
        check_volume_run(responses, [tuple(r) for r in rows], text, facts.max_output_tokens,
                         facts)
    finally:
        for s in servers:
            s.stop()


def test_a_price_file_without_priority_refuses_the_header(model_dir, tmp_path):
    """The default price file has no priority tier: asking for one is a 400 that says so,
    and the document offers only `standard`."""
    ledger = str(tmp_path / "ledger.sqlite3")
    cli(ledger, "keys", "list")
    server = Server(model_dir, ledger, tmp_path / "server.log").start()
    try:
        key = make_key(ledger, "u-none")
        r = httpx.post(server.url + "/v1/analyze", json={"text": "好"}, timeout=60,
                       headers=headers(key, **{"Tokenmeter-Priority": "high"}))
        assert r.status_code == 400 and r.json()["error"]["code"] == "priority_unavailable"
        assert "priority" in r.json()["error"]["message"]
        spec = httpx.get(server.url + "/openapi.json", timeout=30).json()
        [p] = [p for p in spec["paths"]["/v1/analyze"]["post"]["parameters"]
               if p["name"] == "Tokenmeter-Priority"]
        assert p["schema"]["enum"] == ["standard"]
        with sqlite3.connect(ledger) as conn:
            assert conn.execute("SELECT COUNT(*) FROM billing_events").fetchone() == (0,)
    finally:
        server.stop()


@pytest.mark.postgres
def test_two_writers_read_one_user_s_month_one_after_the_other(pg_dsn):
    """The ledger's side of the contract, with the race window held open: two writers (as two
    processes have) price rows of one user with a `reprice` that takes 50 ms. Each must see
    the month as the other left it, so the figures seen are 0, t, 2t, ... with none twice
    (a plain read, without the row lock, sees the same figure in both)."""
    import threading
    import time
    from dataclasses import replace

    from serving.keys import create_key
    from serving.ledger import now_iso, open_ledger
    from tests.serving.conftest import priced_event

    writers = [open_ledger(pg_dsn) for _ in range(2)]
    for w in writers:
        w.start()
    try:
        key, _ = create_key(writers[0], "u-race")
        seen: List[int] = []
        lock = threading.Lock()

        def reprice(event):
            def at(month_tokens: int):
                time.sleep(0.05)  # holds the transaction open between the read and the write
                with lock:
                    seen.append(month_tokens)
                return replace(event, request_id=f"month:{month_tokens}")
            return at

        per, n = 7, 6  # tokens per row (5 in, 2 out), rows per writer
        futures = []
        for _ in range(n):
            for w in writers:
                e = priced_event(key, now_iso(), "m", 5, 2, "0.002", "0.002")
                futures.append(w.commit_event(e, reprice(e)))
        results = [f.result(timeout=60) for f in futures]
        assert [r.status for r in results] == ["billed"] * 2 * n
        assert sorted(seen) == [per * i for i in range(2 * n)]
        # The rows written are the repriced ones.
        assert sorted(int(r.event.request_id.split(":")[1]) for r in results) == sorted(seen)
    finally:
        for w in writers:
            w.stop()
            w.close()
