"""Usage reports over the ledger for admins: requests, tokens and cost grouped by user, key or
model per UTC day or month, the top users of a period, and CSV for chargeback.

Pure aggregation of rows the ledger returns (one query, grouped by day, user, key and model);
it must not know HTTP or price anything: costs are the ledger's billed micro-USD, summed.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Dict, Iterable, List, Sequence, Tuple

from serving.pricing import micro_to_str

GROUPS = ("user", "key", "model")
# The columns naming a group in a report row (a key row also names its user).
GROUP_COLUMNS = {"user": ["user"], "key": ["key_id", "user"], "model": ["model"]}
GRANULARITIES = ("day", "month")
FIELDS = ("requests", "input_tokens", "output_tokens", "cost_micro")


def aggregate(rows: Iterable[Dict[str, Any]], group_by: str, granularity: str
              ) -> List[Dict[str, Any]]:
    """Rows of `ledger.daily_usage` summed per (period, group); sorted by period, then group."""
    assert group_by in GROUPS and granularity in GRANULARITIES
    sums: Dict[Tuple[str, ...], Dict[str, int]] = {}
    for r in rows:
        period = r["date"] if granularity == "day" else r["date"][:7]
        group: Tuple[str, ...] = {"user": (r["user"],), "key": (r["key_id"], r["user"]),
                                  "model": (r["model"],)}[group_by]
        acc = sums.setdefault((period,) + group, dict.fromkeys(FIELDS, 0))
        for f in FIELDS:
            acc[f] += int(r[f])
    out = []
    names = GROUP_COLUMNS[group_by]
    for k in sorted(sums):
        row: Dict[str, Any] = {"period": k[0], **dict(zip(names, k[1:])), **sums[k]}
        out.append(row)
    return out


def top_users(rows: Iterable[Dict[str, Any]], n: int) -> List[Dict[str, Any]]:
    """The n users with the highest billed cost (then tokens, then id), with their totals."""
    per_user = aggregate(rows, "user", "month")
    totals: Dict[str, Dict[str, int]] = {}
    for r in per_user:
        acc = totals.setdefault(r["user"], dict.fromkeys(FIELDS, 0))
        for f in FIELDS:
            acc[f] += r[f]
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1]["cost_micro"],
                                                     -(kv[1]["input_tokens"]
                                                       + kv[1]["output_tokens"]), kv[0]))
    return [{"rank": i, "user": u, **t} for i, (u, t) in enumerate(ranked[:n], 1)]


def present(row: Dict[str, Any], currency: str) -> Dict[str, Any]:
    """A row as answered: total tokens added, micro-USD as a six-decimal string."""
    out = {k: v for k, v in row.items() if k != "cost_micro"}
    out["total_tokens"] = int(row["input_tokens"]) + int(row["output_tokens"])
    out["cost"] = micro_to_str(int(row["cost_micro"]))
    out["currency"] = currency
    return out


def to_csv(rows: Sequence[Dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n",
                       extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
