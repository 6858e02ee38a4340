"""The list of checks a scan runs, in order, and running them one by one with progress.

A check that cannot find its binary becomes an "error" result naming how to install it;
the other checks still run. Must not judge results (policy.py) or format them (report.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from security import sbom, scan_bandit, scan_hadolint, scan_pip_audit, scan_trivy
from security.findings import CheckResult, error, not_run
from security.targets import Targets
from security.tools import MissingBinary


@dataclass(frozen=True)
class Check:
    name: str
    scanner: str
    run: Callable[[Targets, Path], CheckResult]  # (targets, reports folder)
    online: bool = False  # asks an online service on every run (skipped by --offline)
    about: str = ""


CHECKS: List[Check] = [
    Check("trivy-config", "trivy", lambda t, _: scan_trivy.config(t),
          about="IaC misconfigurations: docker/Dockerfile, docker/base/*.Dockerfile and any "
                "Kubernetes/Helm/Terraform"),
    Check("trivy-secret", "trivy", lambda t, _: scan_trivy.secrets(t),
          about="secrets in the repository's files"),
    Check("trivy-image", "trivy", lambda t, _: scan_trivy.image(t),
          about="vulnerabilities and secrets in the built image (needs an engine + trivy DB)"),
    Check("trivy-rootfs", "trivy", lambda t, _: scan_trivy.rootfs(t),
          about="secrets and misconfigurations in the built image's files (needs an engine)"),
    Check("hadolint", "hadolint", lambda t, _: scan_hadolint.run(t),
          about="Dockerfile lint: docker/Dockerfile and docker/base/*.Dockerfile"),
    Check("pip-audit-host", "pip-audit", lambda t, _: scan_pip_audit.host(t), online=True,
          about="known vulnerabilities in requirements.lock"),
    Check("pip-audit-image", "pip-audit", lambda t, _: scan_pip_audit.image(t), online=True,
          about="known vulnerabilities in each docker/locks/*.lock"),
    Check("bandit", "bandit", lambda t, _: scan_bandit.run(t),
          about="security lint of our Python code"),
    Check("sbom-host", "cyclonedx-py", sbom.host, about="CycloneDX SBOM of requirements.lock"),
    Check("sbom-image", "cyclonedx-py", sbom.image,
          about="CycloneDX SBOM of each docker/locks/*.lock"),
]
NAMES = [c.name for c in CHECKS]


def select(only: Sequence[str]) -> List[Check]:
    unknown = [n for n in only if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown check(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(NAMES)}")
    return [c for c in CHECKS if not only or c.name in only]


def run_one(check: Check, targets: Targets, reports_dir: Path,
            offline: bool = False) -> CheckResult:
    if offline and check.online:
        return not_run(check.name, check.scanner, f"--offline: {check.scanner} asks an online "
                                                  f"vulnerability service")
    start = time.monotonic()
    try:
        result = check.run(targets, reports_dir)
    except MissingBinary as exc:
        result = error(check.name, check.scanner, str(exc))
    result.seconds = round(time.monotonic() - start, 2)
    return result


def run_all(targets: Targets, reports_dir: Path, only: Sequence[str] = (),
            offline: bool = False, progress: Optional[Callable[[str], None]] = None
            ) -> List[CheckResult]:
    say = progress or (lambda msg: print(msg, file=sys.stderr, flush=True))
    chosen = select(only)
    results: List[CheckResult] = []
    for i, check in enumerate(chosen, 1):
        say(f"[{i}/{len(chosen)}] {check.name}: {check.about} ...")
        result = run_one(check, targets, reports_dir, offline=offline)
        found = f"{len(result.findings)} finding(s), " if result.ran else ""
        say(f"[{i}/{len(chosen)}] {check.name}: {result.status} ({found}{result.seconds:.1f} s)")
        results.append(result)
    return results
