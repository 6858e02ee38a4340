"""Prometheus metrics of one endpoint process, on its own registry: requests by status, billed
tokens and cost, latency, batch size and queue depth. Labels are bounded (route, status code,
model, version); no per-user or per-key labels, which would grow without limit.
"""

from __future__ import annotations

import os
from decimal import Decimal
from typing import Dict, Optional

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity; all of them where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Metrics:
    def __init__(self, instance_id: str, model: str, version: str,
                 hardware_usd_per_hour: Optional[Decimal] = None):
        self.registry = CollectorRegistry()
        r = self.registry
        # What the dashboard's utilisation-vs-unit-cost panel divides: process_cpu_seconds_total
        # (and memory) of this process, the cores it may use, and what the machine costs.
        ProcessCollector(registry=r)
        Gauge("tokenmeter_cpu_cores", "CPU cores this process may use", registry=r) \
            .set(usable_cores())
        if hardware_usd_per_hour is not None:
            # A price as a float sample: for dashboards only, never for billing.
            Gauge("tokenmeter_hardware_usd_per_hour",
                  "What the machine serving this process costs per hour (settings)",
                  registry=r).set(float(hardware_usd_per_hour))
        Info("tokenmeter_instance", "This process: the id its billing rows carry", registry=r) \
            .info({"instance_id": instance_id, "model": model, "model_version": version})
        self.requests = Counter("tokenmeter_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        # By model and version: a canary's tokens and cost are told apart from the stable's.
        self.billed = Counter("tokenmeter_billed_requests",
                              "Requests written to the ledger by this process",
                              ["model", "version"], registry=r)
        self.tokens = Counter("tokenmeter_billed_tokens", "Billed tokens",
                              ["model", "version", "direction"], registry=r)
        # Integer micro-USD, so the counter sums exactly (a float of whole numbers < 2**53).
        self.cost = Counter("tokenmeter_billed_cost_micro_usd", "Billed cost in micro-USD",
                            ["model", "version"], registry=r)
        # The rollout this process applies: each loaded version's share of unpinned requests.
        self.traffic = Gauge("tokenmeter_model_traffic_percent",
                             "Percent of unpinned requests routed to each loaded version",
                             ["model", "version"], registry=r)
        self.latency = Histogram("tokenmeter_request_latency_seconds",
                                 "Latency of /v1/analyze answers", ["status"], registry=r,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("tokenmeter_batch_size", "Rows per model call", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.queue_depth = Gauge("tokenmeter_queue_depth", "Jobs waiting for the model",
                                 registry=r)
        self.thread_restarts = Counter("tokenmeter_thread_restarts",
                                       "Worker threads found dead and restarted by the watchdog",
                                       ["thread"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_billing_totals(text: str) -> Dict[str, object]:
    """From a /metrics page: this process's instance id and billed totals (for `verify`)."""
    instance_id: Optional[str] = None
    totals: Dict[str, int] = {"requests": 0, "input_tokens": 0, "output_tokens": 0,
                              "cost_micro": 0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "tokenmeter_instance_info":
                instance_id = s.labels.get("instance_id")
            elif s.name == "tokenmeter_billed_requests_total":
                totals["requests"] += int(s.value)
            elif s.name == "tokenmeter_billed_tokens_total":
                key = "input_tokens" if s.labels.get("direction") == "input" else "output_tokens"
                totals[key] += int(s.value)
            elif s.name == "tokenmeter_billed_cost_micro_usd_total":
                totals["cost_micro"] += int(s.value)
    return {"instance_id": instance_id, **totals}
