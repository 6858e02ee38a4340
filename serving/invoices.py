"""Invoices from the ledger: one per user and calendar month (UTC), a line per model and unit
price, subtotal and total equal to the ledger's sums to the micro-USD, and a true-up line to the
monthly minimum where the price file sets one.

A closed month's invoice is issued once and stored in the ledger (table `invoices`): issuing it
again returns the same bytes and hash, whatever was written since. An open month can only be
previewed (status "preview", never stored). Rendered as JSON (the stored form), CSV, HTML and
PDF (HTML printed by headless Chromium).

It must not price anything anew: an amount is the sum of the per-request amounts the ledger
holds, each rounded once when it was billed (serving.pricing's rule), never re-rounded here.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

from serving.ledger import Ledger, month_bounds, now_iso
from serving.pricing import micro_to_str

# A request stamped at 23:59:59 commits up to BILLING_DEADLINE_S later: a month is closed, and
# its invoices final, this long after it ends.
CLOSE_GRACE = timedelta(minutes=10)
ROUNDING = ("each request's input and output cost is tokens x price / 1000, rounded half-up to "
            "a whole micro-USD when billed; invoice amounts are sums of those amounts")


class InvoiceError(ValueError):
    """A request an invoice cannot be made for (a month not closed yet); the message says what
    to do. A malformed period is ledger.month_bounds's ValueError."""


@dataclass(frozen=True)
class Issued:
    body: str  # canonical JSON: what is stored and hashed
    sha256: str
    final: bool

    @property
    def document(self) -> Dict[str, Any]:
        return json.loads(self.body)


def closes_at(period: str) -> datetime:
    return month_bounds(period)[1] + CLOSE_GRACE


def invoice_number(user: str, period: str) -> str:
    """Stable and unique per (user, period), whatever characters the user id holds."""
    return f"TM-{period.replace('-', '')}-{hashlib.sha256(user.encode()).hexdigest()[:10].upper()}"


def build(ledger: Ledger, user: str, period: str, currency: str, minimum_micro: int,
          issued_at: str, final: bool) -> Dict[str, Any]:
    """The invoice document of `user` for `period` from the ledger as it is now."""
    start, end = month_bounds(period)
    rows = ledger.invoice_lines(user, now_iso(start), now_iso(end))
    lines = []
    for r in rows:
        lines.append({
            "model": r["model"], "tier": r["tier"], "requests": r["requests"],
            "input_tokens": r["input_tokens"], "input_price_per_1k": r["input_price_per_1k"],
            "input_amount": micro_to_str(r["input_micro"]),
            "output_tokens": r["output_tokens"], "output_price_per_1k": r["output_price_per_1k"],
            "output_amount": micro_to_str(r["output_micro"]),
            "amount": micro_to_str(r["input_micro"] + r["output_micro"]),
        })
    subtotal = sum(r["input_micro"] + r["output_micro"] for r in rows)
    true_up = max(0, minimum_micro - subtotal)
    return {
        "invoice": invoice_number(user, period), "status": "final" if final else "preview",
        "user": user, "period": period, "period_start": now_iso(start)[:10],
        "period_end_exclusive": now_iso(end)[:10], "issued_at": issued_at,
        "currency": currency, "lines": lines,
        "requests": sum(r["requests"] for r in rows),
        "input_tokens": sum(r["input_tokens"] for r in rows),
        "output_tokens": sum(r["output_tokens"] for r in rows),
        "subtotal": micro_to_str(subtotal),
        "monthly_minimum": micro_to_str(minimum_micro),
        "true_up": micro_to_str(true_up),
        "total": micro_to_str(subtotal + true_up),
        "tiers_applied": sorted({r["tier"] for r in rows}),
        "rounding": ROUNDING,
    }


def canonical(doc: Dict[str, Any]) -> str:
    return json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def issue(ledger: Ledger, user: str, period: str, currency: str = "USD",
          minimum_micro: int = 0, preview: bool = False,
          now: Optional[datetime] = None) -> Issued:
    """The final invoice of a closed month (stored on first issue, then returned as stored), or
    with `preview` a draft of any month that is not stored."""
    now = now or datetime.now(timezone.utc)
    closed = now >= closes_at(period)
    if preview:
        body = canonical(build(ledger, user, period, currency, minimum_micro, now_iso(now),
                               final=False))
        return Issued(body, hashlib.sha256(body.encode()).hexdigest(), final=False)
    if not closed:
        raise InvoiceError(
            f"{period} is not closed yet (it closes {closes_at(period):%Y-%m-%d %H:%M} UTC); "
            "--preview shows a draft that is not stored")
    stored = ledger.stored_invoice(user, period)
    if stored is None:
        doc = build(ledger, user, period, currency, minimum_micro, now_iso(now), final=True)
        body = canonical(doc)
        # First writer wins (two issuers at once store one invoice); read back what is stored.
        ledger.store_invoice(user, period, doc["invoice"], doc["issued_at"], body,
                             hashlib.sha256(body.encode()).hexdigest())
        stored = ledger.stored_invoice(user, period)
        assert stored is not None
    body, sha = stored
    return Issued(body, sha, final=True)


CSV_COLUMNS = ["invoice", "user", "period", "line", "model", "tier", "requests", "input_tokens",
               "input_price_per_1k", "input_amount", "output_tokens", "output_price_per_1k",
               "output_amount", "amount", "currency"]


def to_csv(doc: Dict[str, Any]) -> str:
    """Line items, then the true-up, subtotal and total rows (for chargeback spreadsheets)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    head = {k: doc[k] for k in ("invoice", "user", "period", "currency")}
    for i, line in enumerate(doc["lines"], 1):
        w.writerow({**head, "line": i, **line})
    for name in ("true_up", "subtotal", "total"):
        w.writerow({**head, "line": name, "amount": doc[name]})
    return buf.getvalue()


def _tier_note(tier: str) -> str:
    return "" if tier == "standard" else f" <small>({html.escape(tier.replace('_', ' '))})</small>"


def to_html(doc: Dict[str, Any]) -> str:
    """A self-contained page a customer would accept as a bill (no script, no remote asset)."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(line['model'])}{_tier_note(line['tier'])}</td>"
        f"<td class=n>{line['requests']:,}</td>"
        f"<td class=n>{line['input_tokens']:,}</td><td class=n>{e(line['input_price_per_1k'])}"
        f"</td><td class=n>{e(line['input_amount'])}</td>"
        f"<td class=n>{line['output_tokens']:,}</td><td class=n>"
        f"{e(line['output_price_per_1k'])}</td><td class=n>{e(line['output_amount'])}</td>"
        f"<td class=n>{e(line['amount'])}</td></tr>" for line in doc["lines"])
    if not doc["lines"]:
        rows = "<tr><td colspan=9>No usage in this period.</td></tr>"
    status = "" if doc["status"] == "final" else \
        "<p class=draft>PREVIEW: the month is open; this is not a final invoice.</p>"
    cur = e(doc["currency"])
    total_rows = "".join(
        f"<tr class=sum><td colspan=8>{label}</td><td class=n>{e(doc[key])}</td></tr>"
        for label, key in (("Subtotal", "subtotal"),
                           (f"True-up to the monthly minimum of {e(doc['monthly_minimum'])}",
                            "true_up"),
                           (f"Total ({cur})", "total")))
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>Invoice {e(doc['invoice'])}</title>
<style>
body{{font-family:sans-serif;margin:2.5em;color:#222}} h1{{margin:0 0 .2em}}
table{{border-collapse:collapse;width:100%;margin-top:1.5em}}
th,td{{border-bottom:1px solid #ccc;padding:.45em .6em;text-align:left}}
th{{background:#f2f2f2}} .n{{text-align:right;font-variant-numeric:tabular-nums}}
tr.sum td{{font-weight:bold;border-bottom:none}} .meta td{{border:none;padding:.1em .6em .1em 0}}
.draft{{color:#b00;font-weight:bold}} .note{{color:#666;font-size:.85em;margin-top:2em}}
</style></head><body>
<h1>Invoice {e(doc['invoice'])}</h1>{status}
<table class=meta>
<tr><td>Customer</td><td>{e(doc['user'])}</td></tr>
<tr><td>Period</td><td>{e(doc['period_start'])} to {e(doc['period_end_exclusive'])}
(exclusive), UTC</td></tr>
<tr><td>Issued</td><td>{e(doc['issued_at'])}</td></tr>
<tr><td>Requests</td><td>{doc['requests']:,}</td></tr>
</table>
<table>
<tr><th>Model</th><th class=n>Requests</th><th class=n>Input tokens</th>
<th class=n>Price / 1K</th><th class=n>Input</th><th class=n>Output tokens</th>
<th class=n>Price / 1K</th><th class=n>Output</th><th class=n>Amount ({cur})</th></tr>
{rows}
{total_rows}
</table>
<p class=note>Rounding: {e(doc['rounding'])}.</p>
</body></html>
"""


def to_pdf(doc: Dict[str, Any]) -> bytes:
    """The HTML invoice printed to PDF by headless Chromium (Debian's `chromium`), run as a
    subprocess. The stored JSON is the invoice of record; a PDF is a rendering of it (Chromium
    stamps its creation time, so two prints differ in those bytes only)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        raise InvoiceError("--format pdf needs Chromium (`apt-get install chromium`); "
                           "--format html gives the same page")
    with tempfile.TemporaryDirectory(prefix="tm-invoice-") as tmp:
        page, pdf = Path(tmp) / "invoice.html", Path(tmp) / "invoice.pdf"
        page.write_text(to_html(doc), encoding="utf-8")
        r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                            "--no-pdf-header-footer", f"--print-to-pdf={pdf}", page.as_uri()],
                           capture_output=True, text=True, timeout=120)
        if r.returncode != 0 or not pdf.is_file():
            raise InvoiceError(f"Chromium could not print the invoice (exit {r.returncode})")
        return pdf.read_bytes()


RENDERERS = {"json": lambda doc: canonical(doc) + "\n", "csv": to_csv, "html": to_html}


def users_in(ledger: Ledger, period: str) -> List[str]:
    start, end = month_bounds(period)
    return ledger.users_billed(now_iso(start), now_iso(end))
