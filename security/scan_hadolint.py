"""hadolint by subprocess on the image's Dockerfile, parsed into Findings.

Runs with an empty config and inline ignore pragmas disabled, so only policy.yaml can
suppress a rule. Must not judge findings (policy.py does).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from security.findings import RAN, CheckResult, Finding, error, not_run
from security.targets import Targets
from security.tools import find_binary, run_tool

SCANNER = "hadolint"
CHECK = "hadolint"
TIMEOUT_S = 120
# hadolint's levels on our scale: an `error` is a broken or dangerous build, a `warning`
# a hardening gap (root user, unpinned packages), `info` and `style` are advice.
LEVELS = {"error": "HIGH", "warning": "MEDIUM", "info": "LOW", "style": "LOW"}


def run(targets: Targets) -> CheckResult:
    binary = find_binary("hadolint")
    dockerfile = targets.dockerfile
    rel = targets.rel(dockerfile)
    if not dockerfile.is_file():
        return not_run(CHECK, SCANNER, f"{rel} does not exist yet", checked=rel)
    with tempfile.TemporaryDirectory(prefix="hadolint-") as tmp:
        # An explicit empty config: a .hadolint.yaml in the tree or in $HOME is not read.
        cfg = Path(tmp) / "hadolint.yaml"
        cfg.write_text("{}\n", encoding="utf-8")
        proc = run_tool([binary, "--config", str(cfg), "--format", "json", "--no-fail",
                         "--no-color", "--disable-ignore-pragma", str(dockerfile)],
                        timeout=TIMEOUT_S, cwd=Path(tmp))
    if proc.timed_out or proc.returncode != 0:
        return error(CHECK, SCANNER, f"hadolint failed on {rel}: "
                                     f"{proc.stderr_tail(1) or 'timed out'}", checked=rel)
    try:
        items = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError as exc:
        return error(CHECK, SCANNER, f"hadolint printed no JSON ({exc})", checked=rel)
    findings = [Finding(scanner=SCANNER, check=CHECK, target=rel, rule_id=str(i.get("code")),
                        severity=LEVELS.get(str(i.get("level")), "LOW"), path=rel,
                        line=i.get("line") or None, message=str(i.get("message", "")))
                for i in items]
    return CheckResult(check=CHECK, scanner=SCANNER, status=RAN, checked=rel,
                       findings=findings)
