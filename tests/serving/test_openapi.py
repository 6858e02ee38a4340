"""/openapi.json tells the truth: schemathesis 4 (`--checks all`; examples, coverage, fuzzing,
and stateful along the document's link: a replay under the same Idempotency-Key) runs
against a real `python -m serving serve` and finds nothing; none of the errors it provokes is
billed; and each finding it made against the old document (a `{}` body the schema allowed, a
free-text granularity, an undocumented 403, /metrics documented as JSON, 405 without `Allow`)
is pinned directly here.

`keep_case` is imported by the hooks file the schemathesis subprocess loads (see
`test_schemathesis_finds_nothing`); it is plain code so that ruff and mypy read it.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.metering import InputError, Meter
from serving.model_dir import TOKENIZER_FILE, read_card
from tests.serving.conftest import ROOT, Server, make_key

pytestmark = pytest.mark.slow

MAX_TEXTS = 3  # small, so that the document's maxItems is both reachable and checkable
# Per operation and phase. Deterministic generation: the same cases every run; no --max-time,
# which would make fuzzing repeat until the time is spent.
EXAMPLES = 300
SCHEMATHESIS_TIMEOUT_S = 420  # a hang guard: ~60-90 s on 2 idle cores


@dataclass
class Env:
    server: Server
    key: str  # a valid non-admin key of USER
    dir: Path
    model_dir: Path

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(self.server.url + path, headers=self.auth, timeout=60, **kw)

    def post(self, body: Any) -> httpx.Response:
        return httpx.post(self.server.url + "/v1/analyze", json=body, headers=self.auth,
                          timeout=60)

    @property
    def auth(self) -> Dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


USER = "u-openapi"


@pytest.fixture(scope="module")
def env(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("openapi")
    ledger = str(d / "ledger.sqlite3")
    key = make_key(ledger, USER)  # also creates and migrates the ledger
    server = Server(model_dir, ledger, d / "server.log",
                    env={"TOKENMETER_MAX_TEXTS": str(MAX_TEXTS)}).start()
    yield Env(server, key, d, model_dir)
    server.stop()


@pytest.fixture(scope="module")
def doc(env: Env) -> Dict[str, Any]:
    r = httpx.get(env.server.url + "/openapi.json", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


# --- what schemathesis may not count as a valid request ---------------------------------------
def usage_dates_in_order(query: Mapping[str, Any]) -> bool:
    """Whether /v1/usage's start and end, each valid by its own schema, also fit together as
    Billing.usage needs: end not before start (defaults: the 1st of this UTC month, today) and
    not the last day a date can have. One parameter's schema cannot say this; the server answers
    400 invalid_date (test_usage_dates_out_of_order_are_invalid_date)."""
    today = datetime.now(timezone.utc).date()

    def day(value: Any, default: date) -> Optional[date]:
        if not value:  # "" is the default, as absent
            return default
        try:
            return datetime.strptime(str(value), "%Y-%m-%d").date()
        except ValueError:
            return None  # not a date: its own schema already says so

    start, end = day(query.get("start"), today.replace(day=1)), day(query.get("end"), today)
    return start is None or end is None or start <= end < date.max


# The served model's folder, for the hooks in the schemathesis subprocess (over_the_limit).
SERVED_MODEL_VAR = "TOKENMETER_TEST_SERVED_MODEL"


@functools.lru_cache(maxsize=1)
def _meter(model_dir: str) -> Meter:
    card = read_card(Path(model_dir))
    return Meter(Path(model_dir) / TOKENIZER_FILE, int(card["max_input_tokens"]), {})


def over_the_limit(body: Any, model_dir: str) -> bool:
    """Whether a body asks, without `truncate`, for a text longer than the model takes: a 413
    input_too_long that no JSON Schema can foretell. The limit is in tokens, and characters
    do not bound tokens: the tokenizer's NFKC makes one character several ("…" is "...")."""
    if not isinstance(body, dict) or body.get("truncate") is True:
        return False
    texts = [body["text"]] if "text" in body else body.get("texts")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return False
    try:
        _meter(model_dir).meter(texts, truncate=False)
    except InputError as exc:
        return exc.code == "input_too_long"
    return False


def keep_case(case: Any) -> bool:
    """schemathesis `filter_case` hook: leaves out positive /v1/usage cases whose dates are out
    of order and positive /v1/analyze cases with a text over the model's limit in tokens
    (negative cases are refused either way)."""
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    if not positive:
        return True
    if case.operation.path == "/v1/analyze":
        return not over_the_limit(case.body, os.environ[SERVED_MODEL_VAR])
    if case.operation.path == "/v1/usage":
        return usage_dates_in_order(case.query or {})
    return True


HOOKS = """import schemathesis

from tests.serving.test_openapi import keep_case


@schemathesis.hook
def filter_case(ctx, case):
    return keep_case(case)
"""


# --- the run -----------------------------------------------------------------------------------
def metric_samples(env: Env) -> List[Any]:
    text = httpx.get(env.server.url + "/metrics", timeout=30).text
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def requests_by(samples: List[Any]) -> Dict[tuple, int]:
    return {(s.labels["route"], s.labels["status"]): int(s.value) for s in samples
            if s.name == "tokenmeter_requests_total"}


def test_schemathesis_finds_nothing_and_no_error_is_billed(env: Env) -> None:
    work = env.dir / "schemathesis"
    work.mkdir()
    (work / "openapi_hooks.py").write_text(HOOKS, encoding="utf-8")
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) \
        or shutil.which("schemathesis")
    assert exe, "the schemathesis CLI is not installed (dev extra)"
    cmd = [exe, "run", env.server.url + "/openapi.json", "--checks", "all",
           "-H", f"Authorization: Bearer {env.key}",
           "--phases", "examples,coverage,fuzzing,stateful",
           # Deterministic generation: the same cases every run. It ignores --seed, given so
           # that the run stays seeded should that flag be dropped.
           "--generation-deterministic", "--seed", "20240601", "-n", str(EXAMPLES),
           "--request-timeout", "60", "--report", "har", "--report-dir", str(work / "report"),
           "--no-color"]
    # cwd: any file it writes lands in tmp (and no schemathesis.toml of the checkout is read);
    # PYTHONPATH: the hooks file imports keep_case from this module.
    env_vars = {**os.environ, "SCHEMATHESIS_HOOKS": str(work / "openapi_hooks.py"),
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                            os.environ.get("PYTHONPATH")])),
                "HYPOTHESIS_STORAGE_DIRECTORY": str(work / ".hypothesis"), "NO_COLOR": "1",
                SERVED_MODEL_VAR: str(env.model_dir)}
    r = subprocess.run(cmd, cwd=work, env=env_vars, capture_output=True, text=True,
                       timeout=SCHEMATHESIS_TIMEOUT_S)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"schemathesis exit {r.returncode}:\n{out[-6000:]}"
    # The stateful phase ran and followed the document's one link (a replay under the same
    # Idempotency-Key), rather than being "not applicable".
    assert re.search(r"API Links:\s+1 covered", out), out[-3000:]

    # Every request it sent, with its answer (HAR). A 200 with `Idempotent-Replayed: true`
    # returns an earlier answer and writes no row (schemathesis reuses keys such as "0").
    [har] = (work / "report").glob("*.json")
    entries = json.loads(har.read_text(encoding="utf-8"))["log"]["entries"]
    analyzed = [e for e in entries if e["request"]["method"] == "POST"
                and e["request"]["url"].endswith("/v1/analyze") and e["response"]["status"] == 200]
    replayed = sum(1 for e in analyzed if any(h["name"].lower() == "idempotent-replayed"
                                              for h in e["response"]["headers"]))
    assert len(analyzed) > 50, "schemathesis got (almost) no billed answer: is the key valid?"

    by = requests_by(metric_samples(env))
    server_errors = {k: v for k, v in by.items() if k[1].startswith("5")}
    assert not server_errors, server_errors
    with sqlite3.connect(env.server.ledger) as conn:
        rows = conn.execute("SELECT COUNT(*) FROM billing_events").fetchone()[0]
    # Each row is a 200 that was not a replay; no 4xx wrote one. (The direct tests of this
    # module send no Idempotency-Key, so all replays are schemathesis's.)
    answered = by.get(("/v1/analyze", "200"), 0)
    assert rows == answered - replayed, (rows, answered, replayed)


# --- the old findings, one by one -------------------------------------------------------------
def body_schema(doc: Dict[str, Any]) -> Dict[str, Any]:
    op = doc["paths"]["/v1/analyze"]["post"]
    return op["requestBody"]["content"]["application/json"]["schema"]


def test_an_empty_body_object_is_invalid_by_the_schema_and_the_server(env: Env, doc) -> None:
    schema = body_schema(doc)
    assert schema["oneOf"] == [{"required": ["text"]}, {"required": ["texts"]}]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["text"]["type"] == "string"  # no null
    assert schema["properties"]["texts"]["maxItems"] == MAX_TEXTS  # from this server's settings
    r = env.post({})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_text"
    r = env.post({"text": None})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_text"
    r = env.post({"texts": ["好"] * (MAX_TEXTS + 1)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_texts"


def test_the_text_pattern_is_the_tokenizers_rule(env: Env, doc) -> None:
    """The pattern's class is what the server refuses as empty_text, both ways."""
    pattern = re.compile(body_schema(doc)["properties"]["text"]["pattern"])
    # Whitespace Python strips, a control, a zero-width space, a combining mark alone, private
    # use beyond the BMP: no token; the pattern must refuse each, and so must the server.
    for blank in ("\u3000 \t", "\x07", "\u200b", "\u0301", "\U000f0000"):
        assert not pattern.search(blank), repr(blank)
        r = env.post({"text": blank})
        assert r.status_code == 400 and r.json()["error"]["code"] == "empty_text", repr(blank)
    # A letter with an accent (kept once the accent goes), an unassigned code point ([UNK]).
    for kept in ("\u00e9", "\u0378"):
        assert pattern.search(kept), repr(kept)
        assert env.post({"text": kept}).status_code == 200, repr(kept)


def test_granularity_is_an_enum_of_day(env: Env, doc) -> None:
    params = {p["name"]: p for p in doc["paths"]["/v1/usage"]["get"]["parameters"]}
    assert params["granularity"]["schema"]["enum"] == ["day"]
    r = env.get("/v1/usage", params={"granularity": "week"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_granularity"
    assert env.get("/v1/usage", params={"granularity": "day"}).status_code == 200


def test_a_text_over_the_limit_in_tokens_is_413_unless_truncated(env: Env) -> None:
    """Why keep_case leaves such texts out: schema-valid, yet refused (as documented)."""
    limit = int(read_card(env.model_dir)["max_input_tokens"])
    text = "…" * (limit // 2)  # fewer characters than the limit, but NFKC reads each as "..."
    assert over_the_limit({"text": text}, str(env.model_dir))
    r = env.post({"text": text})
    assert r.status_code == 413 and r.json()["error"]["code"] == "input_too_long"
    assert not over_the_limit({"text": text, "truncate": True}, str(env.model_dir))
    assert env.post({"text": text, "truncate": True}).status_code == 200
    assert not over_the_limit({"texts": ["很好", "…"]}, str(env.model_dir))
    assert env.post({"texts": ["很好", "…"]}).status_code == 200


def test_usage_dates_out_of_order_are_invalid_date(env: Env) -> None:
    """Why keep_case leaves such pairs out: each date is valid, together they are not."""
    assert not usage_dates_in_order({"start": "2024-05-02", "end": "2024-05-01"})
    r = env.get("/v1/usage", params={"start": "2024-05-02", "end": "2024-05-01"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_date"
    assert usage_dates_in_order({"start": "2024-05-01", "end": "2024-05-01"})
    assert env.get("/v1/usage", params={"start": "2024-05-01", "end": "2024-05-01"}
                   ).status_code == 200


def test_each_route_documents_the_statuses_it_answers(env: Env, doc) -> None:
    usage = doc["paths"]["/v1/usage"]["get"]["responses"]
    analyze = doc["paths"]["/v1/analyze"]["post"]["responses"]
    assert set(usage) == {"200", "400", "401", "403", "503"}
    assert set(analyze) == {"200", "400", "401", "409", "413", "429", "503"}
    r = env.get("/v1/usage", params={"user": "someone-else"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    # FastAPI's default 422 is never answered: a validation error is our 400.
    assert not [p for p, ops in doc["paths"].items() for op in ops.values()
                if "422" in op["responses"]]
    r = httpx.get(env.server.url + "/v1/usage", timeout=30)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_metrics_are_documented_as_prometheus_text(env: Env, doc) -> None:
    content = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(content) == ["text/plain"]
    r = httpx.get(env.server.url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


def test_readyz_documents_its_503(doc) -> None:
    responses = doc["paths"]["/readyz"]["get"]["responses"]
    assert set(responses) == {"200", "503"}
    ref = responses["503"]["content"]["application/json"]["schema"]["$ref"]
    assert "ledger_writer_alive" in doc["components"]["schemas"][ref.rsplit("/", 1)[-1]][
        "properties"]


def test_405_names_the_allowed_methods(env: Env) -> None:
    r = httpx.delete(env.server.url + "/v1/usage", timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.get(env.server.url + "/v1/analyze", timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
