"""The common shapes every scanner's output is parsed into: a Finding and a CheckResult.

Owns the severity scale and the three honest states of a check (ran / not run / error).
Must not run scanners or judge findings against the policy (policy.py does that).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

# Severities in increasing order; UNKNOWN is ranked by the policy (`unknown_severity`),
# because a vulnerability nobody rated is not known to be harmless.
SEVERITIES = ("LOW", "MEDIUM", "HIGH", "CRITICAL")
UNKNOWN = "UNKNOWN"
ALL_SEVERITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW", UNKNOWN)  # display order

RAN = "ran"
PARTIAL = "partial"  # ran, but some of its targets were not checked (named in `reason`)
NOT_RUN = "not run"  # could not run here (no target, no engine, no database): not a pass
ERROR = "error"  # should have run and broke (missing binary, crash): fails the scan
STATUSES = (RAN, PARTIAL, NOT_RUN, ERROR)


def normalise_severity(value: Optional[str]) -> str:
    text = (value or "").strip().upper()
    return text if text in SEVERITIES else UNKNOWN


@dataclass
class Finding:
    """One problem reported by one scanner, in the same shape whatever the scanner."""

    scanner: str  # the tool: trivy, hadolint, pip-audit, bandit
    check: str  # the check that produced it: trivy-secret, pip-audit-host, ...
    target: str  # what was scanned: a Dockerfile, a lock, the repository, an image
    rule_id: str  # the scanner's own id: DS-0002, DL3002, B602, aws-access-key-id, CVE-...
    severity: str  # one of SEVERITIES or UNKNOWN
    path: str  # file (relative to the scanned root) or package name
    line: Optional[int]
    message: str
    fix: Optional[str] = None

    @property
    def location(self) -> str:
        return f"{self.path}:{self.line}" if self.line else self.path

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["location"] = self.location
        return out


@dataclass
class CheckResult:
    """What one check did: what it checked, what it found, or why it could not run."""

    check: str
    scanner: str
    status: str
    checked: str = ""  # what was looked at, in words ("docker/Dockerfile", "203 dependencies")
    reason: str = ""  # why it did not run, broke, or is only partial
    findings: List[Finding] = field(default_factory=list)
    artifacts: List[str] = field(default_factory=list)  # files it wrote (SBOMs)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown check status {self.status!r}")

    @property
    def ran(self) -> bool:
        return self.status in (RAN, PARTIAL)

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["findings"] = [f.to_dict() for f in self.findings]
        return out


def not_run(check: str, scanner: str, reason: str, checked: str = "") -> CheckResult:
    return CheckResult(check=check, scanner=scanner, status=NOT_RUN, reason=reason,
                       checked=checked)


def error(check: str, scanner: str, reason: str, checked: str = "") -> CheckResult:
    return CheckResult(check=check, scanner=scanner, status=ERROR, reason=reason,
                       checked=checked)


def combine(check: str, scanner: str, parts: List[CheckResult]) -> CheckResult:
    """One result for a check that ran once per target (one lock each): every finding and
    artifact kept, `checked` and reasons joined. Broke anywhere: error. Nothing ran: not run.
    Some targets not checked: partial, naming them. Never better than its worst part."""
    findings = [f for r in parts for f in r.findings]
    artifacts = [a for r in parts for a in r.artifacts]
    # What was looked at: the parts that ran (the others are named in the reason).
    looked = [r for r in parts if r.ran] or parts
    checked = "; ".join(r.checked for r in looked if r.checked)
    gaps = [r for r in parts if r.status != RAN]
    reason = "; ".join(r.reason for r in gaps if r.reason)
    if any(r.status == ERROR for r in parts):
        status = ERROR
    elif not any(r.ran for r in parts):
        status = NOT_RUN
    elif gaps:
        status = PARTIAL
    else:
        status = RAN
    return CheckResult(check=check, scanner=scanner, status=status, checked=checked,
                       reason=reason, findings=findings, artifacts=artifacts)


def per_lock(check: str, scanner: str, locks: Sequence[Path], pattern: str,
             run_one: Callable[[Path], CheckResult], need_binary: Callable[[], object]
             ) -> CheckResult:
    """`run_one` on each lock, combined; "not run" naming `pattern` when there is none (a
    missing binary, `need_binary`, is still an error then)."""
    if not locks:
        need_binary()
        return not_run(check, scanner, f"{pattern} does not exist yet", checked=pattern)
    return combine(check, scanner, [run_one(lock) for lock in locks])
