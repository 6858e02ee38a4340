"""The cost dashboard (notebooks/cost_dashboard.ipynb), executed top to bottom with nbclient in
a real `python3` kernel started in notebooks/ (as the project's Jupyter runs it), against a
generated month of traffic written through the real ledger writer
(tests/serving/test_invoices.write_month, plus users that make and miss the top-10 cut, two
with equal tokens, and a large row after the month).

It proves that the notebook runs without error from its environment parameters alone; that it
saves the four views as real PNG images; and that the numbers it printed and saved
(summary.json) equal sums computed here from the generated events, never from the notebook's
arithmetic: tokens and requests per UTC day and per user, billed cost as exact decimal strings
from integer micro-USD, the top-10 ranking, averages per request, utilisation, and the hardware
cost of 1K tokens at each day's load (from the formula, with Fractions). With no period given it
covers the 30 days up to the newest in the ledger, days without traffic included. Also that the
committed notebook carries no outputs and no execution counts and parses as Python 3.8.
"""

from __future__ import annotations

import ast
import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import nbformat
import pytest
from matplotlib.image import imread
from nbclient import NotebookClient

from serving.keys import create_key
from serving.ledger import BillingEvent, open_ledger
from tests.serving.test_invoices import EVENTS, PERIOD, USERS, event, write_month

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "cost_dashboard.ipynb"
BENCHMARK = ROOT / "metrics" / "benchmark.json"
FIGURES = ("daily_tokens.png", "top_users.png", "tokens_per_request.png",
           "utilisation_vs_unit_cost.png")
START, END = f"{PERIOD}-01", f"{PERIOD}-31"
PARAMETERS = ("TOKENMETER_LEDGER", "COST_START", "COST_END", "COST_FIGURES_DIR",
              "COST_HARDWARE_USD_PER_HOUR", "TOKENMETER_HARDWARE_USD_PER_HOUR",
              "COST_CAPACITY_TOKENS_PER_S")
# Users beyond the month's three: nine single-request users of growing size, two with equal
# tokens (the ranking breaks ties by user id), and one whose large row comes after October.
EXTRA = [(f"user-{k:02d}", f"{PERIOD}-{k + 1:02d}T08:00:00Z", 40 * k, k) for k in range(1, 10)]
EXTRA += [("tie-b", f"{PERIOD}-20T10:00:00Z", 290, 10),
          ("tie-a", f"{PERIOD}-21T11:30:00.250000Z", 290, 10),
          ("after", "2026-11-05T00:00:00Z", 100_000, 10)]


def usd(micro: int) -> str:
    return f"{Decimal(micro) / 1_000_000:.6f}"


def at_12_places(x: Fraction) -> str:
    """A positive exact value rounded half-up to 1e-12, as a plain decimal string."""
    scaled = x * 10**12
    units = (2 * scaled.numerator + scaled.denominator) // (2 * scaled.denominator)
    return f"{Decimal(units).scaleb(-12):.12f}"


@dataclass
class Sums:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    micro: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, e: BillingEvent) -> None:
        self.requests += 1
        self.input_tokens += e.input_tokens
        self.output_tokens += e.output_tokens
        self.micro += e.cost_micro


@dataclass
class Expected:
    """Sums per day of the period (every day, zero where none) and per user."""
    days: Dict[str, Sums] = field(default_factory=dict)
    users: Dict[str, Sums] = field(default_factory=lambda: defaultdict(Sums))

    @property
    def ranking(self) -> List[str]:
        return sorted(self.users, key=lambda u: (-self.users[u].tokens, u))


def expected_from(events: List[BillingEvent], start: str, end: str) -> Expected:
    out = Expected()
    first, last = date.fromisoformat(start), date.fromisoformat(end)
    for i in range((last - first).days + 1):
        out.days[(first + timedelta(days=i)).isoformat()] = Sums()
    for e in events:
        if start <= e.ts[:10] <= end:
            out.days[e.ts[:10]].add(e)
            out.users[e.user_id].add(e)
    return out


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def ledger(request, tmp_path) -> Iterator[Tuple[str, List[BillingEvent]]]:
    """A ledger (SQLite file, or a scratch PostgreSQL database) holding the month of traffic, the
    rows around it and the extra users; every event written, as generated."""
    target = str(tmp_path / "ledger.sqlite3") if request.param == "sqlite" \
        else request.getfixturevalue("pg_dsn")
    led = open_ledger(target)
    written: List[BillingEvent] = []
    commit = led.commit_event

    def recording(e: BillingEvent):
        written.append(e)
        return commit(e)

    led.commit_event = recording  # type: ignore[method-assign]  # sees write_month's rows too
    led.start()
    try:
        write_month(led)
        for user, ts, n_in, n_out in EXTRA:
            e = event(create_key(led, user)[0], ts, "sentiment", n_in, n_out)
            assert led.commit_event(e).result(timeout=30).status == "billed"
        yield target, written
    finally:
        led.stop()
        led.close()


def run_notebook(env: Dict[str, Optional[str]],
                 monkeypatch) -> Tuple[nbformat.NotebookNode, float]:
    """Execute the committed notebook in a fresh kernel started in notebooks/ with exactly these
    parameters in its environment (None: unset); the executed notebook (in memory), wall time."""
    assert set(env) == set(PARAMETERS)
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    started = time.monotonic()
    NotebookClient(nb, kernel_name="python3", timeout=120,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return nb, time.monotonic() - started


def printed(nb: nbformat.NotebookNode) -> str:
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert errors == []
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs if o.output_type == "stream")


def check_summary(summary: Dict[str, Any], want: Expected, hardware: str,
                  capacity: float) -> None:
    """summary.json against the sums of the generated events, view by view."""
    days = list(want.days)
    assert summary["period"] == {"start": days[0], "end": days[-1]}
    assert summary["hardware_usd_per_hour"] == hardware
    assert summary["capacity_tokens_per_s"] == capacity
    assert sorted(summary["figures"]) == sorted(FIGURES)

    # View 1 and the totals: every day of the period, exact integers and cost strings.
    assert [d["day"] for d in summary["daily"]] == days
    for row in summary["daily"]:
        s = want.days[row["day"]]
        assert (row["requests"], row["input_tokens"], row["output_tokens"], row["tokens"],
                row["billed_usd"]) == (s.requests, s.input_tokens, s.output_tokens, s.tokens,
                                       usd(s.micro)), row["day"]
    every = list(want.users.values())
    assert summary["totals"] == {
        "requests": sum(s.requests for s in every), "users": len(every),
        "input_tokens": sum(s.input_tokens for s in every),
        "output_tokens": sum(s.output_tokens for s in every),
        "tokens": sum(s.tokens for s in every), "billed_usd": usd(sum(s.micro for s in every))}

    # View 2: the ten users with the most tokens (ties by user id), cost to the micro-USD.
    assert [(u["rank"], u["user_id"], u["requests"], u["input_tokens"], u["output_tokens"],
             u["tokens"], u["billed_usd"]) for u in summary["top_users"]] == [
        (i + 1, u, want.users[u].requests, want.users[u].input_tokens,
         want.users[u].output_tokens, want.users[u].tokens, usd(want.users[u].micro))
        for i, u in enumerate(want.ranking[:10])]

    # Views 3 and 4, day by day; a day without traffic has no average and no unit cost.
    hw = Fraction(hardware)
    for row in summary["daily"]:
        s = want.days[row["day"]]
        if s.requests == 0:
            assert (row["input_tokens_per_request"], row["output_tokens_per_request"],
                    row["hardware_usd_per_1k"], row["billed_usd_per_1k"],
                    row["utilisation"]) == (None, None, None, None, 0), row["day"]
            continue
        assert row["input_tokens_per_request"] == pytest.approx(s.input_tokens / s.requests)
        assert row["output_tokens_per_request"] == pytest.approx(s.output_tokens / s.requests)
        assert row["tokens_per_s"] == pytest.approx(s.tokens / 86400)
        assert row["utilisation"] == pytest.approx(s.tokens / 86400 / capacity)
        tokens_per_s = Fraction(s.tokens, 86400)
        assert row["hardware_usd_per_1k"] == at_12_places(hw / 3600 / tokens_per_s * 1000)
        assert row["billed_usd_per_1k"] == at_12_places(
            Fraction(s.micro, 1_000_000) / s.tokens * 1000)
    assert summary["hardware_usd_per_1k_at_capacity"] == at_12_places(
        hw / 3600 / Fraction(repr(float(capacity))) * 1000)


@pytest.mark.slow
def test_the_month_the_figures_and_the_printed_tables_equal_the_ledger(ledger, tmp_path,
                                                                       monkeypatch):
    target, events = ledger
    want = expected_from(events, START, END)
    assert set(USERS) <= set(want.users) and "after" not in want.users  # the fixture's shape
    assert sum(s.requests for s in want.users.values()) == sum(EVENTS.values()) + len(EXTRA) - 1
    assert len(want.ranking) > 10 and {"tie-a", "tie-b"} <= set(want.ranking[:10])
    figures = tmp_path / "figures"
    backend = "sqlite" if target.endswith(".sqlite3") else "postgresql"
    capacity = json.loads(BENCHMARK.read_text())["cost"]["measured_tokens_per_s"] \
        if BENCHMARK.is_file() else 38984.0

    nb, wall_s = run_notebook({
        "TOKENMETER_LEDGER": target, "COST_START": START, "COST_END": END,
        "COST_FIGURES_DIR": str(figures), "COST_HARDWARE_USD_PER_HOUR": "1.006",
        "TOKENMETER_HARDWARE_USD_PER_HOUR": "0.5",  # the endpoint's; the notebook's own wins
        "COST_CAPACITY_TOKENS_PER_S": None}, monkeypatch)  # from metrics/benchmark.json

    text = printed(nb)
    assert wall_s < 60
    for name in FIGURES:
        png = figures / name
        assert png.stat().st_size > 10_000, name
        pixels = imread(str(png))
        assert pixels.ndim == 3 and pixels.shape[0] >= 250 and pixels.shape[1] >= 500, \
            (name, pixels.shape)
        assert float(pixels[..., :3].std()) > 0.05, name  # something is drawn on it
    summary = json.loads((figures / "summary.json").read_text(encoding="utf-8"))
    assert summary["ledger"] == backend
    assert summary["capacity_source"] == (
        "metrics/benchmark.json" if BENCHMARK.is_file() else "default")
    check_summary(summary, want, "1.006", capacity)

    # The printed tables carry the same figures: each top user's tokens and cost, and no more.
    for u in want.ranking[:10]:
        line = re.search(rf"^\s*\d+\s+{re.escape(u)}\s.*$", text, re.M)
        assert line is not None, u
        assert {str(want.users[u].tokens), usd(want.users[u].micro)} <= \
            set(line.group(0).split()), line.group(0)
    assert re.search(rf"^\s*\d+\s+{re.escape(want.ranking[10])}\s", text, re.M) is None
    for day, s in want.days.items():
        assert re.search(rf"^{day}\s+{s.requests}\s+{s.input_tokens}\s+{s.output_tokens}\s+"
                         rf"{s.tokens}\s+{re.escape(usd(s.micro))}$", text, re.M), day


@pytest.mark.slow
def test_by_default_the_last_30_days_in_the_ledger_with_days_without_traffic(
        tmp_path, monkeypatch):
    path = tmp_path / "ledger.sqlite3"
    led = open_ledger(str(path))
    led.start()
    try:
        events = []
        for user, ts, n_in, n_out in EXTRA:
            e = event(create_key(led, user)[0], ts, "sentiment", n_in, n_out)
            assert led.commit_event(e).result(timeout=30).status == "billed"
            events.append(e)
    finally:
        led.stop()
        led.close()
    # Newest day 2026-11-05, so from 10-07: rows on 10-07..10-10, 10-20, 10-21 and 11-05 only.
    want = expected_from(events, "2026-10-07", "2026-11-05")
    assert sum(s.requests == 0 for s in want.days.values()) >= 10
    assert set(want.users) == {"user-06", "user-07", "user-08", "user-09", "tie-a", "tie-b",
                               "after"}
    figures = tmp_path / "figures"

    nb, _ = run_notebook({
        "TOKENMETER_LEDGER": str(path), "COST_START": None, "COST_END": None,
        "COST_FIGURES_DIR": str(figures), "COST_HARDWARE_USD_PER_HOUR": None,
        "TOKENMETER_HARDWARE_USD_PER_HOUR": None, "COST_CAPACITY_TOKENS_PER_S": "1000"},
        monkeypatch)

    printed(nb)
    assert sorted(p.name for p in figures.iterdir()) == sorted(FIGURES + ("summary.json",))
    summary = json.loads((figures / "summary.json").read_text(encoding="utf-8"))
    assert summary["capacity_source"] == "parameter"
    check_summary(summary, want, "0.085", 1000.0)


def test_the_committed_notebook_is_clean_and_python38():
    """No outputs, no execution counts, a `parameters` cell first, code that Python 3.8 parses,
    and a small file: the repository holds the notebook's source only."""
    raw = NOTEBOOK.read_text(encoding="utf-8")
    assert len(raw.encode()) < 40_000
    nb = nbformat.reads(raw, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 6 and sum(c.cell_type == "markdown" for c in nb.cells) >= 5
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
        ast.parse(cell.source, feature_version=(3, 8))
    assert code[0].metadata.get("tags") == ["parameters"]
    for name in PARAMETERS:
        assert name in code[0].source, name
    assert '"0.085"' in code[0].source
    assert not any(c.get("attachments") for c in nb.cells)
    assert nb.metadata.kernelspec.name == "python3"
