"""The consolidated scan report: a JSON file, a Markdown file, and the short terminal table.

Says for every check what it checked, what it found and why it did not run. Must not
decide anything: the verdict comes from policy.py.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

from security.findings import ALL_SEVERITIES
from security.policy import BELOW, IGNORED, VIOLATION, Judged, Verdict

SHORT = {"CRITICAL": "CRIT", "HIGH": "HIGH", "MEDIUM": "MED", "LOW": "LOW", "UNKNOWN": "UNK"}


def _counts(verdict: Verdict, check: str) -> Dict[str, int]:
    """Open (not ignored) findings of one check by severity, plus the ignored count."""
    mine = [j for j in verdict.judged if j.finding.check == check]
    counts = Counter(j.finding.severity for j in mine if j.disposition != IGNORED)
    out = {sev: counts.get(sev, 0) for sev in ALL_SEVERITIES}
    out["ignored"] = sum(1 for j in mine if j.disposition == IGNORED)
    return out


def table(verdict: Verdict) -> str:
    """The short table `invoke scan` prints; a check that did not run shows no counts."""
    cols = [SHORT[s] for s in ALL_SEVERITIES] + ["ignored"]
    width = max([len(r.check) for r in verdict.results] + [5])
    lines = [f"{'check':<{width}}  {'status':<8}  " + " ".join(f"{c:>7}" for c in cols)]
    for r in verdict.results:
        if r.ran:
            c = _counts(verdict, r.check)
            cells = [str(c[s]) for s in ALL_SEVERITIES] + [str(c["ignored"])]
        else:
            cells = ["-"] * len(cols)
        lines.append(f"{r.check:<{width}}  {r.status:<8}  " + " ".join(f"{x:>7}" for x in cells))
    checked = [f"  {r.check}: {r.checked}" for r in verdict.results if r.ran]
    if checked:
        lines += ["", "checked:", *checked]
    notes = [f"  {r.check}: {r.status}: {r.reason}" for r in verdict.results
             if r.reason and r.status != "ran"]
    if notes:
        lines += ["", "not run, partial or broken (not checked, so not passed):", *notes]
    if verdict.unused:
        lines += ["", "ignore entries that matched nothing (their check did not run, or the "
                      "finding is gone):"]
        lines += [f"  {e.describe()}" for e in verdict.unused]
    if verdict.violations or verdict.expired:
        lines += ["", "policy violations:"]
        lines += [f"  {_one_line(j)}" for j in verdict.violations]
        lines += [f"  {e.describe()} expired on {e.expires} (reason was: {e.reason}); "
                  f"fix the finding or renew the entry with a new reason"
                  for e in verdict.expired]
    return "\n".join(lines)


def _one_line(j: Judged) -> str:
    f = j.finding
    fix = f" -> {f.fix}" if f.fix else ""
    return f"[{f.severity}] {f.check} {f.rule_id} {f.location}: {f.message}{fix}"


def to_dict(verdict: Verdict, meta: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "meta": meta,
        "verdict": {"status": verdict.status, "exit_code": verdict.exit_code,
                    "summary": verdict.summary()},
        "policy": {"source": verdict.policy.source, "fail_on": verdict.policy.fail_on,
                   "fail_on_by_scanner": verdict.policy.fail_on_by_scanner,
                   "unknown_severity": verdict.policy.unknown_severity,
                   "expired": [e.to_dict() for e in verdict.expired],
                   "unused": [e.to_dict() for e in verdict.unused]},
        # Findings are listed once, below, each with its check and its disposition.
        "checks": [{**{k: v for k, v in r.to_dict().items() if k != "findings"},
                    "counts": _counts(verdict, r.check) if r.ran else None}
                   for r in verdict.results],
        "findings": [{**j.finding.to_dict(), "disposition": j.disposition,
                      "ignored_by": j.ignored_by.to_dict() if j.ignored_by else None}
                     for j in verdict.judged],
    }


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(verdict: Verdict, meta: Dict[str, Any]) -> str:
    out: List[str] = [f"# Security scan: {verdict.status}", "",
                      f"{verdict.summary()}", "",
                      f"- when: {meta.get('when')}", f"- root: `{meta.get('root')}`",
                      f"- policy: `{verdict.policy.source}` (fails at "
                      f"{verdict.policy.fail_on}; by scanner: "
                      f"{verdict.policy.fail_on_by_scanner or 'none'}; UNKNOWN ranks as "
                      f"{verdict.policy.unknown_severity})", "",
                      "## Checks", "",
                      "| check | status | checked | " + " | ".join(ALL_SEVERITIES)
                      + " | ignored | reason |",
                      "|---|---|---|" + "---|" * (len(ALL_SEVERITIES) + 2)]
    for r in verdict.results:
        c = _counts(verdict, r.check) if r.ran else None
        cells = [str(c[s]) for s in ALL_SEVERITIES] + [str(c["ignored"])] if c \
            else ["-"] * (len(ALL_SEVERITIES) + 1)
        out.append(f"| {r.check} | {r.status} | {_md_escape(r.checked)} | "
                   + " | ".join(cells) + f" | {_md_escape(r.reason)} |")
    artifacts = [a for r in verdict.results for a in r.artifacts]
    if artifacts:
        out += ["", "SBOMs: " + ", ".join(f"`{a}`" for a in artifacts)]
    sections = [("Policy violations", VIOLATION), ("Below the threshold (reported only)", BELOW),
                ("Ignored by policy", IGNORED)]
    for title, disposition in sections:
        rows = [j for j in verdict.judged if j.disposition == disposition]
        out += ["", f"## {title} ({len(rows)})", ""]
        if not rows:
            out.append("none")
            continue
        out += ["| severity | check | rule | location | message | fix / ignore reason |",
                "|---|---|---|---|---|---|"]
        for j in rows:
            f = j.finding
            note = (f"{j.ignored_by.reason} (until {j.ignored_by.expires})"
                    if j.ignored_by else (f.fix or ""))
            out.append(f"| {f.severity} | {f.check} | {f.rule_id} | {_md_escape(f.location)} "
                       f"| {_md_escape(f.message)} | {_md_escape(note)} |")
    if verdict.expired or verdict.unused:
        out += ["", "## Ignore entries needing attention", ""]
        out += [f"- EXPIRED {e.describe()} on {e.expires}: {e.reason}" for e in verdict.expired]
        out += [f"- unused {e.describe()} (its check did not run, or the finding is gone): "
                f"{e.reason}" for e in verdict.unused]
    return "\n".join(out) + "\n"


def write(verdict: Verdict, out_dir: Path, root: Path) -> List[Path]:
    """scan-report.json and scan-report.md in `out_dir` (git-ignored security/reports/)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "root": str(root)}
    json_path = out_dir / "scan-report.json"
    md_path = out_dir / "scan-report.md"
    json_path.write_text(json.dumps(to_dict(verdict, meta), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown(verdict, meta), encoding="utf-8")
    return [json_path, md_path]

