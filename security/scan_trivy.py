"""trivy by subprocess: IaC misconfigurations, secrets in the tree, and the built image.

Always offline (no database, check or version download); parses trivy's JSON into Findings.
The image is read through the container engine `image.engine.detect()` finds (Docker or
podman): `trivy image` scans a `save`d archive (needs the vulnerability database), `trivy
rootfs` the files of an `export`ed container (no database needed).
Must not download anything, and must not report "ran" for a scan that could not run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from image.engine import Engine, EngineError, detect
from security.findings import RAN, CheckResult, Finding, error, normalise_severity, not_run
from security.targets import Targets
from security.tools import find_binary, run_pipe, run_tool

SCANNER = "trivy"
TIMEOUT_S = 600
# The image's files: a few GB to unpack and read (about 3 min for the CPU image on 2 cores).
ROOTFS_TIMEOUT_S = 1800
ENGINE_TIMEOUT_S = 900  # `save` or `export` of a multi-GB image
# Flags every trivy call takes: nothing fetched at run time, and no ignore file read from
# the scanned tree: suppressions live only in policy.yaml, with a reason and an expiry.
# (Each call adds its own `--timeout`.)
COMMON = ["--format", "json", "--skip-check-update", "--skip-version-check",
          "--ignorefile", ""]
# Only the scanners that use the vulnerability database accept these (fs, rootfs, image).
NO_DB_UPDATE = ["--skip-db-update", "--skip-java-db-update", "--offline-scan"]
# Not extracted from an exported container: device nodes (the engine's /dev placeholders)
# need mknod, and /dev is a mount at run time, never the image's content.
EXPORT_EXCLUDES = ["dev/*"]


def cache_dir() -> Path:
    explicit = os.environ.get("TRIVY_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trivy"


def _run_trivy(targets: Targets, args: List[str], timeout: int = TIMEOUT_S
               ) -> Tuple[Optional[Dict[str, Any]], str]:
    """(parsed JSON, "") or (None, why it failed). Runs in an empty folder so that a
    `.trivyignore` or `trivy-secret.yaml` in the scanned tree cannot hide findings."""
    binary = find_binary("trivy")
    with tempfile.TemporaryDirectory(prefix="trivy-cwd-") as cwd:
        run = run_tool([binary, *args, *COMMON, "--timeout", f"{timeout - 30}s",
                        "--cache-dir", str(cache_dir())], timeout=timeout, cwd=Path(cwd))
    if run.timed_out:
        return None, f"trivy timed out after {timeout} s"
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


def _engine() -> Tuple[Optional[Engine], str]:
    """(the container engine, "") or (None, why none runs here)."""
    try:
        return detect(), ""
    except EngineError as exc:
        return None, str(exc)


def _image_missing(engine: Engine, image: str) -> str:
    """Why `image` cannot be read through `engine`, or "" when it is there."""
    inspect = run_tool(engine.cmd("image", "inspect", "--format", "{{.Id}}", image),
                       timeout=60)
    if inspect.returncode != 0:
        return f"image {image} is not built (invoke build, or pass --image)"
    return ""


def _image_unavailable(targets: Targets) -> Tuple[Optional[Engine], List[str]]:
    """(engine, why `trivy image` cannot run here: [] when it can)."""
    reasons: List[str] = []
    db = cache_dir() / "db" / "trivy.db"
    if not db.is_file():
        reasons.append(f"no trivy vulnerability database at {db} (trivy downloads it from the "
                       f"internet, which this machine cannot reach; fill the cache with "
                       f"`trivy image --download-db-only` where it can, or set TRIVY_CACHE_DIR)")
    engine, why = _engine()
    if engine is None:
        reasons.append(why)
        return None, reasons
    missing = _image_missing(engine, targets.image)
    if missing:
        reasons.append(missing)
    return engine, reasons


def image(targets: Targets) -> CheckResult:
    """`trivy image` (vulnerabilities and secrets) on the built image, when it can run: the
    engine `save`s it to an archive that trivy reads (`--input`), whatever the engine."""
    check = "trivy-image"
    find_binary("trivy")  # a missing binary is an error even where no engine runs
    engine, reasons = _image_unavailable(targets)
    if reasons:
        return not_run(check, SCANNER, "; ".join(reasons), checked=f"image {targets.image}")
    with tempfile.TemporaryDirectory(prefix="trivy-image-") as tmp:
        archive = Path(tmp) / "image.tar"
        save = run_tool(engine.cmd("save", "--output", str(archive), targets.image),
                        timeout=ENGINE_TIMEOUT_S)
        if save.returncode != 0 or not archive.is_file():
            return error(check, SCANNER, f"`{engine.name} save` failed: "
                                         f"{save.stderr_tail() or 'timed out'}",
                         checked=f"image {targets.image}")
        doc, why = _run_trivy(targets, ["image", "--input", str(archive), "--scanners",
                                        "vuln,secret", *NO_DB_UPDATE])
    if doc is None:
        return error(check, SCANNER, why, checked=f"image {targets.image}")
    parts = [str(r.get("Target")) for r in doc.get("Results") or []]
    return CheckResult(check=check, scanner=SCANNER, status=RAN,
                       checked=f"image {targets.image}: {', '.join(parts) or 'no packages'}",
                       findings=parse_report(doc, check, targets.image))


def _export(engine: Engine, image: str, tree: Path) -> str:
    """The files of `image` unpacked under `tree` ("" when done, else why not): a container
    is created (never started), exported into tar, and removed whatever happens."""
    tar = shutil.which("tar")
    if tar is None:
        return "no `tar` on PATH to unpack the exported container"
    create = run_tool(engine.create_cmd("--pull=never", image), timeout=120)
    lines = create.stdout.strip().splitlines()
    if create.returncode != 0 or not lines:
        return f"`{engine.name} create {image}` failed: {create.stderr_tail() or 'timed out'}"
    container = lines[-1].strip()
    try:
        tree.mkdir()
        # Owners are irrelevant to the scan (and chown may be refused in a user namespace).
        excludes = [f"--exclude={pattern}" for pattern in EXPORT_EXCLUDES]
        export, untar = run_pipe(
            engine.cmd("export", container),
            [tar, "--extract", "--file=-", f"--directory={tree}", "--no-same-owner",
             "--delay-directory-restore", "--anchored", *excludes],
            timeout=ENGINE_TIMEOUT_S)
    except OSError as exc:
        return f"`{engine.name} export` into tar could not start: {exc}"
    finally:
        run_tool(engine.cmd("rm", "--force", "--volumes", container), timeout=120)
    if export.timed_out:
        return f"`{engine.name} export` into tar timed out after {ENGINE_TIMEOUT_S} s"
    if export.returncode != 0:
        return f"`{engine.name} export` failed: {export.stderr_tail()}"
    if untar.returncode != 0:
        return f"tar could not unpack the exported container: {untar.stderr_tail()}"
    return ""


def _count_files(tree: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(tree))


def rootfs(targets: Targets) -> CheckResult:
    """`trivy rootfs --scanners secret,misconfig` on the built image's files, offline.

    Vulnerabilities are trivy-image's (they need the database); this check needs only an
    engine and the image. The unpacked tree (GBs, in $TMPDIR) is deleted whatever happens."""
    check = "trivy-rootfs"
    find_binary("trivy")  # a missing binary is an error even where no engine runs
    what = f"image {targets.image}"
    engine, why = _engine()
    if engine is None:
        return not_run(check, SCANNER, why, checked=what)
    if _image_missing(engine, targets.image):
        return not_run(check, SCANNER, f"image {targets.image} is not built (invoke build)",
                       checked=what)
    with tempfile.TemporaryDirectory(prefix="trivy-rootfs-") as tmp:
        tree = Path(tmp) / "rootfs"
        why = _export(engine, targets.image, tree)
        if why:
            return error(check, SCANNER, why, checked=what)
        count = _count_files(tree)
        if count == 0:
            return error(check, SCANNER, f"the exported container of {targets.image} has no "
                                         f"files", checked=what)
        doc, why = _run_trivy(targets, ["rootfs", "--scanners", "secret,misconfig",
                                        *NO_DB_UPDATE, str(tree)], timeout=ROOTFS_TIMEOUT_S)
    if doc is None:
        return error(check, SCANNER, why, checked=what)
    configs = [str(r.get("Target")) for r in doc.get("Results") or []
               if r.get("Class") == "config"]
    return CheckResult(
        check=check, scanner=SCANNER, status=RAN,
        checked=f"{count} files of {what} (exported with {engine.name}; dev/ not unpacked): "
                f"secrets, and misconfigurations in {len(configs)} IaC file(s)"
                + (f" ({', '.join(configs)})" if configs else ""),
        findings=parse_report(doc, check, targets.image))
