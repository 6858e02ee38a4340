"""Fixtures for the endpoint tests: the smoke model (or TOKENMETER_TEST_MODEL_DIR) and what the
tests need to know about it, read from its own files; a real uvicorn server in a subprocess on a
free loopback port (pipeline.benchmark.process, as the benchmark starts it); keys made with the
real CLI; and a fresh PostgreSQL database per test for the tests marked `postgres`
(pipeline.benchmark.scratch_db; skipped at collection, saying so, when TOKENMETER_TEST_PG_DSN is
empty)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import httpx
import pytest
import yaml

from pipeline.benchmark.process import HOST, Process, ProcessError, free_port
from pipeline.benchmark.scratch_db import scratch_database

ROOT = Path(__file__).resolve().parents[2]
PG_ENV = "TOKENMETER_TEST_PG_DSN"
PG_MISSING = (f"needs PostgreSQL: {PG_ENV} is empty; scripts/test starts one "
              "(TOKENMETER_TEST_PG_DSN=$(bash scripts/postgres.sh))")
PRICING_FILE = ROOT / "serving" / "pricing.yaml"  # what `serve` reads unless told otherwise


def pytest_collection_modifyitems(config, items):
    """Tests marked `postgres` are skipped, saying what is missing, when no server is given;
    `redis` and `haproxy` ones when the Debian binary is not installed.
    (This hook sees every collected item, so it also covers tests/pipeline's postgres test
    when both folders run together; that test also carries its own skipif for runs alone.)"""
    binaries = {"redis": "redis-server", "haproxy": "haproxy"}  # marker -> Debian binary
    for item in items:
        if item.get_closest_marker("postgres") and not os.environ.get(PG_ENV):
            item.add_marker(pytest.mark.skip(reason=PG_MISSING))
        for marker, exe in binaries.items():
            if item.get_closest_marker(marker) and shutil.which(exe) is None:
                item.add_marker(pytest.mark.skip(
                    reason=f"needs {exe} (Debian's `{exe}`; scripts/system-packages.sh)"))


def cli(ledger: str, *args: str, env: Optional[Dict[str, str]] = None,
        check: bool = True) -> subprocess.CompletedProcess:
    full = {**os.environ, **(env or {}), "TOKENMETER_LEDGER": ledger}
    r = subprocess.run([sys.executable, "-m", "serving", *args], cwd=ROOT, env=full,
                       capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr[-2000:]
    return r


def post_all(urls: Sequence[str], keys: Sequence[str], n: int, body: object = None, *,
             content: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None,
             timeout: float = 120) -> List[httpx.Response]:
    """`n` POST /v1/analyze sent at once, one connection each: request i goes to
    urls[i % len(urls)] with keys[i % len(keys)]; `body` as JSON, or `content` as it is."""
    async def send() -> List[httpx.Response]:
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=n),
                                     timeout=timeout) as c:
            return await asyncio.gather(*[
                c.post(urls[i % len(urls)] + "/v1/analyze", json=body, content=content,
                       headers={"Authorization": f"Bearer {keys[i % len(keys)]}",
                                **(headers or {})}) for i in range(n)])

    return asyncio.run(send())


def make_key(ledger: str, user: str, *extra: str) -> str:
    out = cli(ledger, "keys", "create", "--user", user, "--json", *extra).stdout
    return json.loads(out)["key"]


class Server(Process):
    """`python -m serving serve` in a subprocess on 127.0.0.1 (its own process group), stdout
    and stderr to a log file. Failures are AssertionErrors with the log's tail."""

    def __init__(self, model_dir: Path, ledger: str, log: Path,
                 env: Optional[Dict[str, str]] = None):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.ledger = ledger
        super().__init__([sys.executable, "-m", "serving", "serve"], log,
                         {**os.environ, "TOKENMETER_MODEL_DIR": str(model_dir),
                          "TOKENMETER_LEDGER": ledger, "TOKENMETER_HOST": HOST,
                          "TOKENMETER_PORT": str(self.port), **(env or {})},
                         ROOT, what="server")

    def start(self, timeout: float = 180) -> "Server":
        return self.launch().wait_ready(timeout)

    def launch(self) -> "Server":
        super().launch()
        return self

    def wait_ready(self, timeout: float = 180) -> "Server":
        """Until /readyz answers 200; stopped, and an AssertionError with the log, if not."""
        try:
            self.wait_http(self.port, "/readyz", timeout)
        except ProcessError as exc:
            raise AssertionError(f"{exc}: {exc.tail()}") from None
        return self

    def billing_lines(self) -> List[dict]:
        out = []
        for line in self.log().splitlines():
            if line.startswith("{") and '"billing_event"' in line:
                out.append(json.loads(line))
        return out


@pytest.fixture(scope="module")
def runner(model_dir):
    """The real model runner in this process (no warm-up), one per test module."""
    from serving.runner import ModelRunner

    r = ModelRunner(model_dir, execution="graph", warmup=False)
    yield r
    r.stop()


@pytest.fixture
def pg_dsn(request):
    """A fresh, empty database on the test server; dropped afterwards. Only for tests marked
    `postgres` (the mark is what skips them where no server is given); a server that is given
    but unreachable is an error, not a skip."""
    assert request.node.get_closest_marker("postgres"), \
        f"{request.node.nodeid} uses pg_dsn: mark it (or its parameter) pytest.mark.postgres"
    admin = os.environ.get(PG_ENV, "")
    assert admin, PG_MISSING  # the collection hook skipped it otherwise
    with scratch_database(admin, "tm_") as dsn:
        yield dsn


class ModelFacts:
    """What the endpoint tests expect of the model under test, read from its own files
    (model_card.json, labels.json, tokenizer.json) and the pricing file with plain json, yaml
    and `tokenizers` (never through serving's code), so no figure is tied to the smoke model:
    TOKENMETER_TEST_MODEL_DIR may point at any exported model."""

    def __init__(self, model_dir: Path, pricing_file: Path = PRICING_FILE):
        from tokenizers import Tokenizer

        card = json.loads((model_dir / "model_card.json").read_text(encoding="utf-8"))
        self.name, self.version = str(card["name"]), str(card["version"])
        self.max_tokens = int(card["max_input_tokens"])
        labels = json.loads((model_dir / "labels.json").read_text(encoding="utf-8"))
        self.labels = [str(v) for _, v in sorted(labels.items(), key=lambda kv: int(kv[0]))]
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        prices = yaml.safe_load(pricing_file.read_text(encoding="utf-8"))
        model_price = prices["models"][self.name]
        self.currency = str(prices.get("currency", "USD"))
        self.input_price = Decimal(str(model_price["input_per_1k"]))
        self.output_price = Decimal(str(model_price["output_per_1k"]))

    def input_tokens(self, texts: Sequence[str]) -> int:
        """[CLS] and [SEP] included, summed over the texts (README "Metering")."""
        return sum(len(self.tokenizer.encode(t).ids) for t in texts)

    def output_tokens(self, labels: Sequence[str]) -> int:
        """The label texts' tokens without special tokens, summed."""
        return sum(len(self.tokenizer.encode(lb, add_special_tokens=False).ids)
                   for lb in labels)

    @property
    def max_output_tokens(self) -> int:
        return max(self.output_tokens([lb]) for lb in self.labels)

    @staticmethod
    def side_micro(tokens: int, price_per_1k: Decimal) -> int:
        """README's rule: tokens x price / 1000 in USD, half-up to a whole micro-USD."""
        usd = Decimal(tokens) * price_per_1k / 1000
        return int((usd * 1_000_000).quantize(Decimal(1), rounding=ROUND_HALF_UP))

    def cost_micro(self, input_tokens: int, output_tokens: int) -> int:
        return (self.side_micro(input_tokens, self.input_price)
                + self.side_micro(output_tokens, self.output_price))

    def too_long_text(self, extra: int = 10) -> str:
        """A text of more than max_input_tokens + `extra` tokens."""
        unit = "好评"
        text = unit
        while len(self.tokenizer.encode(text).ids) <= self.max_tokens + extra:
            text += unit
        return text


def priced_event(key, ts: str, model: str, n_in: int, n_out: int, p_in: str, p_out: str,
                 instance_id: str = "test"):
    """A billing row as the endpoint would write it for `key` at `ts`, its amounts by the
    README's rounding rule computed here (ModelFacts.side_micro), not by serving.pricing."""
    import uuid

    from serving.ledger import BillingEvent

    c_in = ModelFacts.side_micro(n_in, Decimal(p_in))
    c_out = ModelFacts.side_micro(n_out, Decimal(p_out))
    eid = "evt_" + uuid.uuid4().hex
    return BillingEvent(id=eid, ts=ts, key_id=key.id, user_id=key.user_id, model=model,
                        model_version="1", input_tokens=n_in, output_tokens=n_out,
                        currency="USD", input_price_per_1k=p_in, output_price_per_1k=p_out,
                        input_cost_micro=c_in, output_cost_micro=c_out,
                        cost_micro=c_in + c_out, latency_us=1000, request_id=eid,
                        instance_id=instance_id, idempotency_key=None, response="{}")


# Short texts of both sentiments, for priciest_text() to choose from.
CANDIDATES = ["好", "差", "很好", "很差", "好评", "差评", "非常满意", "太差了，退货"]


def priciest_text(url: str, key: str, facts: ModelFacts):
    """A short text that the model under test answers with its longest label, and what it
    costs (micro-USD). For such a text, what admission reserves (input + the longest label)
    is exactly what is billed, so a budget of N times its cost admits exactly N requests,
    however they interleave. The labels come from real answers to `key`."""
    for text in CANDIDATES:
        r = httpx.post(url + "/v1/analyze", json={"text": text}, timeout=60,
                       headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        out = facts.output_tokens([r.json()["results"][0]["label"]])
        if out == facts.max_output_tokens:
            return text, facts.cost_micro(facts.input_tokens([text]), out)
    raise AssertionError(f"the model gives none of {CANDIDATES} its longest label")


@pytest.fixture(scope="session")
def facts(model_dir) -> ModelFacts:
    return ModelFacts(model_dir)
