"""Writes dashboards/tokenmeter.json, the Grafana dashboard of the metered endpoint, from the
panel list below (standard library only; Grafana's JSON model, schemaVersion 39 = Grafana
10.4 / 11.x). The JSON is committed; edit this file, run it, commit both:

    python deploy/grafana/build_dashboard.py          # rewrites the JSON
    python deploy/grafana/build_dashboard.py --check  # exit 1 when the JSON is stale

Two data sources, by the uids that provisioning/datasources/tokenmeter.yaml gives them:
Prometheus (rates, latency, queue, CPU, unit cost; scraped from each endpoint's /metrics) and
the PostgreSQL ledger (billing truth: daily tokens, top users, revenue). The ledger's `ts` is
ISO-8601 UTC text, so the SQL casts `ts::timestamptz` for Grafana's time macros; the
dashboard's time zone is UTC so that a bar is a UTC day, as on an invoice. Money is summed in
integer micro-USD and divided by 1e6 only for display.

tests/serving/test_dashboard.py proves what the panels query: every metric named is one the
endpoint exports, every PromQL expression returns data from a real Prometheus scraping a real
endpoint under load, and every SQL query runs on a real PostgreSQL ledger and returns the
generated traffic's figures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

HERE = Path(__file__).resolve().parent
OUT = HERE / "dashboards" / "tokenmeter.json"

PROM = {"type": "prometheus", "uid": "tokenmeter-prometheus"}
LEDGER = {"type": "grafana-postgresql-datasource", "uid": "tokenmeter-ledger"}
SCHEMA_VERSION = 39  # Grafana 10.4 and 11.x write this; newer versions migrate it on load

# The one route whose answers are billed and timed (serving/app.py's CountRequests).
ANALYZE = 'route="/v1/analyze"'
RATE = "$__rate_interval"  # at least 4 scrape intervals: the datasource's timeInterval is 15s

Target = Dict[str, Any]
Panel = Dict[str, Any]


def prom(expr: str, legend: str, ref: str = "A", instant: bool = False,
         fmt: str = "time_series") -> Target:
    return {"refId": ref, "datasource": PROM, "editorMode": "code", "expr": expr,
            "legendFormat": legend, "range": not instant, "instant": instant, "format": fmt}


def sql(query: str, fmt: str, ref: str = "A") -> Target:
    return {"refId": ref, "datasource": LEDGER, "editorMode": "code", "format": fmt,
            "rawQuery": True, "rawSql": query.strip()}


def timeseries(title: str, description: str, targets: List[Target], unit: str,
               bars: bool = False, stack: bool = False, decimals: Optional[int] = None,
               overrides: Optional[List[Dict[str, Any]]] = None) -> Panel:
    custom: Dict[str, Any] = {
        "drawStyle": "bars" if bars else "line", "lineWidth": 1,
        "fillOpacity": 80 if bars else 10, "showPoints": "never", "spanNulls": False,
        "axisPlacement": "auto", "axisSoftMin": 0,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
    }
    defaults: Dict[str, Any] = {"unit": unit, "custom": custom, "min": 0}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {"type": "timeseries", "title": title, "description": description,
            "datasource": targets[0]["datasource"], "targets": targets,
            "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom",
                                   "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def table(title: str, description: str, targets: List[Target],
          overrides: Optional[List[Dict[str, Any]]] = None,
          transformations: Optional[List[Dict[str, Any]]] = None) -> Panel:
    return {"type": "table", "title": title, "description": description,
            "datasource": targets[0]["datasource"], "targets": targets,
            "transformations": transformations or [],
            "fieldConfig": {"defaults": {"custom": {"align": "auto"}},
                            "overrides": overrides or []},
            "options": {"showHeader": True, "cellHeight": "sm",
                        "footer": {"show": False, "reducer": ["sum"], "fields": ""}}}


def stat(title: str, description: str, targets: List[Target],
         overrides: Optional[List[Dict[str, Any]]] = None) -> Panel:
    return {"type": "stat", "title": title, "description": description,
            "datasource": targets[0]["datasource"], "targets": targets,
            "fieldConfig": {"defaults": {"unit": "short", "decimals": 0},
                            "overrides": overrides or []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                          "values": False},
                        "colorMode": "none", "graphMode": "none", "textMode": "value_and_name",
                        "justifyMode": "auto", "orientation": "auto"}}


def unit_override(field: str, unit: str, decimals: Optional[int] = None,
                  right_axis: bool = False) -> Dict[str, Any]:
    props: List[Dict[str, Any]] = [{"id": "unit", "value": unit}]
    if decimals is not None:
        props.append({"id": "decimals", "value": decimals})
    if right_axis:
        props.append({"id": "custom.axisPlacement", "value": "right"})
    return {"matcher": {"id": "byName", "options": field}, "properties": props}


def regex_override(pattern: str, unit: str, right_axis: bool) -> Dict[str, Any]:
    props: List[Dict[str, Any]] = [{"id": "unit", "value": unit}]
    if right_axis:
        props.append({"id": "custom.axisPlacement", "value": "right"})
    return {"matcher": {"id": "byRegexp", "options": pattern}, "properties": props}


def row(title: str) -> Panel:
    return {"type": "row", "title": title, "collapsed": False, "panels": []}


# --- ledger (PostgreSQL) ----------------------------------------------------------------------

DAILY_TOKENS = """
SELECT $__timeGroupAlias(ts::timestamptz, 1d),
       SUM(input_tokens + output_tokens) AS "tokens"
FROM billing_events
WHERE $__timeFilter(ts::timestamptz)
GROUP BY 1
ORDER BY 1
"""

TOP_USERS = """
SELECT user_id AS "user",
       SUM(input_tokens + output_tokens) AS "tokens",
       SUM(input_tokens) AS "input tokens",
       SUM(output_tokens) AS "output tokens",
       COUNT(*) AS "requests",
       SUM(cost_micro) / 1e6 AS "cost (USD)"
FROM billing_events
WHERE $__timeFilter(ts::timestamptz)
GROUP BY user_id
ORDER BY 2 DESC, 1
LIMIT 10
"""

DAILY_REVENUE = """
SELECT $__timeGroupAlias(ts::timestamptz, 1d),
       model AS "metric",
       SUM(cost_micro) / 1e6 AS "revenue (USD)"
FROM billing_events
WHERE $__timeFilter(ts::timestamptz)
GROUP BY 1, 2
ORDER BY 1, 2
"""

DAILY_TOKENS_PER_REQUEST = """
SELECT $__timeGroupAlias(ts::timestamptz, 1d),
       SUM(input_tokens + output_tokens)::numeric / COUNT(*) AS "tokens per request"
FROM billing_events
WHERE $__timeFilter(ts::timestamptz)
GROUP BY 1
ORDER BY 1
"""

LEDGER_TOTALS = """
SELECT COUNT(*) AS "requests",
       COALESCE(SUM(input_tokens + output_tokens), 0) AS "tokens",
       COUNT(DISTINCT user_id) AS "users",
       COALESCE(SUM(cost_micro), 0) / 1e6 AS "revenue (USD)"
FROM billing_events
WHERE $__timeFilter(ts::timestamptz)
"""

# --- Prometheus -------------------------------------------------------------------------------

TOKENS_RATE = f"sum(rate(tokenmeter_billed_tokens_total[{RATE}]))"
# `> 0` drops idle windows: a unit cost over zero tokens is +Inf, not a figure.
TOKENS_RATE_NONZERO = f"({TOKENS_RATE} > 0)"
CPU_UTILISATION = (
    # One-to-one on (job, instance): only processes that also export tokenmeter_cpu_cores
    # (endpoints, not Prometheus itself or any other exporter) are divided.
    f"rate(process_cpu_seconds_total[{RATE}]) / on(job, instance) tokenmeter_cpu_cores")
UNIT_COST = (
    # Fleet-wide: what all endpoint machines cost per second over all tokens billed per
    # second, per 1K tokens. Both sides are label-free sums, so they match one-to-one.
    f"sum(tokenmeter_hardware_usd_per_hour) / 3600 * 1000 / {TOKENS_RATE_NONZERO}")
BILLED_PRICE = (
    f"sum(rate(tokenmeter_billed_cost_micro_usd_total[{RATE}])) / 1e6 * 1000"
    f" / {TOKENS_RATE_NONZERO}")
TOKENS_PER_REQUEST = (
    f"{TOKENS_RATE} / (sum(rate(tokenmeter_billed_requests_total[{RATE}])) > 0)")
TOKENS_PER_REQUEST_BY_DIRECTION = (
    # Many (direction) to one: the requests side has no direction label.
    f"sum by (direction) (rate(tokenmeter_billed_tokens_total[{RATE}]))"
    # (`group_left()` with its empty label list: a bare `group_left (` would read the
    # parenthesised right-hand side as a label list.)
    f" / ignoring(direction) group_left()"
    f" (sum(rate(tokenmeter_billed_requests_total[{RATE}])) > 0)")


def latency(q: str) -> str:
    return (f"histogram_quantile({q}, sum by (le) (rate("
            f'tokenmeter_request_latency_seconds_bucket{{status=~"2.."}}[{RATE}])))')


GPU_NOTE = (
    "GPU: the endpoint exports no GPU metric and none is scraped here. On a GPU host, run "
    "NVIDIA's DCGM exporter (dcgm-exporter) next to the endpoint, add it to "
    "docker/prometheus.yml, and plot DCGM_FI_DEV_GPU_UTIL (percent, per GPU) here in place "
    "of the CPU series.")


def panels() -> List[Tuple[Panel, int, int]]:
    """(panel, width, height) in reading order; positions are laid out by `layout`."""
    return [
        (row("Cost transparency"), 24, 1),
        (timeseries(
            "Daily total tokens",
            "Input plus output tokens billed per UTC day, from the ledger (billing truth).",
            [sql(DAILY_TOKENS, "time_series")], "short", bars=True, decimals=0), 12, 8),
        (table(
            "Top 10 users by tokens",
            "The 10 users with the most billed tokens (input + output) in the time range, "
            "from the ledger; ties broken by user id. Cost is the sum of the billed "
            "micro-USD amounts, shown in USD.",
            [sql(TOP_USERS, "table")],
            overrides=[unit_override("cost (USD)", "currencyUSD", decimals=6)]), 12, 8),
        (timeseries(
            "Average tokens per request",
            "Billed tokens per billed request over the rate window (Prometheus), in total "
            "and by direction.",
            [prom(TOKENS_PER_REQUEST, "total"),
             prom(TOKENS_PER_REQUEST_BY_DIRECTION, "{{direction}}", ref="B")],
            "short", decimals=1), 8, 8),
        (timeseries(
            "Average tokens per request, by day",
            "Billed tokens per billed request per UTC day, from the ledger.",
            [sql(DAILY_TOKENS_PER_REQUEST, "time_series")], "short", bars=True,
            decimals=1), 8, 8),
        (stat(
            "Ledger totals in range",
            "Billed requests, tokens, distinct users and revenue in the time range, from "
            "the ledger.",
            [sql(LEDGER_TOTALS, "table")],
            overrides=[unit_override("revenue (USD)", "currencyUSD", decimals=2)]), 8, 8),
        (timeseries(
            "CPU utilisation vs unit cost per 1K tokens",
            "Left axis: CPU utilisation of each endpoint process, "
            "rate(process_cpu_seconds_total) / tokenmeter_cpu_cores (1 = every core it may "
            "use busy). Right axis: what the hardware costs per 1K billed tokens, "
            "sum(tokenmeter_hardware_usd_per_hour) / 3600 / tokens per second * 1000 "
            "(TOKENMETER_HARDWARE_USD_PER_HOUR), against what was billed per 1K tokens. "
            "Idle windows have no unit cost. " + GPU_NOTE,
            [prom(CPU_UTILISATION, "CPU {{instance}}"),
             prom(UNIT_COST, "hardware USD per 1K tokens", ref="B"),
             prom(BILLED_PRICE, "billed USD per 1K tokens", ref="C")],
            "percentunit",
            overrides=[regex_override("^(hardware|billed) USD per 1K tokens$",
                                      "currencyUSD", right_axis=True)]), 12, 9),
        (timeseries(
            "Daily revenue by model",
            "Billed amounts per UTC day and model, from the ledger (micro-USD sums, shown in "
            "USD).",
            [sql(DAILY_REVENUE, "time_series")], "currencyUSD", bars=True, stack=True),
            12, 9),
        (row("Service"), 24, 1),
        (timeseries(
            "Requests per second by status",
            "/v1/analyze answers per second by HTTP status.",
            [prom(f"sum by (status) (rate(tokenmeter_requests_total{{{ANALYZE}}}[{RATE}]))",
                  "{{status}}")], "reqps"), 8, 8),
        (timeseries(
            "Errors",
            "/v1/analyze answers with a 4xx or 5xx status per second (left), and their "
            "share of all answers (right). 4xx are refusals (bad key, body, budget, rate "
            "limit); 5xx are the endpoint's failures.",
            [prom(f"sum by (status) (rate(tokenmeter_requests_total"
                  f'{{{ANALYZE}, status=~"4..|5.."}}[{RATE}]))', "{{status}}"),
             prom(f"sum(rate(tokenmeter_requests_total{{{ANALYZE}, status=~\"4..|5..\"}}"
                  f"[{RATE}])) / (sum(rate(tokenmeter_requests_total{{{ANALYZE}}}[{RATE}]))"
                  f" > 0)", "error ratio", ref="B")],
            "reqps", overrides=[unit_override("error ratio", "percentunit",
                                              right_axis=True)]), 8, 8),
        (timeseries(
            "Latency (2xx answers)",
            "p50, p95 and p99 of /v1/analyze answers with a 2xx status, from the latency "
            "histogram (bucket bounds 5 ms to 10 s).",
            [prom(latency("0.5"), "p50"), prom(latency("0.95"), "p95", ref="B"),
             prom(latency("0.99"), "p99", ref="C")], "s"), 8, 8),
        (timeseries(
            "Queue depth",
            "Jobs waiting for the model, per endpoint process, as sampled at each scrape.",
            [prom("sum by (instance) (tokenmeter_queue_depth)", "{{instance}}")],
            "short", decimals=0), 8, 8),
        (timeseries(
            "Billed tokens per second",
            "Tokens billed per second by direction (Prometheus; the ledger is the billing "
            "truth, this is its live view).",
            [prom(f"sum by (direction) (rate(tokenmeter_billed_tokens_total[{RATE}]))",
                  "{{direction}}")], "short", stack=True), 8, 8),
        (timeseries(
            "Billed revenue vs hardware cost",
            "USD per hour: what the endpoints bill (billed micro-USD rate) against what "
            "their machines cost (tokenmeter_hardware_usd_per_hour, summed over processes).",
            [prom(f"sum(rate(tokenmeter_billed_cost_micro_usd_total[{RATE}])) * 3600 / 1e6",
                  "billed USD/hour"),
             prom("sum(tokenmeter_hardware_usd_per_hour)", "hardware USD/hour", ref="B")],
            "currencyUSD"), 8, 8),
        (timeseries(
            "Batch size",
            "Rows per model call: the mean and p95 (tokenmeter_batch_size histogram).",
            [prom(f"sum(rate(tokenmeter_batch_size_sum[{RATE}]))"
                  f" / (sum(rate(tokenmeter_batch_size_count[{RATE}])) > 0)", "mean"),
             prom(f"histogram_quantile(0.95, sum by (le) (rate(tokenmeter_batch_size_bucket"
                  f"[{RATE}])))", "p95", ref="B")], "short", decimals=1), 8, 8),
        (timeseries(
            "Resident memory",
            "Resident set size of each endpoint process.",
            [prom("process_resident_memory_bytes and on(job, instance) tokenmeter_cpu_cores",
                  "{{instance}}")], "bytes"), 8, 8),
        (timeseries(
            "Billed tokens per second by model version",
            "Tokens billed per second by the model version that answered (label `version` "
            "of tokenmeter_billed_tokens_total): a canary's share of the traffic as billed.",
            [prom(f"sum by (model, version) (rate(tokenmeter_billed_tokens_total[{RATE}]))",
                  "{{model}} v{{version}}")], "short", stack=True), 12, 8),
        (timeseries(
            "Rollout: traffic split by version",
            "Percent of unpinned requests each endpoint process routes to each loaded "
            "version (tokenmeter_model_traffic_percent; `python -m serving models canary | "
            "promote | rollback` change it, every process within ROLLOUT_REFRESH_S).",
            [prom("max by (model, version) (tokenmeter_model_traffic_percent)",
                  "{{model}} v{{version}}")], "percent", decimals=0), 12, 8),
        (table(
            "Endpoint processes",
            "One row per endpoint process: the instance id its ledger rows carry (column "
            "instance_id of billing_events), its model and version.",
            [prom("tokenmeter_instance_info", "", instant=True, fmt="table")],
            transformations=[{"id": "organize", "options": {"excludeByName": {
                "Time": True, "Value": True, "__name__": True, "job": True,
                "service": True}}}]), 8, 8),
    ]


def layout(items: List[Tuple[Panel, int, int]]) -> List[Panel]:
    """Ids in order and gridPos left to right, wrapping at Grafana's 24 columns."""
    out: List[Panel] = []
    x = y = row_h = 0
    for i, (panel, w, h) in enumerate(items, start=1):
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        out.append({"id": i, "gridPos": {"h": h, "w": w, "x": x, "y": y}, **panel})
        x, row_h = x + w, max(row_h, h)
    return out


def dashboard() -> Dict[str, Any]:
    return {
        "uid": "tokenmeter",
        "title": "tokenmeter: cost and service",
        "description": "Billed tokens, top users, unit cost and revenue from the ledger and "
                       "Prometheus; requests, errors, latency and queue of the metered "
                       "endpoint. Generated by deploy/grafana/build_dashboard.py.",
        "tags": ["tokenmeter"],
        "editable": True,
        "graphTooltip": 1,
        "timezone": "utc",
        "time": {"from": "now-7d", "to": "now"},
        "refresh": "1m",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": []},
        "timepicker": {},
        "panels": layout(panels()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: List[str]) -> int:
    text = render()
    if "--check" in argv:
        current = OUT.read_text(encoding="utf-8") if OUT.exists() else ""
        if current != text:
            print(f"{OUT} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
