"""`python -m pipeline.benchmark.scale`: the metered endpoint with 1, 2, 3... replicas behind
HAProxy (deploy/haproxy/haproxy.cfg, its ports and servers rewritten: `cluster`), all billing to
one ledger, driven through the balancer by the benchmark's closed-loop load generator at one
concurrency for a fixed time. Per replica count: answered req/s, p50/p99, the error rate, each
replica's share of the billed requests (its /metrics before and after) and where the cores went;
then req/s of N replicas over 1 replica, measured in the same run.

A command, not a DVC stage: it needs Debian's `haproxy` and, for the ledger the replicas would
share in production, a PostgreSQL server (--pg-dsn; else params.yaml's benchmark.ledger_pg_dsn,
else $TOKENMETER_TEST_PG_DSN; a scratch database is made on that server for the run and dropped
after it). With none (or `--pg-dsn ''`) the replicas share one SQLite file instead: every commit
takes that file's single write lock, so N processes queue for it (busy timeout 5 s) and the
figures measure that contention as much as the replicas.

Each replica count bills to its own user (`scale-rN`) with one key without limits; the billed
rows of that user must equal the 200s the client counted (warm-up included), which the report
checks. Writes metrics/scale.json, plots/scale.png and build/scale/ (server and haproxy logs,
configs, the SQLite ledger), and one MLflow run (`scale-<model>-v<version>`) in the benchmark's
experiment. Every process it starts is stopped whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sqlite3
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

from pipeline import paths
from pipeline.benchmark.cluster import Cluster, haproxy_binary
from pipeline.benchmark.ledger_capacity import remove_sqlite
from pipeline.benchmark.loadgen import LoadResult, run_load, summarize
from pipeline.benchmark.process import (
    HOST,
    ProcessError,
    ServerProcess,
    cpu_seconds,
    free_port,
    http_get,
    serving_cli,
)
from pipeline.benchmark.scratch_db import sibling_dsn
from pipeline.benchmark.stage import request_bodies
from pipeline.errors import fail, require, run_stage
from pipeline.io import read_jsonl, write_json
from pipeline.params import PARAMS_FILE, Benchmark, Export, load

ROOT = Path(__file__).resolve().parents[2]
OUT_DIR = Path("build/scale")
METRICS = paths.metrics_file("scale")
PLOT = paths.PLOTS_DIR / "scale.png"
PG_ENV = "TOKENMETER_TEST_PG_DSN"  # the benchmark stage's fallback too (ledger capacity)
SQLITE_NOTE = ("one SQLite file shared by every replica: each commit takes its single write "
               "lock, so the replicas queue for it; these figures include that contention")


# --- inputs -----------------------------------------------------------------------------------
def replica_counts(text: str) -> List[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"--replicas {text!r}: comma-separated whole numbers, e.g. 1,2,3")
    if not counts or any(n < 1 for n in counts) or len(set(counts)) != len(counts):
        fail(f"--replicas {text!r}: distinct numbers >= 1, e.g. 1,2,3")
    return counts


def params() -> "tuple[Benchmark, Export]":
    """params.yaml's benchmark and export sections where there is one; else their defaults."""
    if PARAMS_FILE.exists():
        return load(Benchmark), load(Export)
    return Benchmark.model_validate({}), Export.model_validate({})


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pipeline.benchmark.scale",
                                 description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--replicas", default="1,2,3", help="replica counts (default 1,2,3)")
    ap.add_argument("--concurrency", type=int, default=32,
                    help="closed-loop clients through the balancer (default 32)")
    ap.add_argument("--duration", type=float, default=10.0,
                    help="seconds of load per replica count (default 10)")
    ap.add_argument("--warmup", type=int, default=100,
                    help="untimed requests per replica before each measurement (default 100)")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="exported model (default models/<export.name>/<export.version>)")
    ap.add_argument("--texts", type=Path, default=None,
                    help="JSONL with a `text` per line (default data/prepared/test.jsonl)")
    ap.add_argument("--pg-dsn", default=None,
                    help="PostgreSQL server for the shared ledger (a scratch database is made "
                         f"on it); default benchmark.ledger_pg_dsn, else ${PG_ENV}; '' for "
                         "one shared SQLite file")
    ap.add_argument("--keep-ledger", action="store_true",
                    help="keep the scratch PostgreSQL database (its name is in the report)")
    ap.add_argument("--no-mlflow", action="store_true", help="do not log an MLflow run")
    args = ap.parse_args(argv)
    if args.concurrency < 1 or args.duration <= 0 or args.warmup < 0:
        fail("--concurrency must be >= 1, --duration > 0 and --warmup >= 0")
    return args


def sample_texts(path: Path, n: int, seed: int) -> List[str]:
    import numpy as np

    texts = [str(r["text"]) for r in read_jsonl(path) if r.get("text")]
    if not texts:
        fail(f"{path} has no `text` lines")
    picks = np.random.default_rng(seed).choice(len(texts), size=min(n, len(texts)),
                                                replace=False)
    return [texts[i] for i in picks]


# --- the ledger -------------------------------------------------------------------------------
@contextmanager
def pg_ledger(server_dsn: str, keep: bool) -> Iterator["tuple[str, str]"]:
    """A new database `tm_scale_<hex>` next to `server_dsn`'s: (its DSN, its name); dropped on
    leaving unless `keep`."""
    import psycopg
    from psycopg import sql

    name = "tm_scale_" + secrets.token_hex(6)
    try:
        with psycopg.connect(server_dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        fail(f"PostgreSQL at the given DSN: {str(exc).strip().splitlines()[0]}")
    try:
        yield sibling_dsn(server_dsn, name), name
    finally:
        if not keep:
            with psycopg.connect(server_dsn, autocommit=True, connect_timeout=10) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                             .format(sql.Identifier(name)))


def billed_rows(ledger: str, user: str) -> Dict[str, int]:
    """Billing rows of `user` in the ledger, per instance id."""
    query = "SELECT instance_id, COUNT(*) FROM billing_events WHERE user_id = {} GROUP BY 1"
    if ledger.startswith("postgresql://"):
        import psycopg

        with psycopg.connect(ledger) as conn:
            rows = conn.execute(query.format("%s"), (user,)).fetchall()
    else:
        with sqlite3.connect(ledger) as c:
            rows = c.execute(query.format("?"), (user,)).fetchall()
    return {str(i): int(n) for i, n in rows}


def create_key(ledger: str, user: str) -> str:
    out = serving_cli(["keys", "create", "--user", user, "--name", "scale", "--json"],
                      {"TOKENMETER_LEDGER": ledger}, ROOT)
    return str(json.loads(out)["key"])


# --- one replica count ------------------------------------------------------------------------
def replica(name: str, model_dir: Path, ledger: str, b: Benchmark, out_dir: Path
            ) -> ServerProcess:
    port = free_port()
    env = {"TOKENMETER_MODEL_DIR": str(model_dir.resolve()), "TOKENMETER_LEDGER": ledger,
           "TOKENMETER_HOST": HOST, "TOKENMETER_PORT": str(port),
           "TOKENMETER_EXECUTION": b.execution, "TOKENMETER_MAX_BATCH": str(b.max_batch),
           "TOKENMETER_MAX_WAIT_MS": str(b.max_wait_ms),
           "TOKENMETER_MAX_BODY_BYTES": str(1024 * 1024)}
    return ServerProcess(name, [sys.executable, "-m", "serving", "serve"], env, ROOT,
                         out_dir / f"{name}.log", port, "/readyz", b.server_start_timeout_s)


def scrape(port: int) -> Dict[str, Any]:
    from serving.metrics import parse_billing_totals

    return parse_billing_totals(http_get(port, "/metrics")[1])


def _cores(before: Optional[float], after: Optional[float], seconds: float) -> Optional[float]:
    return round((after - before) / seconds, 3) if before is not None and after is not None \
        else None


def measure(n: int, model_dir: Path, ledger: str, bodies: Sequence[bytes], args, b: Benchmark,
            out_dir: Path) -> Dict[str, Any]:
    """Start `n` replicas behind HAProxy, warm them up, drive the balancer; stop everything."""
    user = f"scale-r{n}"
    headers = {"Authorization": f"Bearer {create_key(ledger, user)}"}
    work = out_dir / f"r{n}"
    replicas = [replica(f"r{n}-{i + 1}", model_dir, ledger, b, work) for i in range(n)]
    cluster = Cluster(replicas, work, b.server_start_timeout_s)
    url = cluster.url + "/v1/analyze"
    os.sync()  # the previous count's fsyncs and logs: not on this count's clock
    try:
        cluster.start()
    except ProcessError as exc:
        fail(f"{n} replica(s): {exc}: {exc.last_line()} (log: {exc.log_path})")
    try:
        warm: Optional[LoadResult] = None
        if args.warmup:
            warm = run_load(url, bodies, [1] * len(bodies), min(args.concurrency,
                            args.warmup * n), b.request_timeout_s * 4, args.warmup * n,
                            headers, b.request_timeout_s)
        before = [scrape(r.port) for r in replicas]
        procs = [*replicas, cluster.balancer]
        cpu0 = [cpu_seconds(p.pid or 0) for p in procs]
        client0 = time.process_time()
        res = run_load(url, bodies, [1] * len(bodies), args.concurrency, args.duration,
                       b.max_requests, headers, b.request_timeout_s)
        client1 = time.process_time()
        cpu1 = [cpu_seconds(p.pid or 0) for p in procs]
        after = [scrape(r.port) for r in replicas]
        pids = [r.pid for r in replicas]
    finally:
        cluster.stop()
    row: Dict[str, Any] = {"replicas": n, **summarize(res)}
    row["error_kinds"] = sorted({r.error for r in res.records if r.status != 200})[:5]
    served = [int(a["requests"]) - int(z["requests"]) for z, a in zip(before, after)]
    row["per_replica"] = [
        {"name": r.name, "pid": pid, "instance_id": a["instance_id"], "served": s,
         "share": round(s / sum(served), 4) if sum(served) else None,
         "cores": _cores(cpu0[i], cpu1[i], res.duration_s)}
        for i, (r, pid, a, s) in enumerate(zip(replicas, pids, after, served))]
    row["balancer_cores"] = _cores(cpu0[-1], cpu1[-1], res.duration_s)
    row["client_cores"] = round((client1 - client0) / res.duration_s, 3)
    warm_ok = len(warm.ok) if warm else 0
    row["warmup"] = {"requests": len(warm.records) if warm else 0, "ok": warm_ok}
    rows = billed_rows(ledger, user)
    row["ledger"] = {"user": user, "rows": sum(rows.values()), "client_ok": warm_ok + len(res.ok),
                     "matches": sum(rows.values()) == warm_ok + len(res.ok),
                     "instances": len(rows)}
    print(f"scale: {n} replica(s), c={args.concurrency}: {row['req_per_s']} req/s, p50 "
          f"{row['p50_ms']} ms, p99 {row['p99_ms']} ms, errors {row['error_rate']:.1%}, "
          f"shares {[p['share'] for p in row['per_replica']]}", flush=True)
    return row


# --- figures and outputs ----------------------------------------------------------------------
def ratios(levels: Sequence[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    """req/s and p50 of each count over those of 1 replica (of the same run)."""
    base = next((lv for lv in levels if lv["replicas"] == 1), None)
    out: Dict[str, Optional[float]] = {}
    for lv in levels:
        if base is None or lv is base:
            continue
        n = lv["replicas"]
        r0, r1 = base["req_per_s"], lv["req_per_s"]
        out[f"req_per_s_{n}_vs_1"] = round(r1 / r0, 3) if r0 else None
        p0, p1 = base["p50_ms"], lv["p50_ms"]
        out[f"p50_{n}_vs_1"] = round(p1 / p0, 3) if p0 and p1 is not None else None
    return out


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = report["levels"]
    xs = [lv["replicas"] for lv in levels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    left.plot(xs, [lv["req_per_s"] for lv in levels], "-o")
    left.set(xlabel="replicas", ylabel="answered req/s (200)", xticks=xs, ylim=(0, None),
             title=f"Throughput, c={report['settings']['concurrency']}")
    for q, style in (("p50_ms", "-o"), ("p99_ms", ":x")):
        right.plot(xs, [lv[q] if lv[q] is not None else float("nan") for lv in levels], style,
                   label=q[:3])
    right.set(xlabel="replicas", ylabel="latency (ms)", xticks=xs, ylim=(0, None),
              title="Latency through HAProxy")
    right.legend(fontsize=8)
    fig.suptitle(f"{report['machine']['cpus']} CPUs, ledger {report['ledger']['backend']}",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_mlflow(experiment: str, report: dict, artifacts: Sequence[Path]) -> str:
    import mlflow

    from pipeline.tracking import start_run

    m = report["model"]
    with start_run(experiment, f"scale-{m['name']}-v{m['version']}") as run:
        mlflow.log_params({"model": m["name"], "model_version": m["version"],
                           "replicas": ",".join(str(lv["replicas"]) for lv in report["levels"]),
                           **{k: v for k, v in report["settings"].items()},
                           "backend": report["ledger"]["backend"],
                           "cpus": report["machine"]["cpus"]})
        metrics: Dict[str, float] = {}
        for lv in report["levels"]:
            for k in ("req_per_s", "p50_ms", "p99_ms", "error_rate", "balancer_cores",
                      "client_cores"):
                if isinstance(lv[k], (int, float)):
                    metrics[f"r{lv['replicas']}.{k}"] = float(lv[k])
        metrics.update({f"ratio.{k}": float(v) for k, v in report["ratios"].items()
                        if v is not None})
        mlflow.log_metrics(metrics)
        for a in artifacts:
            mlflow.log_artifact(str(a))
        return str(run.info.run_id)


def table(report: dict) -> str:
    lines = [f"{'replicas':>8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'err':>6} "
             f"{'shares':<22} {'haproxy':>7} {'client':>6}"]
    for lv in report["levels"]:
        shares = "/".join(f"{p['share']:.2f}" if p["share"] is not None else "-"
                          for p in lv["per_replica"])
        lines.append(f"{lv['replicas']:>8} {lv['req_per_s']:>9} {lv['p50_ms'] or '-':>8} "
                     f"{lv['p99_ms'] or '-':>8} {lv['error_rate']:>6.1%} {shares:<22} "
                     f"{lv['balancer_cores'] or '-':>7} {lv['client_cores']:>6}")
    lines.append("ratios: " + ", ".join(f"{k} {v}x" for k, v in report["ratios"].items()))
    return "\n".join(lines)


# --- the command ------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    counts = replica_counts(args.replicas)
    haproxy_binary()  # a missing haproxy is one line, before anything starts
    b, e = params()
    model_dir = args.model_dir or paths.model_dir(e.name, e.version)
    texts_file = args.texts or paths.split_file("test")
    require(model_dir / "saved_model.pb", hint="pass --model-dir, or run `dvc repro`")
    require(texts_file, hint="pass --texts FILE.jsonl, or run `dvc repro` (prepare writes it)")
    from serving.model_dir import read_card

    card = read_card(model_dir)
    bodies = request_bodies(sample_texts(texts_file, b.texts, b.seed))
    server = (b.ledger_pg_dsn or os.environ.get(PG_ENV)) if args.pg_dsn is None else args.pg_dsn
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    load_before = os.getloadavg()
    levels: List[Dict[str, Any]] = []
    ledger_info: Dict[str, object]
    if server:
        with pg_ledger(server, args.keep_ledger) as (dsn, name):
            ledger_info = {"backend": "postgresql", "database": name, "kept": args.keep_ledger}
            for n in counts:
                levels.append(measure(n, model_dir, dsn, bodies, args, b, OUT_DIR))
    else:
        path = OUT_DIR / "ledger.sqlite3"
        remove_sqlite(path)
        ledger_info = {"backend": "sqlite", "path": str(path), "note": SQLITE_NOTE}
        for n in counts:
            levels.append(measure(n, model_dir, str(path.resolve()), bodies, args, b, OUT_DIR))
    report: Dict[str, Any] = {
        "model": {"name": card["name"], "version": str(card["version"]), "dir": str(model_dir)},
        "started_at": started,
        "machine": {"cpus": os.cpu_count(), "loadavg_1m_before": round(load_before[0], 2),
                    "loadavg_1m_after": round(os.getloadavg()[0], 2),
                    "note": "the load generator, HAProxy, the ledger and every replica share "
                            "these CPUs"},
        "settings": {"concurrency": args.concurrency, "duration_s": args.duration,
                     "warmup_requests_per_replica": args.warmup, "texts": len(bodies),
                     "execution": b.execution, "max_batch": b.max_batch,
                     "max_wait_ms": b.max_wait_ms},
        "ledger": ledger_info,
        "levels": levels,
        "ratios": ratios(levels),
    }
    write_json(METRICS, report)
    png = plot(report, PLOT)
    if not args.no_mlflow:
        report["mlflow_run_id"] = log_mlflow(b.experiment, report, [METRICS, png])
        write_json(METRICS, report)
    print(table(report))
    bad = [lv["replicas"] for lv in levels if not lv["ledger"]["matches"]]
    if bad:
        fail(f"billed rows differ from the 200s the client counted at {bad} replica(s); "
             f"see {METRICS}")


if __name__ == "__main__":
    run_stage("scale", main)
