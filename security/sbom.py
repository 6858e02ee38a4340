"""CycloneDX SBOMs of the host lock and of each image lock, written by cyclonedx-py (subprocess).

An SBOM is an inventory, not a verdict: it has no findings, and a missing lock is "not run".
Must not resolve or download packages: the lock is the whole truth.
"""

from __future__ import annotations

import json
from pathlib import Path

from security.findings import RAN, CheckResult, error, not_run, per_lock
from security.targets import Targets
from security.tools import find_binary, run_tool

SCANNER = "cyclonedx-py"
TIMEOUT_S = 300


def write_sbom(targets: Targets, lock: Path, out_dir: Path, check: str,
               name: str) -> CheckResult:
    binary = find_binary("cyclonedx-py")
    rel = targets.rel(lock)
    if not lock.is_file():
        return not_run(check, SCANNER, f"{rel} does not exist yet", checked=rel)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"sbom-{name}.cdx.json"
    args = [binary, "requirements", str(lock), "--output-format", "JSON",
            "--output-file", str(out), "--output-reproducible"]
    if targets.pyproject.is_file():  # names the root component (tokenmeter and its version)
        args += ["--pyproject", str(targets.pyproject)]
    proc = run_tool(args, timeout=TIMEOUT_S, cwd=targets.root)
    if proc.timed_out or proc.returncode != 0 or not out.is_file():
        return error(check, SCANNER, f"cyclonedx-py failed on {rel}: "
                                     f"{proc.stderr_tail() or 'timed out'}", checked=rel)
    try:
        bom = json.loads(out.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        return error(check, SCANNER, f"cyclonedx-py wrote invalid JSON ({exc})", checked=rel)
    count = len(bom.get("components") or [])
    return CheckResult(check=check, scanner=SCANNER, status=RAN,
                       checked=f"{rel}: {count} components, CycloneDX {bom.get('specVersion')}",
                       artifacts=[str(out)])


def host(targets: Targets, out_dir: Path) -> CheckResult:
    return write_sbom(targets, targets.host_lock, out_dir, "sbom-host", "host")


def image(targets: Targets, out_dir: Path) -> CheckResult:
    """One SBOM per docker/locks/*.lock: sbom-image-<lock name>.cdx.json (official, debian)."""
    check = "sbom-image"
    return per_lock(check, SCANNER, targets.image_locks(), targets.image_locks_pattern(),
                    lambda lock: write_sbom(targets, lock, out_dir, check, f"image-{lock.stem}"),
                    lambda: find_binary("cyclonedx-py"))
