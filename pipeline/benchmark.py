"""Stage `benchmark`: what serving a token costs, measured. Model-only ceiling, the metered endpoint
started for real (subprocess on 127.0.0.1, fresh ledger, keys from the CLI) under closed-loop load
at several concurrencies, the same endpoint unmetered, the brief's naive Flask design, and the
ledger alone; then cost per 1K tokens from hourly hardware prices against the pricing file.

Writes metrics/benchmark.json, metrics/benchmark_{load,cost}.csv (DVC plots), plots/benchmark_*.png,
build/benchmark/ (per-request CSV, the ledger, server logs) and one MLflow run in `token-cost`.
"""

from __future__ import annotations

import csv
import io
import os
import re
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, SupportsFloat, Tuple

from pipeline import ceiling, ledger_capacity, paths
from pipeline.errors import fail, require, run_stage
from pipeline.io import read_jsonl, write_atomic, write_json
from pipeline.loadgen import LoadResult, Record, run_load, summarize
from pipeline.params import Benchmark, Export, Hardware, load
from pipeline.servers import (
    HOST,
    ServerProcess,
    cpu_seconds,
    free_port,
    http_get,
    serving_cli,
)
from serving.model_dir import TOKENIZER_FILE, read_card, read_labels

ROOT = Path(__file__).resolve().parent.parent
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


# --- servers ----------------------------------------------------------------------------------
def endpoint(name: str, model_dir: Path, ledger: Path, b: Benchmark, metering: bool,
             out_dir: Path) -> ServerProcess:
    port = free_port()
    env = {"TOKENMETER_MODEL_DIR": str(model_dir.resolve()),
           "TOKENMETER_LEDGER": str(ledger.resolve()),
           "TOKENMETER_HOST": HOST, "TOKENMETER_PORT": str(port),
           "TOKENMETER_EXECUTION": b.execution, "TOKENMETER_MAX_BATCH": str(b.max_batch),
           "TOKENMETER_MAX_WAIT_MS": str(b.max_wait_ms),
           "TOKENMETER_MAX_BODY_BYTES": str(1024 * 1024)}
    if not metering:
        env.update({"TOKENMETER_METERING": "off", "TOKENMETER_ALLOW_UNMETERED": "1"})
    return ServerProcess(name, [sys.executable, "-m", "serving", "serve"], env, ROOT,
                         out_dir / f"{name}.log", port, "/readyz", b.server_start_timeout_s)


def naive(model_dir: Path, b: Benchmark, out_dir: Path) -> ServerProcess:
    port = free_port()
    return ServerProcess("naive", [sys.executable, "-m", "pipeline.naive_baseline",
                                   str(model_dir.resolve()), str(port)], {}, ROOT,
                         out_dir / "naive.log", port, "/healthz", b.server_start_timeout_s)


def fresh_ledger(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)


def create_key(ledger: Path) -> str:
    import json

    out = serving_cli(["keys", "create", "--user", "benchmark", "--name", "load", "--json"],
                      {"TOKENMETER_LEDGER": str(ledger.resolve())}, ROOT)
    return json.loads(out)["key"]


def batch_histogram(metrics_text: str) -> Dict[str, float]:
    """Cumulative `tokenmeter_batch_size` buckets (le -> count), plus `sum` and `count`."""
    from prometheus_client.parser import text_string_to_metric_families

    out: Dict[str, float] = {}
    for fam in text_string_to_metric_families(metrics_text):
        for s in fam.samples:
            if s.name == "tokenmeter_batch_size_bucket":
                out[s.labels["le"]] = s.value
            elif s.name == "tokenmeter_batch_size_sum":
                out["sum"] = s.value
            elif s.name == "tokenmeter_batch_size_count":
                out["count"] = s.value
    return out


def batch_distribution(before: Dict[str, float], after: Dict[str, float]) -> Dict[str, object]:
    """Model calls by batch size (per histogram bucket, not cumulative) between two scrapes."""
    les = [k for k in after if k not in ("sum", "count")]
    les.sort(key=lambda k: float("inf") if k == "+Inf" else float(k))
    calls, prev = {}, 0.0
    for le in les:
        cum = after[le] - before.get(le, 0.0)
        calls["le_inf" if le == "+Inf" else f"le_{float(le):g}"] = int(cum - prev)
        prev = cum
    n = after.get("count", 0.0) - before.get("count", 0.0)
    rows = after.get("sum", 0.0) - before.get("sum", 0.0)
    return {"model_calls": int(n), "rows": int(rows),
            "mean_batch_size": round(rows / n, 3) if n else 0.0, "calls_by_size": calls}


def drive(server: ServerProcess, bodies: Sequence[bytes], b: Benchmark,
          headers: Dict[str, str], scrape: bool, load: LoadFn = run_load
          ) -> Tuple[List[Dict[str, object]], List[Tuple[str, int, Record]]]:
    """Warm-up, then each concurrency level; per-level summary and every request record."""
    url = server.url + "/v1/analyze"
    ntexts = [1] * len(bodies)
    records: List[Tuple[str, int, Record]] = []
    if b.warmup_requests:
        # At the top concurrency, so the batch shapes the levels will see are traced first
        # (each new shape costs the runner ~0.1-0.5 s once; steady state is what we report).
        warm = load(url, bodies, ntexts, min(max(b.concurrency), b.warmup_requests),
                    b.request_timeout_s * 2, b.warmup_requests, headers, b.request_timeout_s)
        records += [("warmup", warm.concurrency, r) for r in warm.records]
    levels = []
    for c in b.concurrency:
        before = batch_histogram(http_get(server.port, "/metrics")[1]) if scrape else {}
        cpu0, client0 = cpu_seconds(server.pid or 0), time.process_time()
        res = load(url, bodies, ntexts, c, b.duration_s, b.max_requests, headers,
                   b.request_timeout_s)
        cpu1, client1 = cpu_seconds(server.pid or 0), time.process_time()
        row: Dict[str, object] = dict(summarize(res))
        # Where the 2 cores went: cores busy in the server and in this (client) process.
        row["server_cores"] = round((cpu1 - cpu0) / res.duration_s, 3) \
            if cpu0 is not None and cpu1 is not None else None
        row["client_cores"] = round((client1 - client0) / res.duration_s, 3)
        if scrape:
            row["batches"] = batch_distribution(
                before, batch_histogram(http_get(server.port, "/metrics")[1]))
        errors = sorted({r.error for r in res.records if r.status != 200})
        row["error_kinds"] = errors[:5]
        levels.append(row)
        records += [("measure", c, r) for r in res.records]
        print(f"benchmark: {server.name} c={c}: {row['req_per_s']} req/s, p50 {row['p50_ms']} "
              f"ms, errors {row['error_rate']:.1%}", flush=True)
    return levels, records


def measure_server(server: ServerProcess, bodies: Sequence[bytes], b: Benchmark,
                   headers: Dict[str, str], scrape: bool, load: LoadFn = run_load
                   ) -> Dict[str, object]:
    """Start `server`, drive it, and stop it (process group included) whatever happens."""
    with server:
        levels, records = drive(server, bodies, b, headers, scrape, load)
    return {"pid": server.pid, "port": server.port, "levels": levels, "records": records}


def ledger_totals(path: Path) -> Dict[str, int]:
    with sqlite3.connect(str(path)) as conn:
        r = conn.execute("SELECT COUNT(*), COALESCE(SUM(input_tokens), 0),"
                         " COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost_micro), 0)"
                         " FROM billing_events").fetchone()
    return {"rows": int(r[0]), "input_tokens": int(r[1]), "output_tokens": int(r[2]),
            "cost_micro": int(r[3])}


# --- figures ----------------------------------------------------------------------------------
def cost_table(hardware: Sequence[Hardware], measured_tokens_per_s: float,
               revenue_per_1k: float) -> List[Dict[str, object]]:
    """Per machine: cost per 1K tokens = price/h / tokens/h x 1000, margin and break-even."""
    out = []
    for h in hardware:
        tps = measured_tokens_per_s if h.measured else h.assumed_tokens_per_s
        row: Dict[str, object] = {
            "name": h.name, "usd_per_hour": h.usd_per_hour,
            "tokens_per_s": tps, "source": "measured" if h.measured else
            ("assumed" if tps else "not measured"),
            # Tokens/s needed for the price per 1K to pay for the machine.
            "break_even_tokens_per_s": round(h.usd_per_hour / 3600 / (revenue_per_1k / 1000), 3)
            if revenue_per_1k else None}
        if tps:
            cost = h.usd_per_hour / (tps * 3600) * 1000
            row.update({"tokens_per_hour": round(tps * 3600, 1),
                        "cost_per_1k_usd": round(cost, 9),
                        "margin_per_1k_usd": round(revenue_per_1k - cost, 9),
                        # Share of the measured capacity that must be sold to cover the price.
                        "break_even_utilisation": round(cost / revenue_per_1k, 6)
                        if revenue_per_1k else None})
        out.append(row)
    return out


def number(value: object) -> float:
    """float() of a numeric field of a level row (a Dict[str, object]); TypeError otherwise."""
    if isinstance(value, SupportsFloat):  # int, float, numpy scalars; not None, not a list
        return float(value)
    raise TypeError(f"expected a number, got {type(value).__name__}: {value!r}")


def best(levels: Sequence[Dict[str, object]], key: str) -> Dict[str, object]:
    return max(levels, key=lambda r: number(r[key] or 0))


def at(levels: Sequence[Dict[str, object]], c: int) -> Optional[Dict[str, object]]:
    return next((r for r in levels if r["concurrency"] == c), None)


def ratios(b: Benchmark, grid: List[dict], policy: List[dict],
           servers: Dict[str, dict]) -> Dict[str, object]:
    top = max(b.concurrency)
    out: Dict[str, object] = {"at_concurrency": top}
    ep = at(servers["endpoint"]["levels"], top)
    if ep is None:  # measure() runs every level of b.concurrency
        raise ValueError(f"no endpoint level at concurrency {top}")
    if "naive" in servers:
        nv = at(servers["naive"]["levels"], top)
        out["endpoint_vs_naive_req_s"] = round(number(ep["req_per_s"]) / number(nv["req_per_s"]),
                                               2) if nv and nv["req_per_s"] else None
    fits = [p for p in policy if p["batch_size"] <= b.max_batch] or policy
    ceil = max(fits, key=lambda p: p["batch_size"])
    out["ceiling_batch_size"] = ceil["batch_size"]
    out["served_vs_ceiling"] = round(number(ep["req_per_s"]) / float(ceil["texts_per_s"]), 4)
    if "unmetered" in servers:
        over = {}
        for on in servers["endpoint"]["levels"]:
            off = at(servers["unmetered"]["levels"], int(number(on["concurrency"])))
            if off and off["p50_ms"] and on["p50_ms"]:
                over[f"c{on['concurrency']}"] = round(
                    (number(on["p50_ms"]) - number(off["p50_ms"])) / number(off["p50_ms"]) * 100,
                    2)
        out["metering_overhead_p50_pct"] = over
    speed: Dict[str, List[float]] = {}
    for row in grid:
        speed.setdefault(row["mode"], []).append(float(row["rows_per_s"]))
    medians = {m: round(statistics.median(v), 3) for m, v in speed.items()}
    out["ceiling_median_rows_per_s"] = medians
    out["fastest_mode"] = max(medians, key=lambda m: medians[m]) if medians else None
    if "xla" in speed and "graph" in speed:
        out["xla_vs_graph_median"] = round(statistics.median(
            x / g for x, g in zip(speed["xla"], speed["graph"])), 3)
    return out


# --- outputs ----------------------------------------------------------------------------------
def requests_csv(servers: Dict[str, dict]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["server", "phase", "concurrency", "worker", "start_s", "latency_ms", "status",
                "texts", "tokens", "error"])
    for name, s in servers.items():
        for phase, c, r in s["records"]:
            w.writerow([name, phase, c, r.worker, f"{r.start_s:.6f}",
                        f"{r.latency_s * 1000:.3f}", r.status, r.texts, r.tokens, r.error])
    return buf.getvalue().encode()


def load_csv(b: Benchmark, servers: Dict[str, dict]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = ["req_per_s", "tokens_per_s", "p50_ms", "p95_ms", "p99_ms", "error_rate"]
    w.writerow(["concurrency"] + [f"{s}_{c}" for s in servers for c in cols])
    for c in b.concurrency:
        row: List[object] = [c]
        for s in servers.values():
            lvl = at(s["levels"], c) or {}
            row += [lvl.get(k, "") for k in cols]
        w.writerow(row)
    return buf.getvalue().encode()


def cost_csv(policy: List[dict], hw: Optional[Hardware], revenue_per_1k: float) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["batch_size", "texts_per_s", "tokens_per_s", "cost_per_1k_usd",
                "price_per_1k_usd"])
    for p in policy:
        cost = hw.usd_per_hour / (float(p["tokens_per_s"]) * 3600) * 1000 if hw else ""
        w.writerow([p["batch_size"], p["texts_per_s"], p["tokens_per_s"],
                    f"{cost:.9f}" if hw else "", f"{revenue_per_1k:.6f}"])
    return buf.getvalue().encode()


def draw_plots(b: Benchmark, servers: Dict[str, dict], cost_rows: bytes) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths.PLOTS_DIR.mkdir(parents=True, exist_ok=True)
    out = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in servers.items():
        xs = [r["concurrency"] for r in s["levels"]]
        for q, style in (("p50_ms", "-o"), ("p99_ms", ":x")):
            ax.plot(xs, [r[q] or float("nan") for r in s["levels"]], style,
                    label=f"{name} {q[:3]}")
    ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="latency (ms)",
           title="Latency vs concurrency")
    ax.legend(fontsize=7)
    out.append(_save(fig, paths.benchmark_plot("latency")))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in servers.items():
        ax.plot([r["concurrency"] for r in s["levels"]], [r["req_per_s"] for r in s["levels"]],
                "-o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="answered req/s (200)",
           title="Throughput vs concurrency")
    ax.legend(fontsize=7)
    out.append(_save(fig, paths.benchmark_plot("throughput")))
    rows = list(csv.DictReader(io.StringIO(cost_rows.decode())))
    fig, ax = plt.subplots(figsize=(6, 4))
    if rows and rows[0]["cost_per_1k_usd"]:
        ax.plot([int(r["batch_size"]) for r in rows], [float(r["cost_per_1k_usd"]) for r in rows],
                "-o", label="model-only cost on this CPU")
        ax.axhline(float(rows[0]["price_per_1k_usd"]), color="gray", ls="--",
                   label="price (billed per 1K tokens)")
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="USD per 1K tokens",
           title="Cost per 1K tokens vs batch size")
    ax.legend(fontsize=7)
    out.append(_save(fig, paths.benchmark_plot("cost")))
    return out


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def log_mlflow(b: Benchmark, report: dict, artifacts: Sequence[Path]) -> str:
    import mlflow

    from pipeline.tracking import flatten, start_run

    with start_run(b.experiment, f"benchmark-{report['model']['name']}-"
                                 f"v{report['model']['version']}") as run:
        mlflow.log_params({
            "model": report["model"]["name"], "model_version": report["model"]["version"],
            "execution": b.execution, "batch_policy": f"max_batch={b.max_batch},"
                                                      f"max_wait_ms={b.max_wait_ms}",
            "concurrency": str(b.concurrency), "duration_s": b.duration_s,
            "texts": report["texts"]["sampled"], "backend": report["ledger_backend"],
            "hardware": "; ".join(f"{h.name}=${h.usd_per_hour}/h" for h in b.hardware),
            "tensorflow": report["model"]["tensorflow"], "cpus": os.cpu_count()})
        flat = flatten("", {k: report[k] for k in ("ratios", "ledger_capacity", "cost")})
        for name, s in report["servers"].items():
            for lvl in s["levels"]:
                flat.update(flatten(f"{name}.c{lvl['concurrency']}",
                                    {k: v for k, v in lvl.items() if k != "error_kinds"}))
        for p in report["ceiling"]["policy"]:
            flat[f"ceiling.policy.b{p['batch_size']}.tokens_per_s"] = p["tokens_per_s"]
        for g in report["ceiling"]["grid"]:
            flat[f"ceiling.{g['mode']}.b{g['batch_size']}.l{g['length']}.rows_per_s"] = \
                g["rows_per_s"]
        mlflow.log_metrics({re.sub(r"[^A-Za-z0-9_.:/ -]", "_", k)[:250]: float(v)
                            for k, v in flat.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for a in artifacts:
            mlflow.log_artifact(str(a))
        return run.info.run_id


def table(report: dict) -> str:
    lines = [f"{'server':<10} {'conc':>4} {'req/s':>9} {'tokens/s':>10} {'p50 ms':>8} "
             f"{'p95 ms':>8} {'p99 ms':>8} {'err':>6} {'batch':>6} {'srv cpu':>7} "
             f"{'cli cpu':>7}"]
    for name, s in report["servers"].items():
        for r in s["levels"]:
            batch = r.get("batches", {}).get("mean_batch_size", "")
            lines.append(f"{name:<10} {r['concurrency']:>4} {r['req_per_s']:>9} "
                         f"{r['tokens_per_s']:>10} {r['p50_ms'] or '-':>8} "
                         f"{r['p95_ms'] or '-':>8} {r['p99_ms'] or '-':>8} "
                         f"{r['error_rate']:>6.1%} {batch:>6} {r['server_cores'] or '-':>7} "
                         f"{r['client_cores']:>7}")
    ra = report["ratios"]
    lines.append(f"ratios at c={ra['at_concurrency']}: endpoint/naive "
                 f"{ra.get('endpoint_vs_naive_req_s')}x, served/ceiling "
                 f"{ra['served_vs_ceiling']:.0%} (b={ra['ceiling_batch_size']}), metering "
                 f"overhead p50 {ra.get('metering_overhead_p50_pct')}%, fastest mode "
                 f"{ra['fastest_mode']}, xla/graph {ra.get('xla_vs_graph_median')}")
    for kind, cap in report["ledger_capacity"].items():
        lines.append(f"ledger {kind}: " + (f"{cap['events_per_s']} billed rows/s durable, "
                                           f"one commit alone {cap['single_commit_p50_ms']} ms,"
                                           f" key lookup {cap['key_lookup_p50_ms']} ms"
                                           if "events_per_s" in cap else str(cap["not_run"])))
    for h in report["cost"]["hardware"]:
        lines.append(f"cost {h['name']}: " + (
            f"${h['cost_per_1k_usd']:.3g}/1K tokens at {h['tokens_per_s']} tokens/s "
            f"({h['source']}), margin ${h['margin_per_1k_usd']:.6f}/1K, break-even "
            f"utilisation {h['break_even_utilisation']:.3%}" if h.get("cost_per_1k_usd")
            else f"{h['source']}; break-even at {h['break_even_tokens_per_s']} tokens/s"))
    return "\n".join(lines)


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

    pg = b.ledger_pg_dsn or os.environ.get("TOKENMETER_TEST_PG_DSN")
    capacity = {"sqlite": ledger_capacity.sqlite(out_dir, b.ledger_events, b.ledger_inflight,
                                                 b.ledger_seconds),
                "postgresql": ledger_capacity.postgresql(pg, b.ledger_events,
                                                         b.ledger_inflight, b.ledger_seconds)}

    bodies = request_bodies(texts)
    ledger = out_dir / "ledger.sqlite3"
    fresh_ledger(ledger)
    key = create_key(ledger)
    servers: Dict[str, dict] = {}
    servers["endpoint"] = measure_server(endpoint("endpoint", model_dir, ledger, b, True, out_dir),
                                         bodies, b, {"Authorization": f"Bearer {key}"}, True,
                                         load)
    if b.metering_off:
        scratch = out_dir / "unmetered-ledger.sqlite3"
        fresh_ledger(scratch)
        servers["unmetered"] = measure_server(
            endpoint("unmetered", model_dir, scratch, b, False, out_dir), bodies, b, {}, True,
            load)
        servers["unmetered"]["ledger_rows"] = ledger_totals(scratch)["rows"]
    if b.naive:
        servers["naive"] = measure_server(naive(model_dir, b, out_dir), bodies, b,
                                          {"X-User-ID": "benchmark"}, False, load)

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
        "ratios": ratios(b, grid, policy, servers),
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
    plots = draw_plots(b, servers, costs)
    write_json(paths.metrics_file("benchmark"), report)
    report["mlflow_run_id"] = log_mlflow(
        b, report, [paths.BENCHMARK_REQUESTS, paths.BENCHMARK_LOAD_CSV, paths.BENCHMARK_COST_CSV,
                    paths.metrics_file("benchmark"), *plots])
    write_json(paths.metrics_file("benchmark"), report)
    print(table(report))


if __name__ == "__main__":
    run_stage("benchmark", main)
