"""The scan policy (security/policy.yaml) and the verdict it gives on a set of check results.

Owns severity thresholds and the ignore list, where every entry needs a reason and an
expiry date, and an expired entry fails the scan. Must not run scanners.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from security.findings import ERROR, NOT_RUN, PARTIAL, SEVERITIES, UNKNOWN, CheckResult, Finding

SCANNERS = ("trivy", "hadolint", "pip-audit", "bandit", "cyclonedx-py")
ENTRY_KEYS = {"id", "scanner", "path", "reason", "expires"}
TOP_KEYS = {"fail_on", "fail_on_by_scanner", "unknown_severity", "ignore"}

VIOLATION = "violation"
BELOW = "below threshold"
IGNORED = "ignored"


class PolicyError(Exception):
    """policy.yaml is malformed; the message names the file, the entry and the fix."""


@dataclass(frozen=True)
class IgnoreEntry:
    """Accept one finding (or one rule, on some paths) until `expires`, for `reason`."""

    rule: str
    reason: str
    expires: dt.date
    scanner: Optional[str] = None  # a scanner (trivy) or a check (trivy-secret)
    path: Optional[str] = None  # fnmatch pattern on the finding's path
    index: int = 0  # position in the file, for messages

    def expired(self, today: dt.date) -> bool:
        return today > self.expires  # valid through its expiry day

    def matches(self, f: Finding) -> bool:
        if self.rule.lower() != f.rule_id.lower():
            return False
        if self.scanner and self.scanner not in (f.scanner, f.check):
            return False
        return not self.path or fnmatch.fnmatch(f.path, self.path)

    def describe(self) -> str:
        scope = " ".join(x for x in (self.scanner, self.path) if x)
        return f"ignore[{self.index}] {self.rule}{' (' + scope + ')' if scope else ''}"

    def to_dict(self) -> Dict[str, Any]:
        return {"id": self.rule, "scanner": self.scanner, "path": self.path,
                "reason": self.reason, "expires": self.expires.isoformat()}


@dataclass
class Policy:
    fail_on: str = "HIGH"
    fail_on_by_scanner: Dict[str, str] = field(default_factory=dict)
    unknown_severity: str = "HIGH"
    ignore: List[IgnoreEntry] = field(default_factory=list)
    source: str = "<defaults>"

    def threshold(self, scanner: str) -> str:
        return self.fail_on_by_scanner.get(scanner, self.fail_on)

    def rank(self, severity: str) -> int:
        sev = self.unknown_severity if severity == UNKNOWN else severity
        return SEVERITIES.index(sev)

    def fails(self, f: Finding) -> bool:
        return self.rank(f.severity) >= SEVERITIES.index(self.threshold(f.scanner))


def _severity(value: Any, where: str) -> str:
    text = str(value).strip().upper()
    if text not in SEVERITIES:
        raise PolicyError(f"{where}: {value!r} is not one of {', '.join(SEVERITIES)}")
    return text


def _date(value: Any, where: str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise PolicyError(f"{where}: expires {value!r} is not a date (write YYYY-MM-DD)") \
            from None


def _reject_unknown(data: dict, allowed, where: str) -> None:
    unknown = set(data) - set(allowed)
    if unknown:
        raise PolicyError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: "
                          f"{sorted(allowed)}")


def _entry(raw: Any, index: int, source: str) -> IgnoreEntry:
    where = f"{source}: ignore[{index}]"
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: each entry is a mapping with id, reason, expires")
    _reject_unknown(raw, ENTRY_KEYS, where)
    for key in ("id", "reason", "expires"):
        if not str(raw.get(key) or "").strip():
            raise PolicyError(f"{where}: '{key}' is required (every ignore needs a rule id, "
                              f"a reason and an expiry date)")
    scanner = raw.get("scanner")
    return IgnoreEntry(rule=str(raw["id"]).strip(), reason=str(raw["reason"]).strip(),
                       expires=_date(raw["expires"], where),
                       scanner=str(scanner).strip() if scanner else None,
                       path=str(raw["path"]).strip() if raw.get("path") else None,
                       index=index)


def parse(data: Any, source: str = "<policy>") -> Policy:
    if not isinstance(data, dict):
        raise PolicyError(f"{source}: expected a mapping with {sorted(TOP_KEYS)}")
    _reject_unknown(data, TOP_KEYS, source)
    if "fail_on" not in data:
        raise PolicyError(f"{source}: 'fail_on' is required (the severity that fails the scan)")
    by_scanner = data.get("fail_on_by_scanner") or {}
    if not isinstance(by_scanner, dict):
        raise PolicyError(f"{source}: fail_on_by_scanner maps a scanner to a severity")
    for name in by_scanner:
        if name not in SCANNERS:
            raise PolicyError(f"{source}: fail_on_by_scanner: unknown scanner {name!r}; "
                              f"one of {', '.join(SCANNERS)}")
    entries = data.get("ignore") or []
    if not isinstance(entries, list):
        raise PolicyError(f"{source}: 'ignore' is a list of entries")
    return Policy(
        fail_on=_severity(data["fail_on"], f"{source}: fail_on"),
        fail_on_by_scanner={k: _severity(v, f"{source}: fail_on_by_scanner.{k}")
                            for k, v in by_scanner.items()},
        unknown_severity=_severity(data.get("unknown_severity", "HIGH"),
                                   f"{source}: unknown_severity"),
        ignore=[_entry(raw, i, source) for i, raw in enumerate(entries)],
        source=source)


def load(path: Path) -> Policy:
    if not Path(path).is_file():
        raise PolicyError(f"policy file {path} not found (pass --policy FILE)")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise PolicyError(f"{path}: not valid YAML: {exc}") from None
    return parse(data, str(path))


@dataclass
class Judged:
    finding: Finding
    disposition: str  # VIOLATION, BELOW or IGNORED
    ignored_by: Optional[IgnoreEntry] = None


@dataclass
class Verdict:
    results: List[CheckResult]
    judged: List[Judged]
    expired: List[IgnoreEntry]
    unused: List[IgnoreEntry]
    policy: Policy

    @property
    def violations(self) -> List[Judged]:
        return [j for j in self.judged if j.disposition == VIOLATION]

    @property
    def errors(self) -> List[CheckResult]:
        return [r for r in self.results if r.status == ERROR]

    @property
    def not_run(self) -> List[CheckResult]:
        return [r for r in self.results if r.status == NOT_RUN]

    @property
    def gaps(self) -> List[CheckResult]:
        """Checks that did not run, or ran on only part of their targets."""
        return [r for r in self.results if r.status in (NOT_RUN, PARTIAL)]

    @property
    def failed(self) -> bool:
        return bool(self.violations or self.expired)

    @property
    def status(self) -> str:
        if self.failed:
            return "FAILED"
        if self.errors:
            return "ERROR"
        if not any(r.ran for r in self.results):
            return "NOTHING CHECKED"
        return "PASSED (INCOMPLETE)" if self.gaps else "PASSED"

    @property
    def exit_code(self) -> int:
        """1: policy violation; 2: a check broke, or no check could run; 0: passed (the
        checks that did not run are listed, and are not counted as passed)."""
        if self.failed:
            return 1
        if self.errors or not any(r.ran for r in self.results):
            return 2
        return 0

    def summary(self) -> str:
        ran = [r for r in self.results if r.ran]
        parts = [f"{self.status}:"]
        if self.failed:
            parts.append(f"{len(self.violations)} finding(s) at or above the policy "
                         f"threshold, {len(self.expired)} expired ignore entries")
        else:
            parts.append(f"no policy violation in the {len(ran)} check(s) that ran")
        if self.errors:
            parts.append(f"; {len(self.errors)} check(s) broke "
                         f"({', '.join(r.check for r in self.errors)})")
        if self.not_run:
            parts.append(f"; {len(self.not_run)} check(s) did NOT run, so nothing they cover "
                         f"was checked ({', '.join(r.check for r in self.not_run)})")
        partial = [r.check for r in self.gaps if r.status == PARTIAL]
        if partial:
            parts.append(f"; only partly checked: {', '.join(partial)}")
        return " ".join(parts).replace(" ;", ";")


def evaluate(results: List[CheckResult], policy: Policy,
             today: Optional[dt.date] = None) -> Verdict:
    today = today or dt.date.today()
    live = [e for e in policy.ignore if not e.expired(today)]
    expired = [e for e in policy.ignore if e.expired(today)]
    used = set()
    judged: List[Judged] = []
    for result in results:
        for f in result.findings:
            entry = next((e for e in live if e.matches(f)), None)
            if entry is not None:
                used.add(entry.index)
                judged.append(Judged(f, IGNORED, entry))
            else:
                # An expired entry no longer hides its finding: both count against the scan.
                judged.append(Judged(f, VIOLATION if policy.fails(f) else BELOW))
    unused = [e for e in live if e.index not in used]
    return Verdict(results=results, judged=judged, expired=expired, unused=unused,
                   policy=policy)
