"""trivy by subprocess: IaC misconfigurations, secrets in the tree, and the built image.

Always offline (no database, check or version download); parses trivy's JSON into Findings.
Must not download anything, and must not report "ran" for a scan that could not run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from security.findings import RAN, CheckResult, Finding, error, normalise_severity, not_run
from security.targets import Targets
from security.tools import find_binary, run_tool

SCANNER = "trivy"
TIMEOUT_S = 600
# Flags every trivy call takes: nothing fetched at run time, and no ignore file read from
# the scanned tree: suppressions live only in policy.yaml, with a reason and an expiry.
COMMON = ["--format", "json", "--skip-check-update", "--skip-version-check",
          "--ignorefile", "", "--timeout", f"{TIMEOUT_S - 30}s"]
# Only the scanners that use the vulnerability database accept these.
NO_DB_UPDATE = ["--skip-db-update", "--skip-java-db-update", "--offline-scan"]


def cache_dir() -> Path:
    explicit = os.environ.get("TRIVY_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trivy"


def _run_trivy(targets: Targets, args: List[str]) -> Tuple[Optional[Dict[str, Any]], str]:
    """(parsed JSON, "") or (None, why it failed). Runs in an empty folder so that a
    `.trivyignore` or `trivy-secret.yaml` in the scanned tree cannot hide findings."""
    binary = find_binary("trivy")
    with tempfile.TemporaryDirectory(prefix="trivy-cwd-") as cwd:
        run = run_tool([binary, *args, *COMMON, "--cache-dir", str(cache_dir())],
                       timeout=TIMEOUT_S, cwd=Path(cwd))
    if run.timed_out:
        return None, f"trivy timed out after {TIMEOUT_S} s"
    if run.returncode != 0:
        return None, f"trivy exited {run.returncode}: {run.stderr_tail()}"
    try:
        return json.loads(run.stdout), ""
    except json.JSONDecodeError as exc:
        return None, f"trivy printed no JSON report ({exc}): {run.stderr_tail()}"


def parse_report(doc: Dict[str, Any], check: str, target: str) -> List[Finding]:
    """Misconfigurations, secrets and vulnerabilities of one trivy JSON report."""
    findings: List[Finding] = []
    for result in doc.get("Results") or []:
        where = str(result.get("Target", ""))
        for m in result.get("Misconfigurations") or []:
            if m.get("Status", "FAIL") != "FAIL":
                continue
            cause = m.get("CauseMetadata") or {}
            findings.append(Finding(
                scanner=SCANNER, check=check, target=target, rule_id=str(m.get("ID", "")),
                severity=normalise_severity(m.get("Severity")), path=where,
                line=cause.get("StartLine") or None,
                message=f"{m.get('Title', '')}: {m.get('Message', '')}".strip(": "),
                fix=m.get("Resolution") or None))
        for s in result.get("Secrets") or []:
            findings.append(Finding(
                scanner=SCANNER, check=check, target=target, rule_id=str(s.get("RuleID", "")),
                severity=normalise_severity(s.get("Severity")), path=where,
                line=s.get("StartLine") or None,
                # trivy masks the secret in Match; we still keep only the title.
                message=f"{s.get('Title', 'secret')} ({s.get('Category', 'secret')})",
                fix="remove it from the tree (and from git history) and revoke the credential"))
        for v in result.get("Vulnerabilities") or []:
            fixed = v.get("FixedVersion")
            findings.append(Finding(
                scanner=SCANNER, check=check, target=target,
                rule_id=str(v.get("VulnerabilityID", "")),
                severity=normalise_severity(v.get("Severity")),
                path=f"{where}: {v.get('PkgName', '?')} {v.get('InstalledVersion', '')}".strip(),
                line=None, message=v.get("Title") or v.get("Description", "")[:200],
                fix=f"upgrade {v.get('PkgName', '')} to {fixed}" if fixed else None))
    return findings


def _present_skips(targets: Targets) -> List[str]:
    return [d for d in targets.skip_dirs if (targets.root / d).exists()]


def _skip_args(targets: Targets) -> List[str]:
    args: List[str] = []
    for d in targets.skip_dirs:
        args += ["--skip-dirs", d]
    return args


def config(targets: Targets) -> CheckResult:
    """`trivy config`: Dockerfiles and any other IaC (Compose, Kubernetes, Helm, Terraform)."""
    check = "trivy-config"
    doc, why = _run_trivy(targets, ["config", *_skip_args(targets), str(targets.root)])
    if doc is None:
        return error(check, SCANNER, why)
    files = [f"{r.get('Target')} ({r.get('Type')})" for r in doc.get("Results") or []
             if r.get("Class") == "config"]
    if not files:
        missing = "" if targets.dockerfile.is_file() else \
            f"; {targets.rel(targets.dockerfile)} does not exist yet"
        return not_run(check, SCANNER, f"no Dockerfile or other IaC file found under "
                                       f"{targets.root}{missing}")
    return CheckResult(check=check, scanner=SCANNER, status=RAN,
                       checked=f"{len(files)} IaC file(s): {', '.join(files)}",
                       findings=parse_report(doc, check, "IaC"))


def secrets(targets: Targets) -> CheckResult:
    """`trivy fs --scanners secret` on the tree, minus the git-ignored bulky folders."""
    check = "trivy-secret"
    doc, why = _run_trivy(targets, ["fs", "--scanners", "secret", *NO_DB_UPDATE,
                                    *_skip_args(targets), str(targets.root)])
    if doc is None:
        return error(check, SCANNER, why)
    skipped = ", ".join(_present_skips(targets)) or "none present"
    return CheckResult(check=check, scanner=SCANNER, status=RAN,
                       checked=f"every file under {targets.root} except {skipped}",
                       findings=parse_report(doc, check, "repository"))


def _image_unavailable(targets: Targets) -> List[str]:
    """Why `trivy image` cannot run here, or [] when it can."""
    reasons: List[str] = []
    db = cache_dir() / "db" / "trivy.db"
    if not db.is_file():
        reasons.append(f"no trivy vulnerability database at {db} (trivy downloads it from the "
                       f"internet, which this machine cannot reach; fill the cache with "
                       f"`trivy image --download-db-only` where it can, or set TRIVY_CACHE_DIR)")
    docker = shutil.which("docker")
    if docker is None:
        reasons.append("no docker CLI on PATH, so no image to scan")
        return reasons
    info = run_tool([docker, "info", "--format", "{{.ServerVersion}}"], timeout=30)
    if info.returncode != 0:
        reasons.append(f"no Docker engine reachable (`docker info`: "
                       f"{info.stderr_tail(1) or 'timed out'})")
        return reasons
    inspect = run_tool([docker, "image", "inspect", targets.image], timeout=30)
    if inspect.returncode != 0:
        reasons.append(f"image {targets.image} is not built (build it first, or pass --image)")
    return reasons


def image(targets: Targets) -> CheckResult:
    """`trivy image` (vulnerabilities and secrets) on the built image, when it can run."""
    check = "trivy-image"
    find_binary("trivy")  # a missing binary is an error even where no engine runs
    reasons = _image_unavailable(targets)
    if reasons:
        return not_run(check, SCANNER, "; ".join(reasons), checked=f"image {targets.image}")
    doc, why = _run_trivy(targets, ["image", "--image-src", "docker", "--scanners",
                                    "vuln,secret", *NO_DB_UPDATE, targets.image])
    if doc is None:
        return error(check, SCANNER, why, checked=f"image {targets.image}")
    parts = [str(r.get("Target")) for r in doc.get("Results") or []]
    return CheckResult(check=check, scanner=SCANNER, status=RAN,
                       checked=f"image {targets.image}: {', '.join(parts) or 'no packages'}",
                       findings=parse_report(doc, check, targets.image))
