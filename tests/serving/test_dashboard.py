"""The Grafana dashboard (deploy/grafana/) queries what exists, and its figures are right.

Grafana itself is not run here; what it would send is:
- every metric a PromQL expression names is one a real endpoint's /metrics exports (a copy of
  the dashboard naming `tokenmeter_nonexistent_total` is caught, so the check itself works);
- every PromQL expression, with Grafana's variables given concrete values, returns at least
  one finite sample from a real Prometheus (Debian's `prometheus` binary) scraping a real
  endpoint every second under a short load of billed and refused requests;
- every SQL query, with Grafana's PostgreSQL macros expanded as Grafana expands them, runs on
  a real PostgreSQL ledger holding a generated month written through the real ledger writer,
  and returns that month's figures: the top 10 users exactly and in order, each day's tokens,
  revenue and tokens per request, and the month's totals, with rows just outside the range
  left out;
- the committed JSON is what deploy/grafana/build_dashboard.py builds, its panels name the
  provisioned data sources, and docker/compose.yaml mounts the provisioning Grafana reads.
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set, Tuple

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pipeline.benchmark.process import HOST, Process, ProcessError, free_port
from serving.keys import create_key
from serving.ledger import BillingEvent, Ledger, open_ledger
from tests.serving.conftest import ROOT, Server, make_key, priced_event

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tokenmeter.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "tokenmeter.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "tokenmeter.yaml"
COMPOSE = ROOT / "docker" / "compose.yaml"
PROMETHEUS_YML = ROOT / "docker" / "prometheus.yml"

PROMETHEUS = shutil.which("prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="needs the `prometheus` binary (Debian's prometheus package; "
           "bash scripts/system-packages.sh installs it)")

Panel = Dict[str, Any]

# --- the dashboard as data ---------------------------------------------------------------------


def load_dashboard() -> Dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def query_panels(dash: Dict[str, Any]) -> List[Panel]:
    """Panels that query something (rows only group)."""
    return [p for p in dash["panels"] if p["type"] != "row"]


def targets(dash: Dict[str, Any], ds_type: str) -> List[Tuple[str, Dict[str, Any]]]:
    """(panel title, target) for every target of data source type `ds_type`."""
    return [(p["title"], t) for p in query_panels(dash) for t in p["targets"]
            if t["datasource"]["type"] == ds_type]


def promql(dash: Dict[str, Any]) -> List[Tuple[str, str]]:
    return [(f"{title} [{t['refId']}]", t["expr"]) for title, t in targets(dash, "prometheus")]


def sql_queries(dash: Dict[str, Any]) -> Dict[str, str]:
    out = {title: t["rawSql"] for title, t in targets(dash, "grafana-postgresql-datasource")}
    assert len(out) == len(targets(dash, "grafana-postgresql-datasource")), \
        "one SQL query per ledger panel (the test finds them by panel title)"
    return out


# Grafana's values for its own variables, as a 1 s scrape allows; anything else left is an
# error (a variable Grafana would have to know and this test does not).
GRAFANA_VARS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}


def with_grafana_vars(expr: str) -> str:
    for name, value in GRAFANA_VARS.items():
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in expr, f"a variable this test does not know is left in {expr!r}"
    return expr


# --- metric names in PromQL ---------------------------------------------------------------------

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                   "and", "or", "unless", "offset", "inf", "nan"}
STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"(?<![A-Za-z0-9_:.])[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> Set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions or
    aggregations (followed by `(`), keywords, label names (in `{...}` or a by/on/... list),
    durations (in `[...]`, or after a digit) or inside strings."""
    assert "__name__" not in expr, "a __name__ matcher hides a metric from this check"
    s = STRINGS.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = LABEL_LISTS.sub(" ", s)
    names = set()
    for m in IDENTIFIER.finditer(s):
        word = m.group(0)
        if s[m.end():].lstrip().startswith("(") or word.lower() in PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def unknown_metrics(dash: Dict[str, Any], exported: Set[str]) -> Dict[str, Set[str]]:
    """{panel [refId]: names the endpoint does not export}, for expressions naming any."""
    out = {}
    for where, expr in promql(dash):
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r} (is the extractor wrong?)"
        if names - exported:
            out[where] = names - exported
    return out


def exported_names(metrics_text: str) -> Set[str]:
    """Every series name on a /metrics page (histograms as _bucket/_sum/_count)."""
    return {s.name for fam in text_string_to_metric_families(metrics_text)
            for s in fam.samples}


# --- Grafana's PostgreSQL macros ----------------------------------------------------------------

FROM = datetime(2026, 10, 1, tzinfo=timezone.utc)
TO = datetime(2026, 11, 1, tzinfo=timezone.utc)
# Grafana's own pattern (pkg/tsdb/grafana-postgresql-datasource/macros.go): arguments end at
# the first ')', so a macro argument with parentheses breaks there too, and fails here.
MACRO = re.compile(r"\$([_a-zA-Z0-9]+)\(([^\)]*)\)")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def rfc3339(t: datetime) -> str:
    """Go's RFC3339Nano for a whole second in UTC, as Grafana formats the range."""
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def interval_s(arg: str) -> int:
    m = re.fullmatch(r"(\d+)([smhdw])", arg.strip("'"))
    assert m, f"interval {arg!r} is not one this test parses"
    return int(m.group(1)) * UNITS[m.group(2)]


def expand_macros(sql: str, start: datetime = FROM, end: datetime = TO) -> str:
    """The SQL Grafana sends for the time range [start, end]: the macros the dashboard uses,
    expanded as Grafana 11 does; an unknown macro, or any `$` left, fails."""

    def one(m: "re.Match[str]") -> str:
        name, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
        # Grafana's pre-5.3 rule: $__timeGroup directly followed by ',' gets an alias.
        if name == "__timeGroup" and sql[m.end():m.end() + 1] == ",":
            name = "__timeGroupAlias"
        if name == "__timeFilter":
            return f"{args[0]} BETWEEN '{rfc3339(start)}' AND '{rfc3339(end)}'"
        if name == "__timeFrom":
            return f"'{rfc3339(start)}'"
        if name == "__timeTo":
            return f"'{rfc3339(end)}'"
        if name in ("__timeGroup", "__timeGroupAlias"):
            assert len(args) == 2, f"{name} with a fill value is not implemented here"
            s = interval_s(args[1])
            group = f"floor(extract(epoch from {args[0]})/{s})*{s}"
            return group + (' AS "time"' if name == "__timeGroupAlias" else "")
        raise AssertionError(f"unknown Grafana macro ${name} in {sql!r}")

    out = MACRO.sub(one, sql)
    assert "$" not in out, f"a macro or variable is left in {out!r}"
    return out


# --- the static part: JSON, data sources, compose ----------------------------------------------


def test_the_committed_json_is_what_the_script_builds():
    r = subprocess.run([sys.executable, str(GRAFANA / "build_dashboard.py"), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    dash = load_dashboard()
    assert dash["schemaVersion"] == 39 and dash["uid"] == "tokenmeter"
    # Grafana keys panel state by id, and overlapping grid cells hide one another.
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: Dict[Tuple[int, int], str] = {}
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, f"{p['title']} runs past Grafana's 24 columns"
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_panels_use_the_provisioned_data_sources():
    provisioned = yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))["datasources"]
    by_uid = {d["uid"]: d["type"] for d in provisioned}
    assert sorted(by_uid.values()) == ["grafana-postgresql-datasource", "prometheus"]
    dash = load_dashboard()
    for p in query_panels(dash):
        assert p["targets"], f"{p['title']} has no query"
        for ds in [p["datasource"]] + [t["datasource"] for t in p["targets"]]:
            assert by_uid.get(ds["uid"]) == ds["type"], f"{p['title']}: {ds} is not provisioned"
    titles = {p["title"] for p in query_panels(dash)}
    # The four views, and the service health ones.
    assert {"Daily total tokens", "Top 10 users by tokens", "Average tokens per request",
            "CPU utilisation vs unit cost per 1K tokens", "Requests per second by status",
            "Errors", "Latency (2xx answers)", "Queue depth"} <= titles
    # No GPU exporter runs here: the CPU panel says where GPU utilisation would come from
    # instead of querying a series that can never exist.
    [cpu] = [p for p in query_panels(dash) if p["title"].startswith("CPU utilisation")]
    assert "DCGM_FI_DEV_GPU_UTIL" in cpu["description"]
    latency = " ".join(e for where, e in promql(dash) if where.startswith("Latency"))
    assert re.findall(r"histogram_quantile\((0\.\d+)", latency) == ["0.5", "0.95", "0.99"]
    providers = yaml.safe_load(PROVIDERS.read_text(encoding="utf-8"))["providers"]
    assert [p["type"] for p in providers] == ["file"]


def test_compose_runs_grafana_with_the_provisioning():
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    grafana = compose["services"]["grafana"]
    # Pinned like the other third-party image: a full version tag, never `latest`.
    assert re.fullmatch(r"\$\{GRAFANA_IMAGE:-docker\.io/grafana/grafana:1[01]\.\d+\.\d+\}",
                        grafana["image"]), grafana["image"]
    assert all(str(p).startswith("127.0.0.1:") for p in grafana["ports"])
    mounts = {}
    for v in grafana["volumes"]:
        src, dst = v.split(":")[:2]
        if src.startswith("."):
            host = (COMPOSE.parent / src).resolve()
            assert host.is_dir(), f"compose mounts {src}, which is not a folder here"
            mounts[dst] = host
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    # The dashboards provider reads the folder compose mounts the committed JSON into.
    [provider] = yaml.safe_load(PROVIDERS.read_text(encoding="utf-8"))["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert mounts[str(Path(home).parent)] / Path(home).name == DASHBOARD
    # Every ${VAR} the data sources read is set for Grafana (else it would read "").
    wanted = set(re.findall(r"\$\{(\w+)\}", DATASOURCES.read_text(encoding="utf-8")))
    assert wanted and wanted <= set(grafana["environment"]), wanted - set(grafana["environment"])
    prom_url = grafana["environment"]["TOKENMETER_GRAFANA_PROMETHEUS_URL"]
    assert prom_url == "http://prometheus:9090" and "prometheus" in compose["services"]
    assert "prometheus" in grafana["depends_on"]
    # $__rate_interval is four scrapes only if the data source knows the scrape interval.
    [prom_ds] = [d for d in yaml.safe_load(DATASOURCES.read_text(encoding="utf-8"))
                 ["datasources"] if d["type"] == "prometheus"]
    scrape = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))["global"]
    assert prom_ds["jsonData"]["timeInterval"] == scrape["scrape_interval"]


def test_the_metric_extractor_reads_promql_as_prometheus_does():
    expr = ('sum by (le) (rate(a_bucket{x="y", le!="b_total"}[5m])) / ignoring(direction) '
            'group_left() (c:recorded offset 5m > 1e6) and on(job) d unless Inf')
    assert metric_names(expr) == {"a_bucket", "c:recorded", "d"}


# --- a real endpoint, and a real Prometheus scraping it -----------------------------------------

TEXTS = ["好", "差", "很好", "很差", "好评", "差评", "非常满意", "太差了，退货", "还可以吧"]


def post(client: httpx.Client, url: str, key: str, body: Dict[str, Any]) -> int:
    r = client.post(url + "/v1/analyze", json=body, timeout=30,
                    headers={"Authorization": f"Bearer {key}"})
    return r.status_code


def load(url: str, key: str, seconds: float, threads: int = 4, per_second: float = 40,
         max_requests: int = 1000) -> Counter:
    """About `per_second` requests a second from `threads` clients for `seconds` (spread out
    so that a rate window sees traffic all along, not one burst between two scrapes):
    mostly billed ones (one to three texts), every 7th with a body the endpoint refuses,
    every 11th with an unknown key, so the error panels have 4xx to show. Answers counted
    by status."""
    statuses: Counter = Counter()
    lock = threading.Lock()
    start = time.monotonic()
    gap = threads / per_second  # seconds between one client's requests

    def client(n: int) -> None:
        rng = random.Random(n)
        with httpx.Client() as c:
            for i in range(1, max_requests + 1):
                due = start + n * gap / threads + (i - 1) * gap
                if due - start >= seconds:
                    return
                time.sleep(max(0.0, due - time.monotonic()))
                if i % 7 == 0:
                    code = post(c, url, key, {"txt": "a misspelt field"})
                elif i % 11 == 0:
                    code = post(c, url, "tm_not_a_key", {"text": "好"})
                else:
                    code = post(c, url, key, {"texts": rng.sample(TEXTS, rng.randint(1, 3))})
                with lock:
                    statuses[code] += 1

    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return statuses


@pytest.fixture(scope="module")
def endpoint(model_dir, tmp_path_factory) -> Iterator[Tuple[Server, str]]:
    """A real endpoint on a fresh SQLite ledger with a machine price set, and a key; a few
    requests of each kind already answered, so every labelled series exists."""
    d = tmp_path_factory.mktemp("dashboard")
    ledger = str(d / "ledger.sqlite3")
    key = make_key(ledger, "dashboard-load")
    server = Server(model_dir, ledger, d / "server.log",
                    env={"TOKENMETER_HARDWARE_USD_PER_HOUR": "0.085"}).start()
    try:
        statuses = load(server.url, key, seconds=1, threads=1, per_second=22)
        assert statuses[200] and any(400 <= s < 500 for s in statuses), statuses
        yield server, key
    finally:
        server.stop()


@pytest.mark.slow
def test_every_metric_the_dashboard_names_is_exported(endpoint):
    server, _ = endpoint
    r = httpx.get(server.url + "/metrics", timeout=30)
    assert r.status_code == 200
    exported = exported_names(r.text)
    # The page is what the check compares against: it must hold the billing series.
    assert {"tokenmeter_billed_tokens_total", "process_cpu_seconds_total",
            "tokenmeter_request_latency_seconds_bucket"} <= exported
    dash = load_dashboard()
    assert unknown_metrics(dash, exported) == {}
    # The same check on a copy naming a metric nobody exports fails, naming it.
    broken = copy.deepcopy(dash)
    panel = next(p for p in query_panels(broken) if p["title"] == "Queue depth")
    panel["targets"].append({"refId": "Z", "datasource": panel["datasource"],
                             "expr": "sum(rate(tokenmeter_nonexistent_total[$__rate_interval]))"})
    assert unknown_metrics(broken, exported) == {
        "Queue depth [Z]": {"tokenmeter_nonexistent_total"}}


class Prometheus(Process):
    """Debian's prometheus on a free loopback port with a fresh TSDB, scraping `target` every
    second with docker/prometheus.yml's job (its name, path and labels)."""

    def __init__(self, target: str, workdir: Path):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        config = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        [job] = config["scrape_configs"]
        job["static_configs"][0]["targets"] = [target]
        conf = workdir / "prometheus.yml"
        conf.write_text(yaml.safe_dump(config), encoding="utf-8")
        super().__init__([str(PROMETHEUS), f"--config.file={conf}",
                          f"--storage.tsdb.path={workdir / 'tsdb'}",
                          f"--web.listen-address={HOST}:{self.port}"],
                         workdir / "prometheus.log", None, workdir, what="prometheus")

    def start(self) -> "Prometheus":
        self.launch()
        try:
            self.wait_http(self.port, "/-/ready", 60)
        except ProcessError as exc:
            raise AssertionError(f"{exc}: {exc.tail()}") from None
        return self

    def query(self, expr: str) -> Dict[str, Any]:
        r = httpx.post(self.url + "/api/v1/query", data={"query": expr}, timeout=30)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", \
            f"{expr!r}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]


def samples(data: Dict[str, Any]) -> List[float]:
    """The values of an instant query's answer (a vector's samples, or a scalar)."""
    if data["resultType"] == "scalar":
        return [float(data["result"][1])]
    assert data["resultType"] == "vector", data["resultType"]
    return [float(s["value"][1]) for s in data["result"]]


def billed_requests(metrics_text: str) -> float:
    return sum(s.value for fam in text_string_to_metric_families(metrics_text)
               for s in fam.samples if s.name == "tokenmeter_billed_requests_total")


@pytest.mark.slow
@needs_prometheus
def test_every_promql_expression_returns_data(endpoint, tmp_path):
    server, key = endpoint
    prom = Prometheus(f"{HOST}:{server.port}", tmp_path).start()
    try:
        # The load starts once Prometheus scrapes the endpoint, so it sees all of it.
        deadline = time.monotonic() + 20
        while samples(prom.query("up")) != [1.0] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert samples(prom.query("up")) == [1.0], "Prometheus does not scrape the endpoint"
        statuses = load(server.url, key, seconds=10)
        # A few hundred requests, billed and refused, so every rate has something to rate.
        assert sum(statuses.values()) >= 200 and statuses[200] >= 100, statuses
        assert sum(n for s, n in statuses.items() if 400 <= s < 500) >= 20, statuses
        # Until Prometheus has scraped the endpoint as it stands after the load.
        want = billed_requests(httpx.get(server.url + "/metrics", timeout=30).text)
        deadline = time.monotonic() + 20
        while True:
            got = samples(prom.query("sum(tokenmeter_billed_requests_total)"))
            if got == [want] or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert got == [want], f"Prometheus has {got} billed requests, the endpoint {want}"
        answers = {}
        for where, expr in promql(load_dashboard()):
            values = samples(prom.query(with_grafana_vars(expr)))
            answers[where] = values
            assert values, f"{where}: no data for {expr!r}"
            assert any(math.isfinite(v) for v in values), f"{where}: only {values}"
        print("\n".join(f"{w}: {v}" for w, v in answers.items()))
    finally:
        prom.stop()


# --- a real PostgreSQL ledger -------------------------------------------------------------------

MODELS = {"sentiment": ("0.002", "0.002"), "sentiment-large": ("0.010", "0.030")}


def billing_event(key, ts: str, model: str, n_in: int, n_out: int) -> BillingEvent:
    return priced_event(key, ts, model, n_in, n_out, *MODELS[model],
                        instance_id="dashboard-test")


def write_month(led: Ledger) -> List[BillingEvent]:
    """October 2026 for 14 users (their totals all differ), one or two keys each, both models;
    rows on the range's edges; and a heavy user whose rows all lie just outside it (it would
    top the list if the time filter let them in). Returns the events inside the range."""
    rng = random.Random(12)
    events: List[BillingEvent] = []
    for u in range(14):
        user = f"user-{u:02d}"
        keys = [create_key(led, user)[0] for _ in range(1 + u % 2)]
        for _ in range(12 + 3 * u):
            ts = (f"2026-10-{rng.randint(1, 31):02d}T{rng.randint(0, 23):02d}:"
                  f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}."
                  f"{rng.randint(0, 999999):06d}Z")
            events.append(billing_event(rng.choice(keys), ts, rng.choice(list(MODELS)),
                                        rng.randint(3, 500), rng.randint(1, 24)))
    edge = create_key(led, "user-00")[0]
    events.append(billing_event(edge, "2026-10-01T00:00:00.000000Z", "sentiment", 7, 1))
    events.append(billing_event(edge, "2026-10-31T23:59:59.999999Z", "sentiment", 9, 2))
    outside = create_key(led, "outside-the-range")[0]
    for ts in ("2026-09-30T23:59:59.999999Z", "2026-11-01T00:00:00.000001Z"):
        events.append(billing_event(outside, ts, "sentiment-large", 1_000_000, 24))
    futures = [led.commit_event(e) for e in events]
    assert all(f.result(timeout=60).status == "billed" for f in futures)
    return [e for e in events if e.ts.startswith("2026-10")]


@pytest.fixture
def pg_ledger(pg_dsn) -> Iterator[Tuple[str, List[BillingEvent]]]:
    led = open_ledger(pg_dsn)
    led.start()
    try:
        yield pg_dsn, write_month(led)
    finally:
        led.stop()
        led.close()


def run_sql(dsn: str, sql: str) -> Tuple[List[str], List[tuple]]:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute(sql.encode("utf-8"))  # bytes: no placeholder parsing, as Grafana sends it
        assert cur.description is not None
        return [c.name for c in cur.description], cur.fetchall()


def day_of(epoch: Any) -> str:
    return datetime.fromtimestamp(float(epoch), timezone.utc).date().isoformat()


def exact(v: Any) -> int:
    """A SUM of BIGINT (PostgreSQL numeric) as an int, failing if it is not whole."""
    assert Decimal(v) == int(v), v
    return int(v)


@pytest.mark.slow
@pytest.mark.postgres
def test_every_sql_panel_runs_on_a_postgres_ledger(pg_ledger):
    dsn, events = pg_ledger
    tokens: Dict[str, int] = defaultdict(int)
    inputs: Dict[str, int] = defaultdict(int)
    outputs: Dict[str, int] = defaultdict(int)
    costs: Dict[str, int] = defaultdict(int)
    requests: Counter = Counter()
    day_tokens: Dict[str, int] = defaultdict(int)
    day_requests: Counter = Counter()
    day_model_cost: Dict[Tuple[str, str], int] = defaultdict(int)
    for e in events:
        tokens[e.user_id] += e.input_tokens + e.output_tokens
        inputs[e.user_id] += e.input_tokens
        outputs[e.user_id] += e.output_tokens
        costs[e.user_id] += e.cost_micro
        requests[e.user_id] += 1
        day_tokens[e.ts[:10]] += e.input_tokens + e.output_tokens
        day_requests[e.ts[:10]] += 1
        day_model_cost[(e.ts[:10], e.model)] += e.cost_micro
    assert len(set(tokens.values())) == len(tokens) == 14  # no tie: one right answer
    top10 = sorted(tokens, key=lambda u: -tokens[u])[:10]

    queries = sql_queries(load_dashboard())
    results = {title: run_sql(dsn, expand_macros(q)) for title, q in queries.items()}
    for title, (_, rows) in results.items():
        assert rows, f"{title}: no rows"

    cols, rows = results["Top 10 users by tokens"]
    assert cols == ["user", "tokens", "input tokens", "output tokens", "requests",
                    "cost (USD)"]
    assert [r[0] for r in rows] == top10
    for user, tok, n_in, n_out, n_req, cost in rows:
        assert (exact(tok), exact(n_in), exact(n_out), n_req) == \
            (tokens[user], inputs[user], outputs[user], requests[user]), user
        assert Decimal(cost) == Decimal(costs[user]) / 1_000_000, user

    cols, rows = results["Daily total tokens"]
    assert cols == ["time", "tokens"]
    assert [day_of(t) for t, _ in rows] == sorted(day_tokens)  # ordered by time, UTC days
    assert {day_of(t): exact(v) for t, v in rows} == day_tokens

    cols, rows = results["Average tokens per request, by day"]
    assert cols == ["time", "tokens per request"]
    got = {day_of(t): Decimal(v) for t, v in rows}
    assert set(got) == set(day_tokens)
    for day, v in got.items():
        assert abs(v - Decimal(day_tokens[day]) / day_requests[day]) < Decimal("1e-9"), day

    cols, rows = results["Daily revenue by model"]
    assert cols == ["time", "metric", "revenue (USD)"]
    assert {(day_of(t), m): Decimal(v) for t, m, v in rows} == \
        {k: Decimal(v) / 1_000_000 for k, v in day_model_cost.items()}

    cols, rows = results["Ledger totals in range"]
    assert cols == ["requests", "tokens", "users", "revenue (USD)"]
    [(n_req, tok, users, revenue)] = rows
    assert (n_req, exact(tok), users) == (len(events), sum(tokens.values()), 14)
    assert Decimal(revenue) == Decimal(sum(costs.values())) / 1_000_000

    # Every ledger panel is checked above; a new one must be checked too.
    assert set(results) == {"Top 10 users by tokens", "Daily total tokens",
                            "Average tokens per request, by day", "Daily revenue by model",
                            "Ledger totals in range"}


def test_macros_expand_as_grafana_expands_them():
    got = expand_macros("SELECT $__timeGroupAlias(ts::timestamptz, 1d), x FROM t "
                        "WHERE $__timeFilter(ts::timestamptz) AND y < $__timeTo()")
    assert got == ('SELECT floor(extract(epoch from ts::timestamptz)/86400)*86400 AS "time", '
                   "x FROM t WHERE ts::timestamptz BETWEEN '2026-10-01T00:00:00Z' AND "
                   "'2026-11-01T00:00:00Z' AND y < '2026-11-01T00:00:00Z'")
    with pytest.raises(AssertionError, match="unknown Grafana macro"):
        expand_macros("SELECT $__unixEpochGroup(t, 1h)")
