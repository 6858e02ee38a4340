"""The benchmark's outputs: the report turned into CSVs (per request, per level, cost per batch
size), PNG plots, the MLflow run in `token-cost` and the summary table printed at the end.

Measures nothing and starts no process; the figures come ready in the report (`figures`), the
only arithmetic here is the cost CSV's per-row cost. CSVs are returned as bytes for the stage
to write; plots go where paths.py says; MLflow gets the artifacts the stage names.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from pipeline import paths
from pipeline.benchmark.figures import at
from pipeline.params import Benchmark, Hardware


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


def draw_plots(b: Benchmark, servers: Dict[str, dict], cost_rows: bytes,
               policy: Sequence[Dict[str, object]] = ()) -> List[Path]:
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
    batch = servers.get("endpoint", {}).get("batch_levels") or []
    if batch:
        ax.plot([r["concurrency"] for r in batch], [r["texts_per_s"] for r in batch], "s",
                label=f"endpoint, {b.batch_texts} texts/request (texts/s)")
    fits = [p for p in policy if int(str(p["batch_size"])) <= b.max_batch]
    if fits:
        top = max(fits, key=lambda p: int(str(p["batch_size"])))
        ax.axhline(float(str(top["texts_per_s"])), color="gray", ls="--",
                   label=f"model-only ceiling, batch {top['batch_size']} (texts/s)")
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
            "metering_rounds": b.metering_rounds, "texts": report["texts"]["sampled"],
            "backend": report["ledger_backend"],
            "hardware": "; ".join(f"{h.name}=${h.usd_per_hour}/h" for h in b.hardware),
            "tensorflow": report["model"]["tensorflow"], "cpus": os.cpu_count()})
        flat = flatten("", {k: report[k] for k in ("ratios", "ledger_capacity", "cost")})
        for client in ("standard", "priority") if "priority" in report else ():
            flat.update(flatten(f"priority_endpoint.{client}",
                                {k: v for k, v in report["priority"][client].items()
                                 if k != "error_kinds"}))
        for name, s in report["servers"].items():
            for lvl in s["levels"]:
                flat.update(flatten(f"{name}.c{lvl['concurrency']}",
                                    {k: v for k, v in lvl.items() if k != "error_kinds"}))
            for lvl in s.get("batch_levels", []):
                flat.update(flatten(f"{name}.texts{lvl['texts_per_request']}.c"
                                    f"{lvl['concurrency']}",
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
    for name, s in report["servers"].items():
        for r in s.get("batch_levels", []):
            lines.append(f"{name} with {r['texts_per_request']} texts per request, "
                         f"c={r['concurrency']}: {r['texts_per_s']} texts/s, "
                         f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms")
    ra = report["ratios"]
    lines.append(f"ratios at c={ra['at_concurrency']}: endpoint/naive "
                 f"{ra.get('endpoint_vs_naive_req_s')}x, served/ceiling "
                 f"{ra['served_vs_ceiling']:.0%} (b={ra['ceiling_batch_size']}; "
                 f"{ra.get('served_vs_ceiling_at_formed_batch')} at the formed "
                 f"{ra.get('formed_rows_per_call')} rows/call), p99/p50 "
                 f"{ra.get('p99_over_p50')}, metering overhead (median of the paired rounds)"
                 f" p50 {ra.get('metering_overhead_p50_pct')}% and req/s "
                 f"{ra.get('metering_overhead_req_s_pct')}%, fastest mode "
                 f"{ra['fastest_mode']}, xla/graph {ra.get('xla_vs_graph_median')}")
    if "priority" in report:
        pr = report["priority"]
        lines.append(f"priority tier: {pr['priority']['concurrency']} priority clients beside "
                     f"{pr['standard']['concurrency']} standard ones: p50 "
                     f"{pr['priority']['p50_ms']} vs {pr['standard']['p50_ms']} ms "
                     f"({ra.get('priority_p50_vs_standard')}x), p99 "
                     f"{pr['priority']['p99_ms']} vs {pr['standard']['p99_ms']} ms "
                     f"({ra.get('priority_p99_vs_standard')}x)")
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
