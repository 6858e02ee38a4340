"""The `benchmark` stage on the smoke model: it starts and stops real servers cleanly (also when
the load fails), every figure it logs is present and agrees with the request records it wrote
and with the pricing file, and the ledger after the load holds exactly the billed answers the
load generator counted. No timing asserts: performance is what the stage measures, not what
tests check. (The cost arithmetic is checked on hand-worked figures in test_benchmark_units.)"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from pipeline import paths
from pipeline.benchmark import stage
from pipeline.benchmark.loadgen import run_load
from pipeline.benchmark.process import port_is_free
from pipeline.errors import PipelineError
from pipeline.params import Benchmark, load
from tests.conftest import ROOT, run_stage
from tests.serving.conftest import PG_ENV, PG_MISSING

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bench(smoke_ws, tmp_path_factory):
    """A copy of the smoke workspace after `python -m pipeline.benchmark` (the DVC stage's cmd)."""
    ws = tmp_path_factory.mktemp("bench") / "ws"
    shutil.copytree(smoke_ws, ws, symlinks=True)
    result = run_stage(ws, "benchmark", env={"TOKENMETER_TEST_PG_DSN": ""})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((ws / paths.metrics_file("benchmark")).read_text(encoding="utf-8"))
    return ws, result, report


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    return False


def test_stage_stops_every_server_it_started(bench):
    _, result, report = bench
    assert set(report["servers"]) == {"endpoint", "unmetered", "naive"}
    for name, s in report["servers"].items():
        assert _gone(s["pid"]), f"{name} server (pid {s['pid']}) is still running"
        assert port_is_free(s["port"]), f"{name} server's port {s['port']} is still bound"
    assert "server" in result.stdout and "ratios at c=" in result.stdout  # the summary table


def _records(ws: Path):
    with open(ws / paths.BENCHMARK_REQUESTS, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_every_load_figure_is_present_and_agrees_with_the_request_records(bench):
    ws, _, report = bench
    records = _records(ws)
    b = report["servers"]
    for name, s in b.items():
        assert [lv["concurrency"] for lv in s["levels"]] == [1, 4], name
        for lv in s["levels"]:
            for key in ("req_per_s", "tokens_per_s", "p50_ms", "p95_ms", "p99_ms",
                        "error_rate", "mean_tokens_per_request", "duration_s"):
                assert lv[key] is not None, (name, key)
            # The counts are those of the requests written to requests.csv for this level.
            mine = [r for r in records if r["server"] == name and r["phase"] == "measure"
                    and int(r["concurrency"]) == lv["concurrency"]]
            ok = [r for r in mine if r["status"] == "200"]
            assert lv["requests"] == len(mine) and lv["ok"] == len(ok) > 0, (name, lv)
            assert lv["ok"] + lv["errors"] == lv["requests"]
            assert lv["tokens"] == sum(int(r["tokens"]) for r in ok)
            # Every 200 carried tokens; the mean lies between the smallest and largest.
            tokens = [int(r["tokens"]) for r in ok]
            assert min(tokens) > 0
            assert min(tokens) <= lv["mean_tokens_per_request"] <= max(tokens)
            # Percentiles are of the 200s' latencies (3 decimals in the CSV), and ordered.
            ms = [float(r["latency_ms"]) for r in ok]
            assert min(ms) - 0.01 <= lv["p50_ms"] <= lv["p95_ms"] <= lv["p99_ms"] \
                <= max(ms) + 0.01
            # Closed loop: no more requests in flight at once than the level's connections.
            assert len({r["worker"] for r in mine}) <= lv["concurrency"]
        if name != "naive":  # batch sizes come from the endpoint's own /metrics
            rounds = load(Benchmark, ws / "params.yaml").metering_rounds
            for lv in s["levels"]:
                # Metered and unmetered took turns: each level is its rounds' requests.
                assert len(lv["rounds"]) == rounds > 1
                assert sum(r["ok"] for r in lv["rounds"]) == lv["ok"]
                batches = lv["batches"]
                assert sum(batches["calls_by_size"].values()) == batches["model_calls"] > 0
                assert batches["rows"] == lv["requests"]  # one text per request


def test_the_batch_client_sends_its_texts_per_request_and_they_reach_the_model(bench):
    ws, _, report = bench
    b = load(Benchmark, ws / "params.yaml")
    [lv] = report["servers"]["endpoint"]["batch_levels"]
    assert (lv["concurrency"], lv["texts_per_request"]) == (b.batch_concurrency[0], b.batch_texts)
    mine = [r for r in _records(ws) if r["server"] == "endpoint"
            and r["phase"] == f"batch{b.batch_texts}"]
    assert len(mine) == lv["requests"] > 0
    assert {int(r["texts"]) for r in mine} == {b.batch_texts}
    # The server's own histogram counted every text of every request as a model row.
    assert lv["batches"]["rows"] == b.batch_texts * lv["requests"]
    assert lv["texts_per_s"] > lv["req_per_s"]
    ratios = report["ratios"]
    assert ratios["batch_client"]["texts_per_s"] == lv["texts_per_s"]
    head = [x for x in report["servers"]["endpoint"]["levels"]
            if x["concurrency"] == b.headline_concurrency][0]
    assert ratios["at_concurrency"] == b.headline_concurrency
    assert ratios["formed_rows_per_call"] == head["batches"]["mean_batch_size"]
    assert ratios["p99_over_p50"] >= 1


def test_cost_figures_agree_with_the_pricing_file_and_the_load(bench):
    _, _, report = bench
    cost = report["cost"]
    best_tps = max(lv["tokens_per_s"] for lv in report["servers"]["endpoint"]["levels"])
    assert cost["measured_tokens_per_s"] == best_tps
    # Revenue per 1K billed tokens lies between the file's input and output prices (both
    # $0.002/1K for the smoke model: exactly that, as every token costs 2 micro-USD).
    prices = yaml.safe_load((ROOT / "serving" / "pricing.yaml").read_text())
    p = prices["models"][report["model"]["name"]]
    lo, hi = sorted([Decimal(p["input_per_1k"]), Decimal(p["output_per_1k"])])
    assert cost["price_file"] == {"input_per_1k_usd": p["input_per_1k"],
                                  "output_per_1k_usd": p["output_per_1k"]}
    assert float(lo) - 1e-9 <= cost["revenue_per_1k_usd"] <= float(hi) + 1e-9
    ledger = report["servers"]["endpoint"]["ledger"]
    if lo == hi:
        assert cost["revenue_per_1k_usd"] == pytest.approx(float(lo), abs=1e-9)
        assert ledger["cost_micro"] == \
            (ledger["input_tokens"] + ledger["output_tokens"]) * lo * 1000
    hardware = {h["name"]: h for h in cost["hardware"]}
    measured = [h for h in cost["hardware"] if h["source"] == "measured"]
    assert len(measured) == 1 and len(cost["hardware"]) >= 2
    assert measured[0]["tokens_per_s"] == best_tps
    for h in hardware.values():
        if h["tokens_per_s"]:
            # Two figures computed separately must agree: the share of this throughput to
            # sell, times the throughput, is the break-even throughput (each is rounded: the
            # share to 6 places, the throughput to 3).
            assert h["break_even_utilisation"] * h["tokens_per_s"] == pytest.approx(
                h["break_even_tokens_per_s"], abs=h["tokens_per_s"] * 1e-6 + 2e-3)
            assert (h["margin_per_1k_usd"] > 0) == (h["break_even_utilisation"] < 1)
        else:
            assert "cost_per_1k_usd" not in h
    ratios = report["ratios"]
    for key in ("endpoint_vs_naive_req_s", "served_vs_ceiling", "metering_overhead_p50_pct",
                "fastest_mode", "xla_vs_graph_median"):
        assert ratios[key] is not None, key
    rounds = len(report["servers"]["endpoint"]["levels"][0]["rounds"])
    assert len(ratios["metering_overhead_req_s_pct_rounds"]) == rounds
    assert {len(v) for v in ratios["metering_overhead_p50_pct_rounds"].values()} == {rounds}
    assert {g["mode"] for g in report["ceiling"]["grid"]} == {"eager", "graph", "xla"}
    assert report["ledger_capacity"]["sqlite"]["events"] == \
        report["ledger_capacity"]["sqlite"]["rows_on_disk"] > 0
    assert "not_run" in report["ledger_capacity"]["postgresql"]


def test_ledger_holds_exactly_the_billed_answers_the_load_counted(bench):
    ws, _, report = bench
    rows = _records(ws)
    ok = [r for r in rows if r["server"] == "endpoint" and r["status"] == "200"]
    assert ok
    with sqlite3.connect(ws / paths.BENCHMARK_LEDGER) as conn:
        n, tokens = conn.execute("SELECT COUNT(*), SUM(input_tokens + output_tokens)"
                                 " FROM billing_events").fetchone()
    assert n == len(ok)
    assert tokens == sum(int(r["tokens"]) for r in ok)
    assert report["servers"]["endpoint"]["ledger"]["matches"] is True
    assert report["servers"]["unmetered"]["ledger_rows"] == 0  # metering off bills nothing


def test_priority_clients_run_beside_standard_ones_and_are_billed_at_their_tier(bench):
    ws, result, report = bench
    b = _params(ws)
    pr = report["priority"]
    assert _gone(pr["pid"]) and port_is_free(pr["port"])
    assert (pr["standard"]["concurrency"], pr["priority"]["concurrency"]) == \
        (b.headline_concurrency, b.priority_concurrency)
    for client in ("standard", "priority"):
        assert pr[client]["ok"] > 0 and pr[client]["p50_ms"] > 0, client
    # Every answer either client counted is in that endpoint's ledger at its own tier (the
    # warm-up's standard ones too), and nothing else is.
    assert pr["billed_by_tier"] == {
        "standard": pr["warmup_ok"] + pr["standard"]["ok"],
        "standard+priority": pr["priority"]["ok"]}
    assert report["ratios"]["priority_p50_vs_standard"] > 0
    assert "priority tier: " in result.stdout  # the summary table's line


def test_outputs_and_mlflow_run(bench):
    ws, _, report = bench
    for p in (paths.BENCHMARK_LOAD_CSV, paths.BENCHMARK_COST_CSV,
              *(paths.benchmark_plot(n) for n in ("latency", "throughput", "cost"))):
        assert (ws / p).stat().st_size > 0, p
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.get_experiment_by_name("token-cost")
    assert exp is not None
    run = client.get_run(report["mlflow_run_id"])
    assert run.info.experiment_id == exp.experiment_id
    assert run.data.params["execution"] == "graph" and run.data.params["concurrency"] == "[1, 4]"
    assert "ratios.served_vs_ceiling" in run.data.metrics
    assert "endpoint.c4.tokens_per_s" in run.data.metrics
    assert {"ratios.priority_p50_vs_standard", "priority_endpoint.priority.p50_ms",
            "priority_endpoint.standard.p50_ms"} <= set(run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"requests.csv", "benchmark_latency.png", "benchmark_throughput.png",
            "benchmark_cost.png"} <= names


def _params(ws: Path) -> Benchmark:
    return load(Benchmark, ws / "params.yaml")


def test_a_failing_load_still_stops_the_endpoint(smoke_ws, tmp_path):
    b = _params(smoke_ws)
    calls = []

    def failing_load(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:  # the warm-up really runs; the first measured level fails
            raise RuntimeError("load generator failed on purpose")
        return run_load(*args, **kwargs)

    server = stage.endpoint("endpoint", smoke_ws / "models" / "sentiment" / "1",
                            tmp_path / "ledger.sqlite3", b, True, tmp_path)
    bodies = stage.request_bodies(["好评", "质量很差"])
    with pytest.raises(RuntimeError, match="on purpose"):
        stage.measure_server(server, bodies, b, {"Authorization": "Bearer tm_x"}, True,
                             failing_load)
    assert len(calls) == 2
    assert server.proc is not None and server.proc.poll() is not None
    assert port_is_free(server.port)


def test_a_server_that_cannot_start_is_one_line_and_leaves_nothing(smoke_ws, tmp_path):
    b = _params(smoke_ws)
    server = stage.endpoint("endpoint", tmp_path / "no-model", tmp_path / "l.sqlite3", b,
                            True, tmp_path)
    with pytest.raises(PipelineError, match="exited with 2 before it was ready"):
        stage.measure_server(server, [b"{}"], b, {}, True)
    assert server.proc is not None and server.proc.poll() is not None
    assert port_is_free(server.port)


def test_a_corrupt_model_stops_the_stage_with_one_line(ws_copy):
    (ws_copy / "models" / "sentiment" / "1" / "model_card.json").write_text("{", encoding="utf-8")
    result = run_stage(ws_copy, "benchmark")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: benchmark: model directory") and "corrupt" in lines[-1]
    assert "Traceback" not in result.stderr


def test_ledger_capacity_without_postgresql_says_why_not():
    from pipeline.benchmark import ledger_capacity

    assert "not_run" in ledger_capacity.postgresql(None, 10, 4, 1)


@pytest.mark.postgres
@pytest.mark.skipif(not os.environ.get(PG_ENV), reason=PG_MISSING)  # for runs of this file alone
def test_ledger_capacity_on_postgresql():
    from pipeline.benchmark import ledger_capacity

    cap = ledger_capacity.postgresql(os.environ[PG_ENV], 200, 16, 2)
    assert "not_run" not in cap, cap
    assert cap["backend"] == "postgresql" and cap["events"] == cap["rows_on_disk"] > 0
