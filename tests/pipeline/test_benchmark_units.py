"""Fast checks of the benchmark's pure parts: the load generator against a tiny loopback server
(bounded count, keep-alive and closed connections, errors counted), two servers taking turns
level by level, the batch-size histogram difference, metering's cost from paired rounds, and
the cost arithmetic, each against figures worked out by hand. No model, no TensorFlow."""

from __future__ import annotations

import asyncio
import json
import threading
from types import SimpleNamespace

import pytest

from pipeline.benchmark.figures import batch_distribution, ceiling_at, cost_table, ratios
from pipeline.benchmark.loadgen import percentile, run_load, summarize
from pipeline.benchmark.process import HOST, free_port
from pipeline.benchmark.stage import Driven, drive
from pipeline.params import Benchmark, Hardware


class TinyServer:
    """HTTP/1.1 on 127.0.0.1: every 5th request gets 500 and every 7th closes the connection."""

    def __init__(self):
        self.port = free_port()
        self.seen = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, HOST, self.port))
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int([ln.split(b":")[1] for ln in head.split(b"\r\n")
                              if ln.lower().startswith(b"content-length")][0])
                await reader.readexactly(length)
                self.seen += 1
                status = 500 if self.seen % 5 == 0 else 200
                body = json.dumps({"usage": {"total_tokens": 10}}).encode()
                close = self.seen % 7 == 0
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
                             f"{'Connection: close' if close else 'X-A: b'}\r\n\r\n".encode()
                             + body)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    def __enter__(self):
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_load_generator_is_bounded_and_counts_what_it_saw():
    with TinyServer() as srv:
        res = run_load(f"http://{HOST}:{srv.port}/v1/analyze", [b'{"text": "a"}'] * 3,
                       [1] * 3, concurrency=4, duration_s=30, max_requests=50, timeout_s=5)
    assert len(res.records) == 50 == srv.seen  # bounded by count, well before the time limit
    s = summarize(res)
    assert s["ok"] == 40 and s["errors"] == 10 and s["error_rate"] == pytest.approx(0.2)
    assert s["tokens"] == 400 and s["mean_tokens_per_request"] == 10
    # Latency percentiles are of the 200s only, and ordered.
    ok_ms = sorted(r.latency_s * 1000 for r in res.records if r.status == 200)
    assert ok_ms[0] - 1e-3 <= s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"] <= ok_ms[-1] + 1e-3


def test_load_generator_records_connection_errors_instead_of_raising():
    port = free_port()  # nothing listens there
    res = run_load(f"http://{HOST}:{port}/", [b"{}"], [1], concurrency=2, duration_s=5,
                   max_requests=4, timeout_s=2)
    assert len(res.records) == 4 and all(r.status == 0 and r.error for r in res.records)
    assert summarize(res)["error_rate"] == 1.0


def test_percentile_matches_linear_interpolation():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2], 50) == 2.5  # order of arrival does not matter
    assert percentile([5], 99) == 5
    # numpy's default: position (n - 1) x q = 9 x 0.95 = 8.55, between 90 and 100 -> 95.5
    assert percentile([10, 20, 30, 40, 50, 60, 70, 80, 90, 100], 95) == pytest.approx(95.5)
    assert percentile([10, 20, 30, 40, 50, 60, 70, 80, 90, 100], 0) == 10
    assert percentile([10, 20, 30, 40, 50, 60, 70, 80, 90, 100], 100) == 100


def test_batch_distribution_is_the_difference_between_two_scrapes():
    before = {"1.0": 2, "2.0": 3, "4.0": 3, "+Inf": 3, "sum": 4, "count": 3}
    after = {"1.0": 5, "2.0": 8, "4.0": 10, "+Inf": 10, "sum": 20, "count": 10}
    d = batch_distribution(before, after)
    assert d["calls_by_size"] == {"le_1": 3, "le_2": 2, "le_4": 2, "le_inf": 0}
    assert d["model_calls"] == 7 and d["rows"] == 16 and d["mean_batch_size"] == 2.286


def test_cost_is_price_per_hour_over_tokens_per_hour():
    hw = [Hardware(name="cpu", usd_per_hour=0.36, measured=True),
          Hardware(name="gpu", usd_per_hour=3.6, assumed_tokens_per_s=10000),
          Hardware(name="other", usd_per_hour=1.8)]
    cpu, gpu, other = cost_table(hw, measured_tokens_per_s=100.0, revenue_per_1k=0.002)
    # By hand: $0.36/h at 100 tokens/s = 360,000 tokens/h -> $0.001 per 1K tokens; sold at
    # $0.002/1K that leaves $0.001/1K and needs half the capacity sold, i.e. 50 tokens/s
    # ($0.0001/s of machine over $0.000002 per token).
    assert cpu["source"] == "measured" and cpu["tokens_per_s"] == 100.0
    assert cpu["tokens_per_hour"] == 360_000
    assert cpu["cost_per_1k_usd"] == pytest.approx(0.001)
    assert cpu["margin_per_1k_usd"] == pytest.approx(0.001)
    assert cpu["break_even_utilisation"] == pytest.approx(0.5)
    assert cpu["break_even_tokens_per_s"] == pytest.approx(50)
    # $3.6/h at 10,000 tokens/s = 36M tokens/h -> $0.0001/1K; break-even 500 tokens/s.
    assert gpu["source"] == "assumed" and gpu["cost_per_1k_usd"] == pytest.approx(0.0001)
    assert gpu["margin_per_1k_usd"] == pytest.approx(0.0019)
    assert gpu["break_even_utilisation"] == pytest.approx(0.05)
    assert gpu["break_even_tokens_per_s"] == pytest.approx(500)
    # No throughput: no cost per token, but the break-even still follows from the price: 250.
    assert other["source"] == "not measured" and "cost_per_1k_usd" not in other
    assert other["break_even_tokens_per_s"] == pytest.approx(250)


def test_a_machine_costing_more_than_the_price_has_a_negative_margin():
    # $7.2/h at 1,000 tokens/s = 3.6M tokens/h -> $0.002/1K, sold at $0.001/1K.
    [row] = cost_table([Hardware(name="big", usd_per_hour=7.2, measured=True)],
                       measured_tokens_per_s=1000.0, revenue_per_1k=0.001)
    assert row["cost_per_1k_usd"] == pytest.approx(0.002)
    assert row["margin_per_1k_usd"] == pytest.approx(-0.001)
    assert row["break_even_utilisation"] == pytest.approx(2.0)  # not reachable
    assert row["break_even_tokens_per_s"] == pytest.approx(2000)


def test_benchmark_params_refuse_bad_values():
    with pytest.raises(ValueError, match="ceiling_modes"):
        Benchmark(ceiling_modes=["turbo"])
    with pytest.raises(ValueError, match="at most one"):
        Benchmark(hardware=[Hardware(name="a", usd_per_hour=1, measured=True),
                            Hardware(name="b", usd_per_hour=1, measured=True)])
    with pytest.raises(ValueError, match="no assumed"):
        Hardware(name="a", usd_per_hour=1, measured=True, assumed_tokens_per_s=5)


def test_ceiling_at_a_batch_size_interpolates_log_log_between_measured_points():
    policy = [{"rows_per_call": 1.0, "texts_per_s": 100.0},
              {"rows_per_call": 4.0, "texts_per_s": 400.0},
              {"rows_per_call": 16.0, "texts_per_s": 800.0}]
    assert ceiling_at(policy, 4.0) == pytest.approx(400.0)
    assert ceiling_at(policy, 2.0) == pytest.approx(200.0)  # halfway in log: sqrt(100 * 400)
    assert ceiling_at(policy, 8.0) == pytest.approx(800 / 2 ** 0.5)  # sqrt(400 * 800)
    assert ceiling_at(policy, 32.0) is None  # outside what was measured: no figure
    assert ceiling_at(policy, 0.5) is None


def test_two_servers_take_turns_at_each_level_and_each_level_merges_its_rounds():
    """metering_rounds: the metered and unmetered endpoints alternate, the order reversed
    every round, each round duration_s / rounds long; a level is all its rounds' requests."""
    runs = []

    def load(url, *args, **kwargs):  # the real load generator, its calls noted in order
        res = run_load(url, *args, **kwargs)
        runs.append((url.split("/")[2], res.concurrency, args[3], args[4], len(res.records)))
        return res

    b = Benchmark(concurrency=[1, 3], headline_concurrency=3, duration_s=30, max_requests=30,
                  warmup_requests=0)
    with TinyServer() as one, TinyServer() as two:
        names = {f"{HOST}:{one.port}": "a", f"{HOST}:{two.port}": "b"}
        servers = [Driven(name, SimpleNamespace(url=f"http://{HOST}:{srv.port}", pid=None,
                                                port=srv.port), {}, False)
                   for name, srv in (("a", one), ("b", two))]
        levels = drive(servers, [b'{"text": "x"}'], b, load, rounds=3)
        seen = one.seen, two.seen
    assert [(names[u], c) for u, c, *_ in runs] == [
        ("a", 1), ("b", 1), ("b", 1), ("a", 1), ("a", 1), ("b", 1),
        ("a", 3), ("b", 3), ("b", 3), ("a", 3), ("a", 3), ("b", 3)]
    # Each round gets a third of the level's time and of its request cap (30 -> 10).
    assert {(d, m) for *_, d, m, _ in runs} == {(10.0, 10)}
    assert all(n == 10 for *_, n in runs) and seen == (60, 60)
    for name in ("a", "b"):
        assert [lv["concurrency"] for lv in levels[name]] == [1, 3]
        for lv in levels[name]:
            assert lv["requests"] == 30 and len(lv["rounds"]) == 3
            assert sum(r["ok"] for r in lv["rounds"]) == lv["ok"]
    # The records of every round, under their server and level, for requests.csv.
    assert [len([r for ph, c, r in d.records if ph == "measure" and c == 3])
            for d in servers] == [30, 30]


def test_metering_overhead_is_the_median_of_the_paired_rounds():
    """Worked by hand: p50 per round metered 10/12/11 ms against 10/10/10 unmetered -> +0,
    +20, +10% -> median +10%; req/s 90/100/80 against 100/100/100 -> 10, 0, 20% lost ->
    median 10%. The pooled figures (a p50 of 11.5 and req/s of 95) would say otherwise."""
    def level(c, p50s, rps, pooled_p50, pooled_rps):
        return {"concurrency": c, "req_per_s": pooled_rps, "p50_ms": pooled_p50,
                "p99_ms": pooled_p50 * 2,
                "rounds": [{"p50_ms": p, "req_per_s": r} for p, r in zip(p50s, rps)]}

    b = Benchmark(concurrency=[1], headline_concurrency=1)
    servers = {"endpoint": {"levels": [level(1, [10, 12, 11], [90, 100, 80], 11.5, 95)]},
               "unmetered": {"levels": [level(1, [10, 10, 10], [100, 100, 100], 10, 100)]}}
    policy = [{"batch_size": 32, "texts_per_s": 200.0, "rows_per_call": 8.0}]
    out = ratios(b, [], policy, servers)
    assert out["metering_overhead_p50_pct_rounds"] == {"c1": [0.0, 20.0, 10.0]}
    assert out["metering_overhead_p50_pct"] == {"c1": 10.0}
    assert out["metering_overhead_req_s_pct_rounds"] == [10.0, 0.0, 20.0]
    assert out["metering_overhead_req_s_pct"] == 10.0
    # Levels measured in one run each (no rounds): the levels themselves are the one pair.
    for s in servers.values():
        del s["levels"][0]["rounds"]
    out = ratios(b, [], policy, servers)
    assert out["metering_overhead_p50_pct"] == {"c1": 15.0}
    assert out["metering_overhead_req_s_pct"] == 5.0
