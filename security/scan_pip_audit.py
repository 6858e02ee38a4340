"""pip-audit by subprocess on the host lock and each image lock, judged by what it really audited.

pip-audit prints "No known vulnerabilities found" and exits 0 even when it skipped every
dependency (no vulnerability service reachable): we count the skips in its JSON, and a lock
with nothing audited is "not run". Must not call a skipped dependency clean.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Dict, List

from security.findings import (
    PARTIAL,
    RAN,
    UNKNOWN,
    CheckResult,
    Finding,
    error,
    not_run,
    per_lock,
)
from security.targets import Targets
from security.tools import find_binary, run_tool

SCANNER = "pip-audit"
TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 15


def interpret(doc: Dict[str, Any], check: str, lock_name: str) -> CheckResult:
    """A CheckResult from pip-audit's JSON: findings, and honest counts of what was skipped."""
    deps: List[Dict[str, Any]] = doc.get("dependencies") or []
    skipped = [d for d in deps if d.get("skip_reason")]
    audited = [d for d in deps if not d.get("skip_reason")]
    if not deps:
        return not_run(check, SCANNER, f"pip-audit found no dependency in {lock_name}",
                       checked=lock_name)
    if not audited:
        # Every skip reason names its package; the shared part says why.
        why = str(skipped[0]["skip_reason"]).rsplit(": ", 1)[0]
        return not_run(check, SCANNER, f"pip-audit skipped all {len(deps)} dependencies of "
                                       f"{lock_name} ({why}); nothing was audited",
                       checked=lock_name)
    findings: List[Finding] = []
    for dep in audited:
        where = f"{dep.get('name')} {dep.get('version', '')}".strip()
        for vuln in dep.get("vulns") or []:
            fixes = vuln.get("fix_versions") or []
            aliases = ", ".join(vuln.get("aliases") or [])
            text = (vuln.get("description") or "").strip().splitlines()
            findings.append(Finding(
                # pip-audit's JSON carries no severity; policy.yaml ranks UNKNOWN.
                scanner=SCANNER, check=check, target=lock_name, rule_id=str(vuln.get("id")),
                severity=UNKNOWN, path=where, line=None,
                message=(text[0][:300] if text else "known vulnerability")
                + (f" (aliases: {aliases})" if aliases else ""),
                fix=f"upgrade {dep.get('name')} to {' or '.join(fixes)}" if fixes else None))
    checked = f"{lock_name}: {len(audited)} of {len(deps)} dependencies audited"
    if skipped:
        names = ", ".join(str(d.get("name")) for d in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        return CheckResult(check=check, scanner=SCANNER, status=PARTIAL, checked=checked,
                           reason=f"{len(skipped)} dependencies of {lock_name} not audited: "
                                  f"{names}{more}",
                           findings=findings)
    return CheckResult(check=check, scanner=SCANNER, status=RAN, checked=checked,
                       findings=findings)


def audit_lock(targets: Targets, lock: Path, check: str) -> CheckResult:
    binary = find_binary("pip-audit")
    rel = targets.rel(lock)
    if not lock.is_file():
        return not_run(check, SCANNER, f"{rel} does not exist yet", checked=rel)
    # A fully hashed lock lets pip-audit read versions without pip; otherwise say the pins
    # are the whole set (--no-deps), which is what a lock is.
    hashed = "--hash" in lock.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="pip-audit-") as tmp:
        out = Path(tmp) / "audit.json"
        proc = run_tool([binary, "--requirement", str(lock), "--disable-pip",
                         *([] if hashed else ["--no-deps"]), "--format", "json",
                         "--progress-spinner", "off", "--timeout", str(REQUEST_TIMEOUT_S),
                         "--output", str(out)], timeout=TIMEOUT_S, cwd=Path(tmp))
        text = out.read_text(encoding="utf-8") if out.is_file() else ""
    if proc.timed_out:
        return not_run(check, SCANNER, f"pip-audit timed out after {TIMEOUT_S} s (the "
                                       f"vulnerability service is slow or unreachable)",
                       checked=rel)
    # Exit 1 with a report means "vulnerabilities found"; no report means it broke.
    if not text:
        return error(check, SCANNER, f"pip-audit exited {proc.returncode} without a report: "
                                     f"{proc.stderr_tail()}", checked=rel)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        return error(check, SCANNER, f"pip-audit wrote no JSON ({exc})", checked=rel)
    return interpret(doc, check, rel)


def host(targets: Targets) -> CheckResult:
    return audit_lock(targets, targets.host_lock, "pip-audit-host")


def image(targets: Targets) -> CheckResult:
    """Every docker/locks/*.lock (one per base), as one check: "ran" only if all were audited."""
    check = "pip-audit-image"
    return per_lock(check, SCANNER, targets.image_locks(), targets.image_locks_pattern(),
                    lambda lock: audit_lock(targets, lock, check),
                    lambda: find_binary("pip-audit"))
