"""The admin reports API (GET /v1/reports/usage and /v1/reports/top-users) on a real server over
a generated month of traffic (tests/serving/test_invoices.py's): each grouping's sums equal those
of the generated events, CSV says the same as JSON, the top users are ranked by billed cost, and
a non-admin key or a bad parameter gets its 4xx."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from decimal import Decimal
from typing import Dict, Iterator, List, Tuple

import httpx
import pytest

from serving.keys import create_key
from serving.ledger import BillingEvent, open_ledger
from tests.serving.conftest import Server
from tests.serving.test_invoices import PERIOD, USERS, usd, write_month

pytestmark = pytest.mark.slow

RANGE = {"start": f"{PERIOD}-01", "end": f"{PERIOD}-31"}


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory) -> Iterator[Tuple[str, Dict[str, str],
                                                         List[BillingEvent]]]:
    d = tmp_path_factory.mktemp("reports")
    ledger = str(d / "ledger.sqlite3")
    led = open_ledger(ledger)
    led.start()
    events = write_month(led)
    admin = create_key(led, "ops", is_admin=True)[1]
    user = create_key(led, "acme")[1]
    led.stop()
    led.close()
    server = Server(model_dir, ledger, d / "server.log").start()
    yield server.url, {"admin": admin, "user": user}, events
    server.stop()


def get(url: str, key: str, path: str, **params) -> httpx.Response:
    return httpx.get(url + path, params=params, timeout=30,
                     headers={"Authorization": f"Bearer {key}"})


def sums(events: List[BillingEvent], by) -> Dict[str, Tuple[int, int, int, str]]:
    acc: Dict[str, List[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for e in events:
        a = acc[by(e)]
        a[0] += 1
        a[1] += e.input_tokens
        a[2] += e.output_tokens
        a[3] += e.cost_micro
    return {k: (a[0], a[1], a[2], usd(a[3])) for k, a in acc.items()}


def figures(row) -> Tuple[int, int, int, str]:
    return (int(row["requests"]), int(row["input_tokens"]), int(row["output_tokens"]),
            row["cost"])


def test_each_grouping_sums_to_the_billed_events(served):
    url, keys, events = served
    for group_by, by in (("user", lambda e: e.user_id), ("model", lambda e: e.model),
                         ("key", lambda e: e.key_id)):
        r = get(url, keys["admin"], "/v1/reports/usage", group_by=group_by,
                granularity="month", **RANGE)
        assert r.status_code == 200, r.text
        rows = r.json()["data"]
        assert {row["period"] for row in rows} == {PERIOD}
        name = "key_id" if group_by == "key" else group_by
        assert {row[name]: figures(row) for row in rows} == sums(events, by)
    # Per day, summed back over the month, the same figures per user.
    daily = get(url, keys["admin"], "/v1/reports/usage", group_by="user", granularity="day",
                **RANGE).json()["data"]
    assert len({row["period"] for row in daily}) > 20
    per_user = sums(events, lambda e: e.user_id)
    for user in USERS:
        rows = [row for row in daily if row["user"] == user]
        assert sum(int(row["requests"]) for row in rows) == per_user[user][0]


def test_csv_says_what_json_says(served):
    url, keys, _ = served
    as_json = get(url, keys["admin"], "/v1/reports/usage", group_by="model",
                  granularity="day", **RANGE).json()["data"]
    r = get(url, keys["admin"], "/v1/reports/usage", group_by="model", granularity="day",
            format="csv", **RANGE)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    as_csv = list(csv.DictReader(io.StringIO(r.text)))
    assert [(row["period"], row["model"], figures(row)) for row in as_csv] == \
        [(row["period"], row["model"], figures(row)) for row in as_json]


def test_top_users_are_ranked_by_billed_cost(served):
    url, keys, events = served
    r = get(url, keys["admin"], "/v1/reports/top-users", period=PERIOD, n=2)
    assert r.status_code == 200, r.text
    rows = r.json()["data"]
    per_user = sums(events, lambda e: e.user_id)
    ranked = sorted(per_user, key=lambda u: -Decimal(per_user[u][3]))[:2]
    assert [(row["rank"], row["user"]) for row in rows] == list(enumerate(ranked, 1))
    assert [figures(row) for row in rows] == [per_user[u] for u in ranked]


def test_reports_need_an_admin_key_and_valid_parameters(served):
    url, keys, _ = served
    for path in ("/v1/reports/usage", "/v1/reports/top-users"):
        r = get(url, keys["user"], path)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    for path, params, code in (
            ("/v1/reports/usage", {"group_by": "team"}, "invalid_group_by"),
            ("/v1/reports/usage", {"granularity": "week"}, "invalid_granularity"),
            ("/v1/reports/usage", {"start": "2026-10-31", "end": "2026-10-01"}, "invalid_date"),
            ("/v1/reports/top-users", {"period": "2026-13"}, "invalid_period"),
            ("/v1/reports/usage", {"format": "xml"}, "invalid_format")):
        r = get(url, keys["admin"], path, **params)
        assert r.status_code == 400 and r.json()["error"]["code"] == code, (params, r.text)
