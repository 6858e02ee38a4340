"""hadolint by subprocess on the image's Dockerfiles (the project layer and each base), parsed
into Findings.

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
    """docker/Dockerfile and docker/base/*.Dockerfile in one hadolint call; "not run" only
    when none of them exists."""
    binary = find_binary("hadolint")
    dockerfiles = targets.dockerfiles()
    if not dockerfiles:
        rel = targets.rel(targets.dockerfile)
        return not_run(CHECK, SCANNER, f"{rel} does not exist yet", checked=rel)
    # hadolint names each finding's file as it was given: absolute, resolved paths.
    rels = {str(p.resolve()): targets.rel(p) for p in dockerfiles}
    checked = ", ".join(rels.values())
    with tempfile.TemporaryDirectory(prefix="hadolint-") as tmp:
        # An explicit empty config: a .hadolint.yaml in the tree or in $HOME is not read.
        cfg = Path(tmp) / "hadolint.yaml"
        cfg.write_text("{}\n", encoding="utf-8")
        proc = run_tool([binary, "--config", str(cfg), "--format", "json", "--no-fail",
                         "--no-color", "--disable-ignore-pragma", *rels],
                        timeout=TIMEOUT_S, cwd=Path(tmp))
    if proc.timed_out or proc.returncode != 0:
        return error(CHECK, SCANNER, f"hadolint failed on {checked}: "
                                     f"{proc.stderr_tail(1) or 'timed out'}", checked=checked)
    try:
        items = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError as exc:
        return error(CHECK, SCANNER, f"hadolint printed no JSON ({exc})", checked=checked)
    findings = []
    for i in items:
        file = str(i.get("file", ""))
        rel = rels.get(file) or targets.rel(Path(file))
        findings.append(Finding(scanner=SCANNER, check=CHECK, target=rel,
                                rule_id=str(i.get("code")),
                                severity=LEVELS.get(str(i.get("level")), "LOW"), path=rel,
                                line=i.get("line") or None, message=str(i.get("message", ""))))
    return CheckResult(check=CHECK, scanner=SCANNER, status=RAN, checked=checked,
                       findings=findings)
