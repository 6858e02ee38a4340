"""The benchmark's figures: numbers derived from what was measured, as pure functions of plain
data (level rows, ceiling rows, /metrics text, params): batch sizes between two scrapes of the
endpoint's histogram, cost per 1K tokens and break-even per machine, and the headline ratios.

Starts nothing, reads and writes no file, logs nothing; `outputs` turns the figures into files.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, List, Optional, Sequence, SupportsFloat, Tuple

from pipeline.params import Benchmark, Hardware


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


def ceiling_at(policy: Sequence[Dict[str, object]], rows_per_call: float) -> Optional[float]:
    """Model-only texts/s at a mean batch of `rows_per_call` rows, interpolated (log-log)
    between the batch-policy points around it; None outside their range."""
    pts = sorted((number(p["rows_per_call"]), number(p["texts_per_s"])) for p in policy
                 if "rows_per_call" in p)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= rows_per_call <= x1:
            if x1 == x0:
                return y0
            t = (math.log(rows_per_call) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return pts[0][1] if len(pts) == 1 and pts[0][0] == rows_per_call else None


def pct_change(new: object, old: object) -> Optional[float]:
    """(new - old) / old in percent, 2 places; None when either is missing or old is 0."""
    if new is None or old is None or not number(old):
        return None
    return round((number(new) - number(old)) / number(old) * 100, 2)


def paired(on: Dict[str, Any], off: Dict[str, Any]) -> List[Tuple[Dict[str, Any], ...]]:
    """The two levels' rounds side by side (the stage runs them in turns), else the levels
    themselves as one pair."""
    a, z = on.get("rounds"), off.get("rounds")
    if a and z and len(a) == len(z):
        return list(zip(a, z))
    return [(on, off)]


def median_of(values: Sequence[Optional[float]]) -> Optional[float]:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 2) if known else None


def ratios(b: Benchmark, grid: List[dict], policy: List[dict],
           servers: Dict[str, dict], priority: Optional[Dict[str, Any]] = None
           ) -> Dict[str, object]:
    top = b.headline_concurrency
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
    # Against the model alone at the batch size the server actually formed (rows per call).
    batches = ep.get("batches")
    formed = batches.get("mean_batch_size") if isinstance(batches, dict) else None
    at_formed = ceiling_at(policy, number(formed)) if formed else None
    out["formed_rows_per_call"] = formed
    out["served_vs_ceiling_at_formed_batch"] = round(number(ep["req_per_s"]) / at_formed, 4) \
        if at_formed else None
    out["p99_over_p50"] = round(number(ep["p99_ms"]) / number(ep["p50_ms"]), 3) \
        if ep["p50_ms"] and ep["p99_ms"] else None
    batch = servers["endpoint"].get("batch_levels") or []
    if batch:
        best_batch = best(batch, "texts_per_s")
        out["batch_client"] = {
            "texts_per_request": best_batch["texts_per_request"],
            "concurrency": best_batch["concurrency"], "texts_per_s": best_batch["texts_per_s"],
            "vs_ceiling": round(number(best_batch["texts_per_s"]) / float(ceil["texts_per_s"]),
                                4)}
    if "unmetered" in servers:
        over: Dict[str, Optional[float]] = {}
        each: Dict[str, List[Optional[float]]] = {}
        for on in servers["endpoint"]["levels"]:
            off = at(servers["unmetered"]["levels"], int(number(on["concurrency"])))
            if off:
                c = f"c{on['concurrency']}"
                each[c] = [pct_change(a["p50_ms"], z["p50_ms"]) for a, z in paired(on, off)]
                over[c] = median_of(each[c])
        out["metering_overhead_p50_pct"] = over
        out["metering_overhead_p50_pct_rounds"] = each
        off = at(servers["unmetered"]["levels"], top)
        # Throughput metering costs, in percent of the unmetered req/s (positive = lost).
        change = [pct_change(a["req_per_s"], z["req_per_s"]) for a, z in paired(ep, off)] \
            if off else []
        lost = [None if x is None else 0.0 - x for x in change]  # 0.0 -: no "-0.0"
        out["metering_overhead_req_s_pct"] = median_of(lost)
        out["metering_overhead_req_s_pct_rounds"] = lost
    if priority:
        # Priority p50 over the standard p50 of the same run (below 1: priority waits less).
        std, pri = priority["standard"], priority["priority"]
        out["priority_p50_vs_standard"] = round(number(pri["p50_ms"]) / number(std["p50_ms"]),
                                                3) if pri["p50_ms"] and std["p50_ms"] else None
        out["priority_p99_vs_standard"] = round(number(pri["p99_ms"]) / number(std["p99_ms"]),
                                                3) if pri["p99_ms"] and std["p99_ms"] else None
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
