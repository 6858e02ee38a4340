"""Stage `benchmark`: what serving a token costs, measured. Model-only ceiling, the metered endpoint
started for real (subprocess on 127.0.0.1, fresh ledger, keys from the CLI) under closed-loop load
at several concurrencies, the same endpoint unmetered, the brief's naive Flask design, and the
ledger alone; then cost per 1K tokens from hourly hardware prices against the pricing file.

Writes metrics/benchmark.json, metrics/benchmark_{load,cost}.csv (DVC plots), plots/benchmark_*.png,
build/benchmark/ (per-request CSV, the ledger, server logs) and one MLflow run in `token-cost`.

This module owns the run: its inputs, the servers it starts and the load it drives, the order of
the measurements and where the results go. Arithmetic on the results belongs in `figures`, their
files, plots and MLflow run in `outputs`; process handling in `process`. Run as
`python -m pipeline.benchmark` (`__main__`).
"""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from pipeline import paths
from pipeline.benchmark import ceiling, ledger_capacity
from pipeline.benchmark.figures import (
    batch_distribution,
    batch_histogram,
    best,
    cost_table,
    number,
    ratios,
)
from pipeline.benchmark.loadgen import LoadResult, Record, run_load, summarize
from pipeline.benchmark.outputs import (
    cost_csv,
    draw_plots,
    load_csv,
    log_mlflow,
    requests_csv,
    table,
)
from pipeline.benchmark.process import (
    HOST,
    ServerProcess,
    cpu_seconds,
    free_port,
    http_get,
    serving_cli,
)
from pipeline.errors import fail, require
from pipeline.io import read_jsonl, write_atomic, write_json
from pipeline.params import Benchmark, Export, load
from serving.model_dir import TOKENIZER_FILE, read_card, read_labels

ROOT = Path(__file__).resolve().parents[2]
LoadFn = Callable[..., LoadResult]


# --- inputs -----------------------------------------------------------------------------------
def sample_texts(b: Benchmark) -> List[str]:
    import numpy as np

    texts = [r["text"] for r in read_jsonl(paths.split_file("test"))]
    if not texts:
        fail(f"{paths.split_file('test')} is empty; run the prepare stage first")
    rng = np.random.default_rng(b.seed)
    picks = rng.choice(len(texts), size=min(b.texts, len(texts)), replace=False)
    return [texts[i] for i in picks]


def request_bodies(texts: Sequence[str]) -> List[bytes]:
    import json

    # truncate: a text over the model's maximum is cut and billed at the cut count, not 413.
    return [json.dumps({"text": t, "truncate": True}, ensure_ascii=False).encode("utf-8")
            for t in texts]


def batch_bodies(texts: Sequence[str], per_request: int) -> List[bytes]:
    """Requests of `per_request` texts each (`texts`), consecutive texts of the sample."""
    import json

    return [json.dumps({"texts": list(texts[i: i + per_request]), "truncate": True},
                       ensure_ascii=False).encode("utf-8")
            for i in range(0, len(texts) - per_request + 1, per_request)]


# --- servers ----------------------------------------------------------------------------------
def endpoint(name: str, model_dir: Path, ledger: Path, b: Benchmark, metering: bool,
             out_dir: Path, pricing_file: Optional[Path] = None) -> ServerProcess:
    port = free_port()
    env = {"TOKENMETER_MODEL_DIR": str(model_dir.resolve()),
           "TOKENMETER_LEDGER": str(ledger.resolve()),
           "TOKENMETER_HOST": HOST, "TOKENMETER_PORT": str(port),
           "TOKENMETER_EXECUTION": b.execution, "TOKENMETER_MAX_BATCH": str(b.max_batch),
           "TOKENMETER_MAX_WAIT_MS": str(b.max_wait_ms),
           "TOKENMETER_MAX_BODY_BYTES": str(1024 * 1024)}
    if not metering:
        env.update({"TOKENMETER_METERING": "off", "TOKENMETER_ALLOW_UNMETERED": "1"})
    if pricing_file is not None:
        env["TOKENMETER_PRICING_FILE"] = str(pricing_file.resolve())
    return ServerProcess(name, [sys.executable, "-m", "serving", "serve"], env, ROOT,
                         out_dir / f"{name}.log", port, "/readyz", b.server_start_timeout_s)


def naive(model_dir: Path, b: Benchmark, out_dir: Path) -> ServerProcess:
    port = free_port()
    return ServerProcess("naive", [sys.executable, "-m", "pipeline.benchmark.naive_server",
                                   str(model_dir.resolve()), str(port)], {}, ROOT,
                         out_dir / "naive.log", port, "/healthz", b.server_start_timeout_s)


def fresh_ledger(path: Path) -> None:
    ledger_capacity.remove_sqlite(path)


def with_priority(out_dir: Path) -> Path:
    """The default price file plus a priority surcharge for every model (the stage measures
    the queue, not the price: any surcharge will do)."""
    import yaml

    from serving.settings import DEFAULT_PRICING

    prices = yaml.safe_load(DEFAULT_PRICING.read_text(encoding="utf-8"))
    for model in prices["models"].values():
        model["priority_surcharge"] = {"input_per_1k": "0.001", "output_per_1k": "0.001"}
    path = out_dir / "priority-pricing.yaml"
    write_atomic(path, yaml.safe_dump(prices, sort_keys=False).encode("utf-8"))
    return path


def create_key(ledger: Path) -> str:
    import json

    out = serving_cli(["keys", "create", "--user", "benchmark", "--name", "load", "--json"],
                      {"TOKENMETER_LEDGER": str(ledger.resolve())}, ROOT)
    return json.loads(out)["key"]


# --- load -------------------------------------------------------------------------------------
@dataclass
class Driven:
    """A started server and how the stage drives it: its headers, whether its /metrics has the
    batch histogram, and the request records so far (phase, concurrency, record)."""

    name: str
    server: ServerProcess
    headers: Dict[str, str]
    scrape: bool
    records: List[Tuple[str, int, Record]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url + "/v1/analyze"

    def histogram(self) -> Dict[str, float]:
        return batch_histogram(http_get(self.server.port, "/metrics")[1]) if self.scrape else {}


def one_round(d: Driven, bodies: Sequence[bytes], per_body: int, c: int, duration_s: float,
              max_requests: int, b: Benchmark, load: LoadFn
              ) -> Tuple[LoadResult, Optional[float], float]:
    """One timed run of the load: its result, the server's and this client's CPU seconds."""
    cpu0, client0 = cpu_seconds(d.server.pid or 0), time.process_time()
    res = load(d.url, bodies, [per_body] * len(bodies), c, duration_s, max_requests, d.headers,
               b.request_timeout_s)
    cpu1, client1 = cpu_seconds(d.server.pid or 0), time.process_time()
    return res, (cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None), \
        client1 - client0


def merged(results: Sequence[LoadResult]) -> LoadResult:
    """Several runs at one concurrency as one: records end to end, durations summed."""
    out = LoadResult(concurrency=results[0].concurrency, duration_s=0.0)
    for res in results:
        out.records += [replace(r, start_s=r.start_s + out.duration_s) for r in res.records]
        out.duration_s += res.duration_s
    return out


ROUND_FIGURES = ("req_per_s", "p50_ms", "p99_ms", "ok")  # kept per round of a level


def level_row(d: Driven, runs: Sequence[Tuple[LoadResult, Optional[float], float]],
              per_body: int, before: Dict[str, float]) -> Tuple[Dict[str, object], LoadResult]:
    """One level's summary over its rounds (server and client CPU, batch sizes; each round's
    req/s and p50 when there are several) and its merged result."""
    res = merged([r for r, _, _ in runs])
    row: Dict[str, object] = dict(summarize(res))
    row["texts_per_request"] = per_body
    # Where the 2 cores went: cores busy in the server and in this (client) process.
    cpu = [s for _, s, _ in runs]
    row["server_cores"] = round(sum(x for x in cpu if x is not None) / res.duration_s, 3) \
        if None not in cpu else None
    row["client_cores"] = round(sum(x for _, _, x in runs) / res.duration_s, 3)
    if d.scrape:  # only this server's own model calls: the other one has its own /metrics
        row["batches"] = batch_distribution(before, d.histogram())
    if len(runs) > 1:
        row["rounds"] = [{k: v for k, v in summarize(r).items() if k in ROUND_FIGURES}
                         for r, _, _ in runs]
    row["error_kinds"] = sorted({r.error for r in res.records if r.status != 200})[:5]
    print(f"benchmark: {d.name} c={res.concurrency} x{per_body} text(s): {row['req_per_s']} "
          f"req/s, p50 {row['p50_ms']} ms, errors {row['error_rate']:.1%}", flush=True)
    return row, res


def warm(d: Driven, bodies: Sequence[bytes], b: Benchmark, load: LoadFn) -> None:
    """At the top concurrency, so the model's shapes are warm before anything is timed (steady
    state is what we report)."""
    if b.warmup_requests:
        res = load(d.url, bodies, [1] * len(bodies), min(max(b.concurrency), b.warmup_requests),
                   b.request_timeout_s * 2, b.warmup_requests, d.headers, b.request_timeout_s)
        d.records += [("warmup", res.concurrency, r) for r in res.records]


def drive(servers: Sequence[Driven], bodies: Sequence[bytes], b: Benchmark,
          load: LoadFn = run_load, rounds: int = 1) -> Dict[str, List[Dict[str, object]]]:
    """Each concurrency level of one-text requests on every server, levels by name.

    With several servers and rounds the servers take turns at each level, `rounds` runs of
    duration_s / rounds each, the order reversed every round: the metered and unmetered
    endpoints then meet the same machine (its other tenants, its disk's writeback) and their
    paired figures compare metering rather than the minute each ran in."""
    for d in servers:
        warm(d, bodies, b, load)
    levels: Dict[str, List[Dict[str, object]]] = {d.name: [] for d in servers}
    for c in b.concurrency:
        before = {d.name: d.histogram() for d in servers}
        runs: Dict[str, list] = {d.name: [] for d in servers}
        for r in range(rounds):
            for d in (servers if r % 2 == 0 else list(reversed(servers))):
                runs[d.name].append(one_round(d, bodies, 1, c, b.duration_s / rounds,
                                              max(1, b.max_requests // rounds), b, load))
        for d in servers:
            row, res = level_row(d, runs[d.name], 1, before[d.name])
            levels[d.name].append(row)
            d.records += [("measure", c, rec) for rec in res.records]
    return levels


def drive_batches(d: Driven, batched: Sequence[bytes], b: Benchmark, load: LoadFn
                  ) -> List[Dict[str, object]]:
    """Each level of the batch client (`batch_texts` texts per request)."""
    rows = []
    for c in b.batch_concurrency:
        before = d.histogram()
        row, res = level_row(d, [one_round(d, batched, b.batch_texts, c, b.duration_s,
                                           b.max_requests, b, load)], b.batch_texts, before)
        rows.append(row)
        d.records += [(f"batch{b.batch_texts}", c, rec) for rec in res.records]
    return rows


def measure_server(server: ServerProcess, bodies: Sequence[bytes], b: Benchmark,
                   headers: Dict[str, str], scrape: bool, load: LoadFn = run_load,
                   batched: Sequence[bytes] = ()) -> Dict[str, object]:
    """Start `server`, drive it alone, and stop it (process group included) whatever
    happens."""
    return measure_servers([Driven(server.name, server, headers, scrape)], bodies, b, load,
                           1, batched)[server.name]


def measure_servers(servers: Sequence[Driven], bodies: Sequence[bytes], b: Benchmark,
                    load: LoadFn = run_load, rounds: int = 1, batched: Sequence[bytes] = ()
                    ) -> Dict[str, Dict[str, object]]:
    """Start the servers (all up at once), drive them (`drive`; the batch client on the first),
    and stop every one of them whatever happens."""
    with ExitStack() as stack:
        for d in servers:
            stack.enter_context(d.server)
        levels = drive(servers, bodies, b, load, rounds)
        batch_levels = drive_batches(servers[0], batched, b, load) if batched else []
    out: Dict[str, Dict[str, object]] = {}
    for d in servers:
        out[d.name] = {"pid": d.server.pid, "port": d.server.port, "levels": levels[d.name],
                       "records": d.records}
    if batch_levels:
        out[servers[0].name]["batch_levels"] = batch_levels
    return out


def measure_priority(model_dir: Path, b: Benchmark, out_dir: Path, bodies: Sequence[bytes],
                     load: LoadFn) -> Dict[str, object]:
    """The priority tier under load: one metered endpoint, `headline_concurrency` standard
    clients and `priority_concurrency` priority clients driving it at the same time for
    duration_s. Both latencies come from the one run; their ratio is the figure."""
    ledger = out_dir / "priority-ledger.sqlite3"
    fresh_ledger(ledger)
    auth = {"Authorization": f"Bearer {create_key(ledger)}"}
    server = endpoint("priority", model_dir, ledger, b, True, out_dir, with_priority(out_dir))
    clients = {"standard": (b.headline_concurrency, auth),
               "priority": (b.priority_concurrency, {**auth, "Tokenmeter-Priority": "high"})}
    results: Dict[str, LoadResult] = {}
    failures: List[BaseException] = []

    def drive_one(name: str) -> None:
        c, headers = clients[name]
        try:
            results[name] = load(server.url + "/v1/analyze", bodies, [1] * len(bodies), c,
                                 b.duration_s, b.max_requests, headers, b.request_timeout_s)
        except BaseException as exc:  # re-raised on the stage's thread below
            failures.append(exc)

    warmed = 0
    with server:
        if b.warmup_requests:
            warmed = len(load(server.url + "/v1/analyze", bodies, [1] * len(bodies),
                              b.headline_concurrency, b.request_timeout_s * 2,
                              b.warmup_requests, auth, b.request_timeout_s).ok)
        threads = [threading.Thread(target=drive_one, args=(n,)) for n in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        pid, port = server.pid, server.port
    if failures:
        raise failures[0]
    rows = {name: {**summarize(res), "concurrency": clients[name][0]}
            for name, res in results.items()}
    for name, row in rows.items():
        print(f"benchmark: priority endpoint, {name} c={row['concurrency']}: p50 "
              f"{row['p50_ms']} ms, p99 {row['p99_ms']} ms", flush=True)
    with sqlite3.connect(str(ledger)) as conn:
        tiers = dict(conn.execute("SELECT price_tier, COUNT(*) FROM billing_events"
                                  " GROUP BY price_tier").fetchall())
    return {"pid": pid, "port": port, **rows, "warmup_ok": warmed, "billed_by_tier": tiers}


def ledger_totals(path: Path) -> Dict[str, int]:
    with sqlite3.connect(str(path)) as conn:
        r = conn.execute("SELECT COUNT(*), COALESCE(SUM(input_tokens), 0),"
                         " COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost_micro), 0)"
                         " FROM billing_events").fetchone()
    return {"rows": int(r[0]), "input_tokens": int(r[1]), "output_tokens": int(r[2]),
            "cost_micro": int(r[3])}


# --- the stage --------------------------------------------------------------------------------
def benchmark(model_dir: Path, b: Benchmark, out_dir: Path,
              load: LoadFn = run_load) -> dict:
    """Every measurement of the stage; returns the report (no metrics files, no MLflow)."""
    import tensorflow as tf

    from serving.tokenization import encode, load_tokenizer

    ceiling.check(model_dir)  # a missing or corrupt model is one line, before anything starts
    card = read_card(model_dir)
    max_tokens = int(card["max_input_tokens"])
    texts = sample_texts(b)
    tok = load_tokenizer(model_dir / TOKENIZER_FILE, max_tokens)
    ids = encode(tok, texts)
    label_tokens = {k: len(tok.encode(v, add_special_tokens=False).ids)
                    for k, v in read_labels(model_dir).items()}
    print(f"benchmark: {len(texts)} test texts, mean {sum(map(len, ids)) / len(ids):.1f} "
          f"input tokens; model-only ceiling...", flush=True)
    grid = ceiling.shape_grid(model_dir, b.ceiling_modes, b.ceiling_batch_sizes,
                              b.ceiling_lengths, b.ceiling_seconds, b.seed)
    policy = ceiling.batch_policy(model_dir, b.execution, ids[: b.ceiling_texts],
                                  b.ceiling_batch_sizes, label_tokens)

    # The stages before this one (and DVC caching their outputs) leave megabytes of dirty
    # pages; their writeback slowed the metered server's fsyncs (the first server measured)
    # by ~1 ms a request. Flush them before any server is timed.
    os.sync()
    bodies = request_bodies(texts)
    ledger = out_dir / "ledger.sqlite3"
    fresh_ledger(ledger)
    key = create_key(ledger)
    servers: Dict[str, dict] = {}
    batched = batch_bodies(texts, b.batch_texts) if b.batch_texts else []
    driven = [Driven("endpoint", endpoint("endpoint", model_dir, ledger, b, True, out_dir),
                     {"Authorization": f"Bearer {key}"}, True)]
    if b.metering_off:
        scratch = out_dir / "unmetered-ledger.sqlite3"
        fresh_ledger(scratch)
        driven.append(Driven("unmetered", endpoint("unmetered", model_dir, scratch, b, False,
                                                   out_dir), {}, True))
    # Metered and unmetered take turns at each level (see `drive`): metering's cost is the
    # median of their paired rounds.
    servers.update(measure_servers(driven, bodies, b, load,
                                   b.metering_rounds if b.metering_off else 1, batched))
    if b.metering_off:
        servers["unmetered"]["ledger_rows"] = ledger_totals(scratch)["rows"]
    if b.naive:
        servers["naive"] = measure_server(naive(model_dir, b, out_dir), bodies, b,
                                          {"X-User-ID": "benchmark"}, False, load)
    priority = measure_priority(model_dir, b, out_dir, bodies, load) \
        if b.priority_concurrency else None

    # After the servers: thousands of fsyncs (and a PostgreSQL checkpoint) leave the disk busy
    # for seconds, which showed as +80% on the next server's p50 at concurrency 1.
    pg = b.ledger_pg_dsn or os.environ.get("TOKENMETER_TEST_PG_DSN")
    capacity = {"sqlite": ledger_capacity.sqlite(out_dir, b.ledger_events, b.ledger_inflight,
                                                 b.ledger_seconds),
                "postgresql": ledger_capacity.postgresql(pg, b.ledger_events,
                                                         b.ledger_inflight, b.ledger_seconds)}
    billed = ledger_totals(ledger)
    ok = [r for _, _, r in servers["endpoint"]["records"] if r.status == 200]
    servers["endpoint"]["ledger"] = {
        **billed, "client_200s": len(ok), "client_tokens": sum(r.tokens for r in ok),
        "matches": billed["rows"] == len(ok)
        and billed["input_tokens"] + billed["output_tokens"] == sum(r.tokens for r in ok)}
    total_tokens = billed["input_tokens"] + billed["output_tokens"]
    # Revenue per 1K tokens actually billed (the pricing file's input/output prices, blended
    # by this load's mix), from the ledger's exact micro-USD.
    revenue_per_1k = billed["cost_micro"] / 1e6 / total_tokens * 1000 if total_tokens else 0.0
    measured_tps = number(best(servers["endpoint"]["levels"], "tokens_per_s")["tokens_per_s"])
    from serving.pricing import price_for
    from serving.settings import DEFAULT_PRICING

    price = price_for(DEFAULT_PRICING, card["name"])
    return {
        "model": {"name": card["name"], "version": str(card["version"]),
                  "dir": str(model_dir), "max_input_tokens": max_tokens,
                  "execution": b.execution, "tensorflow": tf.__version__},
        "texts": {"sampled": len(texts), "mean_input_tokens":
                  round(sum(map(len, ids)) / len(ids), 3)},
        "ceiling": {"grid": grid, "policy": policy},
        "ledger_capacity": capacity,
        "ledger_backend": "sqlite" + ("+postgresql" if "events_per_s" in capacity["postgresql"]
                                      else ""),
        "servers": {k: {kk: vv for kk, vv in v.items() if kk != "records"}
                    for k, v in servers.items()},
        "cost": {"price_file": {"input_per_1k_usd": str(price.input_per_1k),
                                "output_per_1k_usd": str(price.output_per_1k)},
                 "revenue_per_1k_usd": round(revenue_per_1k, 9),
                 "measured_tokens_per_s": measured_tps,
                 "hardware": cost_table(b.hardware, measured_tps, revenue_per_1k)},
        "ratios": ratios(b, grid, policy, servers, priority),
        **({"priority": priority} if priority else {}),
        "_records": servers,
    }


def main() -> None:
    b = load(Benchmark)
    e = load(Export)
    model_dir = paths.model_dir(e.name, e.version)
    require(model_dir / "saved_model.pb", paths.split_file("test"),
            hint="run `dvc repro` (export and prepare write them)")
    paths.BENCHMARK_DIR.mkdir(parents=True, exist_ok=True)
    report = benchmark(model_dir, b, paths.BENCHMARK_DIR)
    servers = report.pop("_records")
    write_atomic(paths.BENCHMARK_REQUESTS, requests_csv(servers))
    write_atomic(paths.BENCHMARK_LOAD_CSV, load_csv(b, servers))
    measured = next((h for h in b.hardware if h.measured), None)
    costs = cost_csv(report["ceiling"]["policy"], measured, report["cost"]["revenue_per_1k_usd"])
    write_atomic(paths.BENCHMARK_COST_CSV, costs)
    plots = draw_plots(b, servers, costs, report["ceiling"]["policy"])
    write_json(paths.metrics_file("benchmark"), report)
    report["mlflow_run_id"] = log_mlflow(
        b, report, [paths.BENCHMARK_REQUESTS, paths.BENCHMARK_LOAD_CSV, paths.BENCHMARK_COST_CSV,
                    paths.metrics_file("benchmark"), *plots])
    write_json(paths.metrics_file("benchmark"), report)
    print(table(report))
