"""The metered endpoint for real: `python -m serving serve` under uvicorn on a loopback port,
the smoke model (or TOKENMETER_TEST_MODEL_DIR), a SQLite ledger file, keys made with the CLI.
Every 2xx must be billed exactly as answered; every error must have its status and code and
write nothing. Token counts, prices and limits come from the model's own files (`facts`)."""

from __future__ import annotations

import json
import sqlite3
import time
from decimal import Decimal
from typing import Dict, List

import httpx
import pytest

from tests.serving.conftest import ModelFacts, Server, cli, make_key, post_all, priciest_text

pytestmark = pytest.mark.slow

MAX_TEXTS = 4
MAX_BODY = 4096
KEY_CACHE_S = 1.0  # a revoked key is refused at most this late (serving.cache)


@pytest.fixture(scope="module")
def env(model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("app")
    ledger = str(d / "ledger.sqlite3")
    cli(ledger, "keys", "list")  # creates and migrates the ledger before the server starts
    server = Server(model_dir, ledger, d / "server.log",
                    env={"TOKENMETER_MAX_TEXTS": str(MAX_TEXTS),
                         "TOKENMETER_MAX_BODY_BYTES": str(MAX_BODY),
                         "TOKENMETER_KEY_CACHE_S": str(KEY_CACHE_S)}).start()
    yield server
    server.stop()


def rows(ledger: str, sql: str, params=()) -> List[tuple]:
    with sqlite3.connect(ledger) as conn:
        return conn.execute(sql, params).fetchall()


def key_rows(server: Server, user: str) -> int:
    return rows(server.ledger, "SELECT COUNT(*) FROM billing_events WHERE user_id = ?",
                (user,))[0][0]


def post(server: Server, key: str, body, headers: Dict[str, str] = None) -> httpx.Response:
    h = {"Authorization": f"Bearer {key}", **(headers or {})}
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + "/v1/analyze", content=body, headers=h, timeout=60)
    return httpx.post(server.url + "/v1/analyze", json=body, headers=h, timeout=60)


def usd(micro: int) -> Decimal:
    return Decimal(micro) / 10 ** 6


def priciest(env: Server, facts: ModelFacts):
    """A text whose answer costs what admission reserves, and that cost in micro-USD (labels
    asked of the server on a throw-away key; counts and prices from the model's files)."""
    return priciest_text(env.url, make_key(env.ledger, "u-probe"), facts)


def test_answer_usage_ledger_and_usage_endpoint_agree(env, facts):
    key = make_key(env.ledger, "u-agree")
    texts = ["这个手机很好用，电池也耐用", "Terrible battery, never again", "好评 😀👍 great",
             "  质量一般  "]
    r = post(env, key, {"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == facts.name and body["model_version"] == facts.version
    assert [set(x) for x in body["results"]] == [{"label", "score"}] * 4
    labels = [x["label"] for x in body["results"]]
    assert set(labels) <= set(facts.labels)
    inp, out = facts.input_tokens(texts), facts.output_tokens(labels)
    assert body["usage"] == {"input_tokens": inp, "output_tokens": out,
                             "total_tokens": inp + out}
    cost = body["cost"]
    assert cost["currency"] == facts.currency
    in_micro = facts.side_micro(inp, facts.input_price)
    out_micro = facts.side_micro(out, facts.output_price)
    assert (cost["input"], cost["output"], cost["total"]) == \
        (f"{usd(in_micro):.6f}", f"{usd(out_micro):.6f}", f"{usd(in_micro + out_micro):.6f}")

    second = post(env, key, {"text": "一般般"})
    assert second.status_code == 200
    [(i_tok, o_tok, c, key_id, resp)] = rows(
        env.ledger, "SELECT input_tokens, output_tokens, cost_micro, key_id, response FROM "
        "billing_events WHERE id = ?", (body["id"],))
    assert (i_tok, o_tok) == (inp, out)
    assert Decimal(c) / 10 ** 6 == Decimal(cost["total"])
    assert json.loads(resp) == body
    assert key_rows(env, "u-agree") == 2

    u = httpx.get(env.url + "/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    b2 = second.json()
    assert u["user"] == "u-agree" and u["granularity"] == "day"
    assert u["total"]["requests"] == 2
    assert u["total"]["input_tokens"] == inp + b2["usage"]["input_tokens"]
    assert u["total"]["output_tokens"] == out + b2["usage"]["output_tokens"]
    assert Decimal(u["total"]["cost"]["total"]) == \
        Decimal(cost["total"]) + Decimal(b2["cost"]["total"])
    [day] = u["data"]
    assert day["model"] == facts.name and day["requests"] == 2

    billed = [e for e in env.billing_lines() if e["id"] in (body["id"], b2["id"])]
    assert len(billed) == 2 and billed[0]["input_tokens"] == inp
    log = env.log()
    assert key not in log and texts[0] not in log and "Terrible battery" not in log


BAD = [
    (b'{"text": ', 400, "invalid_json"),
    (b'\xff\xfe', 400, "invalid_json"),
    (b'["a list"]', 400, "invalid_body"),
    (b'{}', 400, "missing_text"),
    (b'{"text": ""}', 400, "empty_text"),
    (b'{"text": "  \\n\\t "}', 400, "empty_text"),
    (b'{"text": "\\u200b"}', 400, "empty_text"),  # nothing left after normalisation
    (b'{"text": 5}', 400, "invalid_text"),
    (b'{"texts": ["ok", null]}', 400, "invalid_text"),
    (b'{"texts": "not a list"}', 400, "invalid_texts"),
    (b'{"texts": []}', 400, "missing_text"),
    (json.dumps({"texts": ["ok"] * (MAX_TEXTS + 1)}).encode(), 400, "too_many_texts"),
    (json.dumps({"text": "a" * (MAX_BODY + 10)}).encode(), 400, "body_too_large"),
    (b'{"text": "ok", "texts": ["ok"]}', 400, "ambiguous_input"),
    (b'{"text": "ok", "user": "someone-else"}', 400, "unknown_field"),
    (b'{"text": "ok", "truncate": "yes"}', 400, "invalid_truncate"),
]


@pytest.mark.parametrize("body,status,code", BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_gets_its_error_and_is_not_billed(env, body, status, code):
    key = make_key(env.ledger, "u-bad")
    before = key_rows(env, "u-bad")
    r = post(env, key, body, {"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["type"] and err["message"]
    assert "Traceback" not in r.text
    assert key_rows(env, "u-bad") == before


def test_a_text_over_the_model_maximum_gets_413_and_is_not_billed(env, facts):
    key = make_key(env.ledger, "u-long")
    text = facts.too_long_text()
    body = json.dumps({"text": text}, ensure_ascii=False).encode()
    assert len(body) <= MAX_BODY  # refused for its tokens, not its size
    r = post(env, key, body, {"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "input_too_long" and str(facts.max_tokens) in err["message"]
    assert str(facts.input_tokens([text])) in err["message"]
    assert key_rows(env, "u-long") == 0


def test_keys_missing_unknown_revoked_get_401(env):
    assert httpx.post(env.url + "/v1/analyze", json={"text": "好"}).json()["error"]["code"] \
        == "missing_api_key"
    r = post(env, "tm_not-a-real-key", {"text": "好"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    key = make_key(env.ledger, "u-revoke")
    assert post(env, key, {"text": "好"}).status_code == 200
    key_id = [k["id"] for k in json.loads(cli(env.ledger, "keys", "list", "--json").stdout)
              if k["user"] == "u-revoke"][0]
    cli(env.ledger, "keys", "revoke", key_id)
    revoked_at, accepted = time.monotonic(), 1
    while True:  # the server may answer from its cached key record for up to KEY_CACHE_S
        r = post(env, key, {"text": "好"})
        if r.status_code != 200:
            break
        accepted += 1
        assert time.monotonic() - revoked_at < KEY_CACHE_S + 5, "revoked key still accepted"
        time.sleep(0.05)
    assert r.status_code == 401 and r.json()["error"]["code"] == "revoked_api_key"
    assert key_rows(env, "u-revoke") == accepted  # every 200, and only those, billed


def test_truncate_bills_the_truncated_count(env, facts):
    key = make_key(env.ledger, "u-trunc")
    body = json.dumps({"text": facts.too_long_text(), "truncate": True}, ensure_ascii=False)
    r = post(env, key, body.encode(), {"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["input_tokens"] == facts.max_tokens
    [(billed,)] = rows(env.ledger, "SELECT input_tokens FROM billing_events WHERE id = ?",
                       (r.json()["id"],))
    assert billed == facts.max_tokens


def test_idempotency_key_retry_returns_the_same_body_and_bills_once(env):
    key = make_key(env.ledger, "u-idem")
    first = post(env, key, {"text": "物流很快"}, {"Idempotency-Key": "order-42"})
    again = post(env, key, {"text": "物流很快"}, {"Idempotency-Key": "order-42"})
    assert first.status_code == again.status_code == 200
    assert again.content == first.content
    assert again.headers.get("idempotent-replayed") == "true"
    assert key_rows(env, "u-idem") == 1
    other = post(env, key, {"text": "物流很快"}, {"Idempotency-Key": "order-43"})
    assert other.json()["id"] != first.json()["id"] and key_rows(env, "u-idem") == 2
    bad = post(env, key, {"text": "x"}, {"Idempotency-Key": "has space"})
    assert bad.status_code == 400 and key_rows(env, "u-idem") == 2
    reused = post(env, key, {"text": "物流太慢"}, {"Idempotency-Key": "order-42"})
    assert reused.status_code == 409
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    assert key_rows(env, "u-idem") == 2


def test_50_concurrent_requests_at_a_budget_edge_never_overspend(env, facts):
    text, per = priciest(env, facts)
    key = make_key(env.ledger, "u-budget", "--budget-usd", f"{usd(10 * per):.6f}")
    responses = post_all([env.url], [key], 50, {"text": text})
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 10, codes
    assert codes.count(429) == 40
    assert all(r.json()["error"]["code"] == "insufficient_quota"
               for r in responses if r.status_code == 429)
    [(n, spent)] = rows(env.ledger, "SELECT COUNT(*), SUM(cost_micro) FROM billing_events "
                                    "WHERE user_id = 'u-budget'")
    assert n == 10 and spent == 10 * per
    ok_ids = {r.json()["id"] for r in responses if r.status_code == 200}
    assert ok_ids == {i for (i,) in rows(env.ledger, "SELECT id FROM billing_events "
                                                     "WHERE user_id = 'u-budget'")}


def test_a_user_budget_caps_all_of_the_users_keys(env, facts):
    text, per = priciest(env, facts)
    cli(env.ledger, "users", "budget", "--user", "u-ub", "--budget-usd", f"{usd(3 * per):.6f}")
    keys = [make_key(env.ledger, "u-ub"), make_key(env.ledger, "u-ub")]
    codes = [post(env, keys[i % 2], {"text": text}).status_code for i in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    assert key_rows(env, "u-ub") == 3


def test_rpm_and_tpm_limits_answer_429_with_retry_after(env, facts):
    key = make_key(env.ledger, "u-rpm", "--rpm", "2")
    codes = [post(env, key, {"text": "好"}).status_code for _ in range(2)]
    r = post(env, key, {"text": "好"})
    assert codes == [200, 200] and r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1
    assert key_rows(env, "u-rpm") == 2

    # A request reserves its input tokens and the longest label's tokens: room for two "好".
    reserve = facts.input_tokens(["好"]) + facts.max_output_tokens
    key = make_key(env.ledger, "u-tpm", "--tpm", str(2 * reserve + reserve // 2))
    codes = [post(env, key, {"text": "好"}).status_code for _ in range(2)]
    r = post(env, key, {"text": "好"})
    assert codes == [200, 200] and r.status_code == 429
    assert r.json()["error"]["code"] == "token_rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1
    assert key_rows(env, "u-tpm") == 2


def test_usage_of_another_user_needs_an_admin_key(env):
    key = make_key(env.ledger, "u-plain")
    admin = make_key(env.ledger, "ops", "--admin")
    r = httpx.get(env.url + "/v1/usage", params={"user": "u-agree"},
                  headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = httpx.get(env.url + "/v1/usage", params={"user": "u-agree"},
                  headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200 and r.json()["user"] == "u-agree"
    r = httpx.get(env.url + "/v1/usage", params={"granularity": "hour"},
                  headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_granularity"
    r = httpx.get(env.url + "/v1/usage", params={"start": "yesterday"},
                  headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_date"


def test_health_ready_openapi_and_unknown_routes(env):
    assert httpx.get(env.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(env.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["ledger_writable"] is True
    spec = httpx.get(env.url + "/openapi.json").json()
    op = spec["paths"]["/v1/analyze"]["post"]
    assert "requestBody" in op and {"200", "400", "401", "413", "429", "503"} <= set(
        op["responses"])
    r = httpx.get(env.url + "/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_metrics_match_the_ledger_and_verify_reports_zero_drift(env):
    key = make_key(env.ledger, "u-verify")
    assert post(env, key, {"texts": ["好", "差"]}).status_code == 200
    text = httpx.get(env.url + "/metrics").text
    assert "tokenmeter_billed_cost_micro_usd_total" in text
    assert "tokenmeter_batch_size_bucket" in text and "u-verify" not in text
    r = cli(env.ledger, "verify", "--url", env.url)
    report = json.loads(r.stdout)
    assert report["ok"] is True and set(report["drift"].values()) == {0}
    [(n,)] = rows(env.ledger, "SELECT COUNT(*) FROM billing_events")
    assert report["ledger"]["requests"] == n > 0


def test_report_cli_prints_per_user_totals(env):
    # Its own rows: three answers to two keys of one user, and what they said they cost.
    keys = [make_key(env.ledger, "u-report"), make_key(env.ledger, "u-report")]
    answers = [post(env, keys[0], {"texts": ["好", "差评"]}), post(env, keys[1], {"text": "一般"}),
               post(env, keys[0], {"text": "物流很快，质量不错"})]
    assert [a.status_code for a in answers] == [200] * 3
    usage = [a.json()["usage"] for a in answers]
    inp = sum(u["input_tokens"] for u in usage)
    out = sum(u["output_tokens"] for u in usage)
    cost = sum(Decimal(a.json()["cost"]["total"]) for a in answers)

    out_json = json.loads(cli(env.ledger, "report", "--format", "json").stdout)
    [mine] = [u for u in out_json["users"] if u["user"] == "u-report"]
    assert mine == {"user": "u-report", "requests": 3, "input_tokens": inp,
                    "output_tokens": out, "total_tokens": inp + out, "cost_usd": f"{cost:.6f}"}
    csv_out = cli(env.ledger, "report", "--format", "csv").stdout.splitlines()
    assert csv_out[0] == "user,requests,input_tokens,output_tokens,total_tokens,cost_usd"
    assert f"u-report,3,{inp},{out},{inp + out},{cost:.6f}" in csv_out
    text = cli(env.ledger, "report").stdout
    [line] = [ln for ln in text.splitlines() if "u-report" in ln]
    assert f"{cost:.6f}" in line and str(inp + out) in line
