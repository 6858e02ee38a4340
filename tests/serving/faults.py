"""What the fault (chaos) tests share: a load of real HTTP requests recorded one by one, the
reconciliation of what clients saw against the ledger's rows, and the README's fault table.

Each fault test drives load with `drive`, injects its fault, then calls `reconcile`, asserts on
the result and passes it to `record`. With TOKENMETER_FAULT_REPORT=path set, `record` appends a
JSON line there; `python -m tests.serving.faults path` prints the Markdown table the README
carries ("Billing under faults").
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional

import httpx

REPORT_ENV = "TOKENMETER_FAULT_REPORT"


@dataclass
class Sent:
    """One request as the client saw it: status (0: no answer), event id of a 200, seconds."""

    status: int
    event_id: Optional[str]
    seconds: float
    error: str = ""
    at: float = 0.0  # when it was sent, seconds after the load began


@dataclass
class Load:
    sent: List[Sent] = field(default_factory=list)

    @property
    def ok_ids(self) -> List[str]:
        return [s.event_id for s in self.sent if s.status == 200 and s.event_id]

    def count(self, status: int) -> int:
        return sum(1 for s in self.sent if s.status == status)

    @property
    def longest_s(self) -> float:
        return max((s.seconds for s in self.sent), default=0.0)

    def statuses(self) -> Dict[int, int]:
        out: Dict[int, int] = {}
        for s in self.sent:
            out[s.status] = out.get(s.status, 0) + 1
        return dict(sorted(out.items()))


async def drive(url: str, key: str, seconds: float, concurrency: int = 8,
                body: Optional[dict] = None, timeout_s: float = 60.0,
                stop: Optional[Callable[[], bool]] = None) -> Load:
    """`concurrency` clients POST /v1/analyze back to back for `seconds` (or until `stop()`),
    each answer recorded. A request that gets no answer is status 0 with the error's name."""
    load = Load()
    begin = time.monotonic()
    end = begin + seconds
    headers = {"Authorization": f"Bearer {key}"}
    payload = body or {"text": "这个东西很好用，推荐"}

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < end and not (stop and stop()):
            t0 = time.monotonic()
            try:
                r = await http.post(url + "/v1/analyze", json=payload, headers=headers)
                eid = r.json().get("id") if r.status_code == 200 else None
                load.sent.append(Sent(r.status_code, eid, time.monotonic() - t0, "",
                                      t0 - begin))
                if r.status_code != 200:
                    await asyncio.sleep(0.02)  # a refused client backs off a little
            except httpx.HTTPError as exc:
                load.sent.append(Sent(0, None, time.monotonic() - t0, type(exc).__name__,
                                      t0 - begin))
                await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return load


@dataclass
class Reconciled:
    """Client answers against ledger rows. lost: 200s without a row; doubled: rows beyond the
    200s (an id billed twice, or a row for a request that was not answered 200)."""

    fault: str
    sent: int
    ok: int
    rows: int
    lost: int
    doubled: int
    longest_stall_s: float
    statuses: Dict[int, int] = field(default_factory=dict)


def reconcile(fault: str, load: Load, ledger_ids: Iterable[str],
              answered_ids: Optional[Iterable[str]] = None) -> Reconciled:
    """`ledger_ids`: every billing row's id written during the load. `answered_ids`: the 200s
    the server sent, where that differs from what clients saw (clients that hung up)."""
    rows = list(ledger_ids)
    ok = list(answered_ids) if answered_ids is not None else load.ok_ids
    in_ledger = set(rows)
    lost = sum(1 for i in ok if i not in in_ledger)
    matched = set(ok) & in_ledger
    doubled = len(rows) - len(matched)
    return Reconciled(fault, len(load.sent), len(ok), len(rows), lost, doubled,
                      round(load.longest_s, 2), load.statuses())


def record(result: Reconciled) -> None:
    """Append the result to $TOKENMETER_FAULT_REPORT (a JSON line), when set."""
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(result)) + "\n")


def table(lines: Iterable[str]) -> str:
    head = ("| fault | requests sent | 200s | rows | lost | doubled | longest stall (s) "
            "| answers |\n|---|---:|---:|---:|---:|---:|---:|---|")
    out = [head]
    for line in lines:
        r = json.loads(line)
        answers = ", ".join(f"{k}: {v}" for k, v in r["statuses"].items())
        out.append(f"| {r['fault']} | {r['sent']} | {r['ok']} | {r['rows']} | {r['lost']} "
                   f"| {r['doubled']} | {r['longest_stall_s']} | {answers} |")
    return "\n".join(out)


if __name__ == "__main__":
    print(table(Path(sys.argv[1]).read_text(encoding="utf-8").splitlines()))
