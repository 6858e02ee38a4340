"""bandit by subprocess on our own Python code, parsed into Findings.

`# nosec` comments are not honoured (--ignore-nosec): a suppression needs a reason and an
expiry in policy.yaml. Must not scan tests or third-party code (targets.py says what).
"""

from __future__ import annotations

import json

from security.findings import PARTIAL, RAN, CheckResult, Finding, error, normalise_severity, not_run
from security.targets import Targets
from security.tools import find_binary, run_tool

SCANNER = "bandit"
CHECK = "bandit"
TIMEOUT_S = 300


def run(targets: Targets) -> CheckResult:
    binary = find_binary("bandit")
    paths = [targets.rel(p) for p in targets.existing_python_paths()]
    if not paths:
        wanted = ", ".join(targets.rel(p) for p in targets.python_paths)
        return not_run(CHECK, SCANNER, f"none of {wanted} exists")
    # Relative paths from the root, so findings name files as the repository does.
    proc = run_tool([binary, "--recursive", *paths, "--format", "json", "--quiet",
                     "--ignore-nosec", "--exit-zero"], timeout=TIMEOUT_S, cwd=targets.root)
    if proc.timed_out or proc.returncode != 0:
        return error(CHECK, SCANNER, f"bandit failed: {proc.stderr_tail() or 'timed out'}")
    try:
        doc = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        return error(CHECK, SCANNER, f"bandit printed no JSON ({exc}): {proc.stderr_tail()}")
    findings = [Finding(scanner=SCANNER, check=CHECK, target="python code",
                        rule_id=str(r.get("test_id")),
                        severity=normalise_severity(r.get("issue_severity")),
                        path=str(r.get("filename")), line=r.get("line_number") or None,
                        message=f"{r.get('issue_text')} (confidence "
                                f"{r.get('issue_confidence')}, {r.get('test_name')})")
                for r in doc.get("results") or []]
    metrics = doc.get("metrics") or {}
    files = len([k for k in metrics if k != "_totals"])
    lines = (metrics.get("_totals") or {}).get("loc", 0)
    checked = f"{files} Python files, {lines} lines ({', '.join(paths)})"
    unreadable = doc.get("errors") or []
    if unreadable:
        names = ", ".join(str(e.get("filename")) for e in unreadable[:10])
        return CheckResult(check=CHECK, scanner=SCANNER, status=PARTIAL, checked=checked,
                           reason=f"{len(unreadable)} file(s) bandit could not parse: {names}",
                           findings=findings)
    return CheckResult(check=CHECK, scanner=SCANNER, status=RAN, checked=checked,
                       findings=findings)
