"""Invoices (serving/invoices.py, `python -m serving invoice`) against a generated month of
traffic: three users, four keys, two models, a price change in the middle of the month and
one user crossing a volume tier, written through the real ledger writer into a real SQLite
file.

Expected figures come from the generated events themselves (amounts rounded half-up by this
test, summed in Python) and from plain SQL on the file, never from the code under test:
totals equal the ledger to the micro-USD, a closed month's invoice is stored once and re-issued
byte for byte (also after a late row), an open month is refused as final and only previewed,
and the monthly minimum is trued up.
"""

from __future__ import annotations

import random
import shutil
import sqlite3
import subprocess
from collections import defaultdict
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Iterator, List, Tuple

import pytest

from serving.invoices import InvoiceError, issue, to_csv, to_html
from serving.keys import create_key
from serving.ledger import BillingEvent, Ledger, open_ledger
from tests.serving.conftest import ModelFacts, cli, priced_event

PERIOD = "2026-10"
NOW = datetime(2026, 12, 1, 9, 0, tzinfo=timezone.utc)  # October is closed by then
# (model, input price, output price) in force before / from the 16th.
PRICES = {"sentiment": (("0.002", "0.002"), ("0.0025", "0.002")),
          "sentiment-large": (("0.010", "0.030"), ("0.010", "0.030"))}
USERS = {"acme": 2, "globex": 1, "initech": 1}  # keys per user
EVENTS = {"acme": 120, "globex": 60, "initech": 3}
# acme's requests after its month reached this many tokens are at the volume tier's rates.
VOLUME_EDGE, VOLUME_USER = 12_000, "acme"
VOLUME_PRICES = {"sentiment": ("0.0015", "0.0015"), "sentiment-large": ("0.008", "0.024")}


def micro(tokens: int, price: str) -> int:
    return ModelFacts.side_micro(tokens, Decimal(price))  # the test's own half-up rounding


def event(key, ts: str, model: str, n_in: int, n_out: int) -> BillingEvent:
    """At the price in force on the event's day (PRICES changes on the 16th)."""
    p_in, p_out = PRICES[model][0 if int(ts[8:10]) < 16 else 1]
    return priced_event(key, ts, model, n_in, n_out, p_in, p_out, "invoice-test")


def by_volume(events: List[BillingEvent]) -> List[BillingEvent]:
    """VOLUME_USER's events, in time order, repriced at the volume tier once the tokens billed
    before them reach VOLUME_EDGE (graduated by request, as the README says)."""
    month_tokens, out = 0, []
    for e in sorted(events, key=lambda e: e.ts):
        if month_tokens >= VOLUME_EDGE:
            p_in, p_out = VOLUME_PRICES[e.model]
            e = priced_event(SimpleNamespace(id=e.key_id, user_id=e.user_id), e.ts, e.model,
                             e.input_tokens, e.output_tokens, p_in, p_out, "invoice-test")
            e.price_tier = "volume_1"
        month_tokens += e.input_tokens + e.output_tokens
        out.append(e)
    return out


def write_month(led: Ledger) -> List[BillingEvent]:
    """A month of generated traffic (plus a row on each side of it) through the real writer;
    the events of PERIOD."""
    rng = random.Random(11)
    events: List[BillingEvent] = []
    for user, n_keys in USERS.items():
        keys = [create_key(led, user)[0] for _ in range(n_keys)]
        mine = []
        for i in range(EVENTS[user]):
            ts = f"{PERIOD}-{rng.randint(1, 31):02d}T{rng.randint(0, 23):02d}:{i % 60:02d}:00Z"
            mine.append(event(rng.choice(keys), ts, rng.choice(list(PRICES)),
                              rng.randint(3, 400), rng.randint(1, 24)))
        events += by_volume(mine) if user == VOLUME_USER else mine
        events.append(event(keys[0], "2026-09-30T23:59:59.999999Z", "sentiment", 50, 3))
        events.append(event(keys[0], "2026-11-01T00:00:00.000000Z", "sentiment", 50, 3))
    for e in events:
        assert led.commit_event(e).result(timeout=30).status == "billed"
    return [e for e in events if e.ts.startswith(PERIOD)]


@pytest.fixture
def month(tmp_path) -> Iterator[Tuple[Ledger, Path, List[BillingEvent]]]:
    """A ledger holding a month of traffic, plus a few rows in the months around it."""
    path = tmp_path / "ledger.sqlite3"
    led = open_ledger(str(path))
    led.start()
    events = write_month(led)
    yield led, path, events
    led.stop()
    led.close()


def expected_lines(events: List[BillingEvent], user: str) -> Dict[tuple, Dict[str, int]]:
    out: Dict[tuple, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for e in events:
        if e.user_id == user:
            line = out[(e.model, e.price_tier or "standard", e.input_price_per_1k,
                        e.output_price_per_1k)]
            line["requests"] += 1
            line["input_tokens"] += e.input_tokens
            line["output_tokens"] += e.output_tokens
            line["input_micro"] += e.input_cost_micro
            line["output_micro"] += e.output_cost_micro
    return out


def usd(micro_amount: int) -> str:
    return f"{Decimal(micro_amount) / 1_000_000:.6f}"


def test_totals_equal_the_ledger_to_the_micro_usd(month):
    led, path, events = month
    with sqlite3.connect(path) as db:
        ledger_sums = dict(db.execute(
            "SELECT user_id, SUM(cost_micro) FROM billing_events"
            " WHERE ts >= '2026-10-01' AND ts < '2026-11-01' GROUP BY user_id").fetchall())
    for user in USERS:
        doc = issue(led, user, PERIOD, now=NOW).document
        want = expected_lines(events, user)
        assert len(want) >= 3  # both models, and sentiment at both prices
        got = {(ln["model"], ln["tier"], ln["input_price_per_1k"], ln["output_price_per_1k"]): ln
               for ln in doc["lines"]}
        assert set(got) == set(want)
        for k, w in want.items():
            g = got[k]
            assert (g["requests"], g["input_tokens"], g["output_tokens"]) == \
                (w["requests"], w["input_tokens"], w["output_tokens"])
            assert (g["input_amount"], g["output_amount"], g["amount"]) == (
                usd(w["input_micro"]), usd(w["output_micro"]),
                usd(w["input_micro"] + w["output_micro"]))
        total = sum(e.cost_micro for e in events if e.user_id == user)
        assert doc["subtotal"] == doc["total"] == usd(total) == usd(ledger_sums[user])
        assert doc["status"] == "final" and doc["true_up"] == "0.000000"
        assert doc["requests"] == EVENTS[user]
        # acme crossed the volume edge mid-month: both tiers, for both models.
        tiers = {(k[0], k[1]) for k in want}
        assert doc["tiers_applied"] == sorted({t for _, t in tiers})
        if user == VOLUME_USER:
            assert tiers == {(m, t) for m in PRICES for t in ("standard", "volume_1")}
            crossed = min(e.ts for e in events if e.price_tier == "volume_1")
            assert f"{PERIOD}-05" < crossed < f"{PERIOD}-27", crossed  # mid-month


def test_a_closed_month_is_issued_once_and_reissued_byte_for_byte(month, tmp_path):
    led, path, _ = month
    first = issue(led, "acme", PERIOD, now=NOW)
    key = create_key(led, "acme")[0]
    late = event(key, f"{PERIOD}-31T23:59:59.900000Z", "sentiment", 999, 9)
    assert led.commit_event(late).result(timeout=30).status == "billed"  # a late row
    again = issue(led, "acme", PERIOD, now=NOW.replace(day=20))
    assert (again.body, again.sha256) == (first.body, first.sha256)
    assert to_csv(again.document) == to_csv(first.document)
    assert to_html(again.document) == to_html(first.document)
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM invoices").fetchone()[0] == 1
    # The late row shows in a preview, never in the stored invoice.
    preview = issue(led, "acme", PERIOD, preview=True, now=NOW).document
    assert preview["status"] == "preview"
    assert Decimal(preview["total"]) - Decimal(first.document["total"]) == \
        Decimal(late.cost_micro) / 1_000_000


def test_an_open_month_is_refused_as_final_and_only_previewed(month, tmp_path):
    led, path, _ = month
    with pytest.raises(InvoiceError, match="not closed yet.*--preview"):
        issue(led, "acme", "2026-11", now=datetime(2026, 11, 20, tzinfo=timezone.utc))
    # Closed only after the grace that lets a request stamped 23:59:59 commit.
    just_after = datetime(2026, 11, 1, 0, 5, tzinfo=timezone.utc)
    with pytest.raises(InvoiceError):
        issue(led, "acme", PERIOD, now=just_after)
    draft = issue(led, "acme", "2026-11", preview=True, now=just_after).document
    assert draft["status"] == "preview" and draft["requests"] == 1  # the 1 Nov 00:00 row
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM invoices").fetchone()[0] == 0
    assert issue(led, "acme", PERIOD,
                 now=datetime(2026, 11, 1, 0, 11, tzinfo=timezone.utc)).final


def test_the_monthly_minimum_is_trued_up(month):
    led, _, events = month
    minimum = 50_000  # $0.05
    small = sum(e.cost_micro for e in events if e.user_id == "initech")
    big = sum(e.cost_micro for e in events if e.user_id == "acme")
    assert small < minimum < big  # the fixture crosses the minimum both ways
    doc = issue(led, "initech", PERIOD, minimum_micro=minimum, now=NOW).document
    assert (doc["subtotal"], doc["true_up"], doc["total"]) == \
        (usd(small), usd(minimum - small), usd(minimum))
    doc = issue(led, "acme", PERIOD, minimum_micro=minimum, now=NOW).document
    assert (doc["true_up"], doc["total"]) == ("0.000000", usd(big))


def test_the_cli_writes_each_users_invoice_and_refuses_what_it_cannot_issue(month, tmp_path):
    led, path, events = month
    prices = tmp_path / "pricing.yaml"
    prices.write_text('currency: USD\nmonthly_minimum_usd: "0.05"\nmodels:\n  sentiment:\n'
                      '    input_per_1k: "0.002"\n    output_per_1k: "0.002"\n',
                      encoding="utf-8")
    env = {"TOKENMETER_PRICING_FILE": str(prices)}
    out = tmp_path / "invoices"
    cli(str(path), "invoice", "--period", PERIOD, "--format", "html", "--out", str(out), env=env)
    files = sorted(out.iterdir())
    assert [f.name for f in files] == [f"invoice-{PERIOD}-{u}.html" for u in sorted(USERS)]
    page = (out / f"invoice-{PERIOD}-initech.html").read_text(encoding="utf-8")
    assert "True-up to the monthly minimum of 0.050000" in page and "PREVIEW" not in page
    before = {f.name: f.read_bytes() for f in files}
    cli(str(path), "invoice", "--period", PERIOD, "--format", "html", "--out", str(out), env=env)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # re-issued, same bytes
    csv_text = cli(str(path), "invoice", "--period", PERIOD, "--user", "globex", "--format",
                   "csv", env=env).stdout
    total_row = csv_text.strip().splitlines()[-1].split(",")
    assert total_row[3] == "total" and total_row[-2] == usd(
        sum(e.cost_micro for e in events if e.user_id == "globex"))
    for args, says in ((["--period", "2999-01", "--user", "acme"], "not closed yet"),
                       (["--period", "2026-13", "--user", "acme"], "period must be YYYY-MM"),
                       (["--period", PERIOD], "give --user")):
        r = cli(str(path), "invoice", *args, env=env, check=False)
        assert r.returncode == 2 and says in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1  # one line, no traceback


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Marks, not skips in the body: scripts/system-packages.sh installs both; where they are
# missing the tests are reported as skipped at collection, naming the package.
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="needs chromium (Debian's `chromium`; scripts/system-packages.sh)")
needs_pdftoppm = pytest.mark.skipif(
    shutil.which("pdftoppm") is None or shutil.which("pdftotext") is None,
    reason="needs pdftoppm and pdftotext (Debian's `poppler-utils`; scripts/system-packages.sh)")


def screenshot(html_file: Path, png: Path) -> None:
    """Headless Chromium draws the page as a customer's browser would (no network)."""
    r = subprocess.run([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                        "--hide-scrollbars", "--window-size=1100,760",
                        f"--screenshot={png}", html_file.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and png.is_file(), r.stderr[-2000:]


@needs_chromium
def test_the_html_invoice_renders_as_a_bill(month, tmp_path):
    led, _, _ = month
    page = tmp_path / "invoice.html"
    page.write_text(to_html(issue(led, "acme", PERIOD, minimum_micro=50_000,
                                  now=NOW).document), encoding="utf-8")
    png = tmp_path / "invoice.png"
    screenshot(page, png)
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert img.shape[0] >= 700 and img.shape[1] >= 1000
    # Not a blank page: dark text on light ground covers a real share of it.
    dark = (img[..., :3].mean(axis=2) < 0.5).mean()
    assert 0.005 < dark < 0.5, dark


@needs_chromium
@needs_pdftoppm
def test_the_pdf_invoice_prints_the_same_bill(month, tmp_path):
    _, path, events = month
    out = tmp_path / "pdf"
    cli(str(path), "invoice", "--period", PERIOD, "--user", "globex", "--format", "pdf",
        "--out", str(out))
    pdf = out / f"invoice-{PERIOD}-globex.pdf"
    assert pdf.read_bytes().startswith(b"%PDF-")
    r = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True)
    total = usd(sum(e.cost_micro for e in events if e.user_id == "globex"))
    assert r.returncode == 0 and "Invoice TM-202610-" in r.stdout and total in r.stdout
    subprocess.run(["pdftoppm", "-png", "-r", "50", "-singlefile", str(pdf),
                    str(tmp_path / "page")], check=True, timeout=60)
    import matplotlib.image

    img = matplotlib.image.imread(str(tmp_path / "page.png"))
    dark = (img[..., :3].mean(axis=2) < 0.5).mean()
    assert 0.002 < dark < 0.5, dark  # a printed page, not a blank one


def test_a_long_context_request_is_its_own_line_and_tier(month):
    led, _, events = month
    key = create_key(led, "umbrella")[0]
    plain = event(key, f"{PERIOD}-03T10:00:00Z", "sentiment", 40, 2)
    long = event(key, f"{PERIOD}-04T10:00:00Z", "sentiment", 900, 2)
    long.input_price_per_1k, long.output_price_per_1k = "0.003", "0.003"  # the tier's rates
    long.input_cost_micro, long.output_cost_micro = micro(900, "0.003"), micro(2, "0.003")
    long.cost_micro, long.price_tier = long.input_cost_micro + long.output_cost_micro, \
        "long_context"
    for e in (plain, long):
        assert led.commit_event(e).result(timeout=30).status == "billed"
    doc = issue(led, "umbrella", PERIOD, now=NOW).document
    assert doc["tiers_applied"] == ["long_context", "standard"]
    assert [(ln["tier"], ln["input_price_per_1k"], ln["input_tokens"], ln["amount"])
            for ln in doc["lines"]] == [
        ("long_context", "0.003", 900, usd(long.cost_micro)),
        ("standard", "0.002", 40, usd(plain.cost_micro))]
    assert doc["total"] == usd(plain.cost_micro + long.cost_micro)
    assert "(long context)" in to_html(doc) and ",long_context," in to_csv(doc)
