"""The `benchmark` stage on the smoke model: it starts and stops real servers cleanly (also when
the load fails), every figure it logs is present and consistent with the others, and the ledger
after the load holds exactly the billed answers the load generator counted. No timing asserts:
performance is what the stage measures, not what tests check."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from pipeline import benchmark, paths
from pipeline.errors import PipelineError
from pipeline.loadgen import run_load
from pipeline.params import Benchmark, load
from pipeline.servers import port_is_free
from tests.conftest import run_stage

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


def test_every_load_figure_is_present_and_consistent(bench):
    _, _, report = bench
    b = report["servers"]
    for name, s in b.items():
        assert [lv["concurrency"] for lv in s["levels"]] == [1, 4], name
        for lv in s["levels"]:
            for key in ("req_per_s", "tokens_per_s", "p50_ms", "p95_ms", "p99_ms",
                        "error_rate", "mean_tokens_per_request", "duration_s"):
                assert lv[key] is not None, (name, key)
            assert lv["ok"] > 0 and lv["ok"] + lv["errors"] == lv["requests"]
            # tokens/s = req/s x mean tokens per request, within the rounding of each figure.
            assert lv["tokens_per_s"] == pytest.approx(
                lv["req_per_s"] * lv["mean_tokens_per_request"], rel=1e-4, abs=0.05)
            assert lv["req_per_s"] == pytest.approx(lv["ok"] / lv["duration_s"], rel=1e-3)
            assert lv["p50_ms"] <= lv["p95_ms"] <= lv["p99_ms"]
        if name != "naive":  # batch sizes come from the endpoint's own /metrics
            for lv in s["levels"]:
                batches = lv["batches"]
                assert sum(batches["calls_by_size"].values()) == batches["model_calls"] > 0
                assert batches["rows"] == lv["requests"]  # one text per request


def test_cost_figures_follow_from_price_and_throughput(bench):
    _, _, report = bench
    cost = report["cost"]
    best_tps = max(lv["tokens_per_s"] for lv in report["servers"]["endpoint"]["levels"])
    assert cost["measured_tokens_per_s"] == best_tps
    ledger = report["servers"]["endpoint"]["ledger"]
    revenue = ledger["cost_micro"] / 1e6 / (ledger["input_tokens"] + ledger["output_tokens"]) \
        * 1000
    assert cost["revenue_per_1k_usd"] == pytest.approx(revenue, rel=1e-6)
    measured = [h for h in cost["hardware"] if h["source"] == "measured"]
    assert len(measured) == 1 and len(cost["hardware"]) >= 2
    for h in cost["hardware"]:
        assert h["break_even_tokens_per_s"] == pytest.approx(
            h["usd_per_hour"] / 3600 / (revenue / 1000), rel=1e-3)
        if h["tokens_per_s"]:
            # cost per 1K tokens = price per hour / tokens per hour x 1000
            assert h["cost_per_1k_usd"] == pytest.approx(
                h["usd_per_hour"] / (h["tokens_per_s"] * 3600) * 1000, rel=1e-4, abs=1e-9)
            assert h["margin_per_1k_usd"] == pytest.approx(revenue - h["cost_per_1k_usd"],
                                                           abs=1e-8)
            assert h["break_even_utilisation"] == pytest.approx(
                h["cost_per_1k_usd"] / revenue, rel=1e-3, abs=1e-6)
        else:
            assert "cost_per_1k_usd" not in h
    ratios = report["ratios"]
    for key in ("endpoint_vs_naive_req_s", "served_vs_ceiling", "metering_overhead_p50_pct",
                "fastest_mode", "xla_vs_graph_median"):
        assert ratios[key] is not None, key
    assert {g["mode"] for g in report["ceiling"]["grid"]} == {"eager", "graph", "xla"}
    assert report["ledger_capacity"]["sqlite"]["events"] == \
        report["ledger_capacity"]["sqlite"]["rows_on_disk"] > 0
    assert "not_run" in report["ledger_capacity"]["postgresql"]


def test_ledger_holds_exactly_the_billed_answers_the_load_counted(bench):
    ws, _, report = bench
    with open(ws / paths.BENCHMARK_REQUESTS, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    ok = [r for r in rows if r["server"] == "endpoint" and r["status"] == "200"]
    assert ok
    with sqlite3.connect(ws / paths.BENCHMARK_LEDGER) as conn:
        n, tokens = conn.execute("SELECT COUNT(*), SUM(input_tokens + output_tokens)"
                                 " FROM billing_events").fetchone()
    assert n == len(ok)
    assert tokens == sum(int(r["tokens"]) for r in ok)
    assert report["servers"]["endpoint"]["ledger"]["matches"] is True
    assert report["servers"]["unmetered"]["ledger_rows"] == 0  # metering off bills nothing


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

    server = benchmark.endpoint("endpoint", smoke_ws / "models" / "sentiment" / "1",
                                tmp_path / "ledger.sqlite3", b, True, tmp_path)
    bodies = benchmark.request_bodies(["好评", "质量很差"])
    with pytest.raises(RuntimeError, match="on purpose"):
        benchmark.measure_server(server, bodies, b, {"Authorization": "Bearer tm_x"}, True,
                                 failing_load)
    assert len(calls) == 2
    assert server.proc is not None and server.proc.poll() is not None
    assert port_is_free(server.port)


def test_a_server_that_cannot_start_is_one_line_and_leaves_nothing(smoke_ws, tmp_path):
    b = _params(smoke_ws)
    server = benchmark.endpoint("endpoint", tmp_path / "no-model", tmp_path / "l.sqlite3", b,
                                True, tmp_path)
    with pytest.raises(PipelineError, match="exited with 2 before it was ready"):
        benchmark.measure_server(server, [b"{}"], b, {}, True)
    assert server.proc is not None and server.proc.poll() is not None
    assert port_is_free(server.port)


def test_a_corrupt_model_stops_the_stage_with_one_line(ws_copy):
    (ws_copy / "models" / "sentiment" / "1" / "model_card.json").write_text("{", encoding="utf-8")
    result = run_stage(ws_copy, "benchmark")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: benchmark: model directory") and "corrupt" in lines[-1]
    assert "Traceback" not in result.stderr


def test_ledger_capacity_on_postgresql_or_a_reason_why_not():
    from pipeline import ledger_capacity

    assert "not_run" in ledger_capacity.postgresql(None, 10, 4, 1)
    dsn = os.environ.get("TOKENMETER_TEST_PG_DSN")
    if not dsn:
        pytest.skip("TOKENMETER_TEST_PG_DSN is not set: no PostgreSQL server "
                    "(scripts/test starts one with scripts/postgres.sh)")
    cap = ledger_capacity.postgresql(dsn, 200, 16, 2)
    assert "not_run" not in cap, cap
    assert cap["backend"] == "postgresql" and cap["events"] == cap["rows_on_disk"] > 0
