"""`python -m security` end to end: the repository's own offline-capable scan passes (this is
how CI runs the scans), and checks that cannot run are listed as such, never as passed."""

from __future__ import annotations

import json

import pytest

from tests.security.scan_trees import REPO, need, run_cli, write_tree

UNBUILT = "localhost/tokenmeter-never-built:absent"


@pytest.mark.scanners("trivy", "hadolint", "bandit", "cyclonedx-py")
def test_repository_offline_scan_passes(tmp_path):
    for tool in ("trivy", "hadolint", "bandit", "cyclonedx-py"):
        need(tool)

    # The built image is scanned in tests/container/test_image_scan.py (minutes); here an
    # image that is not there keeps this to the repository's files.
    proc = run_cli("--offline", "--reports", str(tmp_path), "--image", UNBUILT)

    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "scan-report.json").read_text())
    status = {c["check"]: c["status"] for c in doc["checks"]}
    checked = {c["check"]: c["checked"] for c in doc["checks"]}
    assert status["trivy-secret"] == status["bandit"] == status["sbom-host"] == "ran"
    assert status["trivy-config"] == status["hadolint"] == status["sbom-image"] == "ran"
    assert status["pip-audit-host"] == status["pip-audit-image"] == "not run"  # --offline
    assert status["trivy-image"] == status["trivy-rootfs"] == "not run"
    # Every Dockerfile (the layer and each base) and every image lock was looked at.
    dockerfiles = ["docker/Dockerfile", *sorted(f"docker/base/{p.name}" for p in
                                                (REPO / "docker" / "base").glob("*.Dockerfile"))]
    assert len(dockerfiles) >= 3 and checked["hadolint"] == ", ".join(dockerfiles)
    assert all(d in checked["trivy-config"] for d in dockerfiles)
    locks = sorted((REPO / "docker" / "locks").glob("*.lock"))
    assert len(locks) >= 2
    for lock in locks:
        assert f"docker/locks/{lock.name}:" in checked["sbom-image"]
        assert (tmp_path / f"sbom-image-{lock.stem}.cdx.json").is_file()
    assert doc["meta"]["root"] == str(REPO)
    assert doc["verdict"]["status"].startswith("PASSED")
    assert (tmp_path / "scan-report.md").is_file() and (tmp_path / "sbom-host.cdx.json").is_file()
    # The table: one row per check, no counts for a check that did not run.
    assert "check" in proc.stdout and "CRIT" in proc.stdout
    assert any(line.split()[:3] == ["pip-audit-host", "not", "run"] and line.endswith("-")
               for line in proc.stdout.splitlines())


@pytest.mark.scanners("hadolint", "cyclonedx-py")
def test_checks_that_cannot_run_are_never_reported_as_passed(tmp_path):
    need("hadolint")
    need("cyclonedx-py")
    tree = tmp_path / "tree"
    write_tree(tree, {"README.md": "no Dockerfile, no lock yet\n"})

    proc = run_cli("--root", str(tree), "--reports", str(tmp_path / "reports"),
                   "--only", "hadolint,sbom-image")

    # Nothing could be checked: that is not a pass, and the gate says so.
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "NOTHING CHECKED" in proc.stdout and "PASSED" not in proc.stdout
    assert "hadolint: not run: docker/Dockerfile does not exist yet" in proc.stdout
    assert "sbom-image: not run: docker/locks/*.lock does not exist yet" in proc.stdout
    doc = json.loads((tmp_path / "reports" / "scan-report.json").read_text())
    assert [c["counts"] for c in doc["checks"]] == [None, None]


def test_unknown_check_or_bad_policy_is_a_clear_error(tmp_path):
    bad = tmp_path / "policy.yaml"
    bad.write_text("fail_on: HIGH\nignore:\n  - id: DS-0002\n    expires: 2030-01-01\n")

    unknown = run_cli("--only", "nmap", "--reports", str(tmp_path))
    invalid = run_cli("--policy", str(bad), "--reports", str(tmp_path))

    assert unknown.returncode == 2 and "unknown check(s) nmap" in unknown.stderr
    assert invalid.returncode == 2 and "'reason' is required" in invalid.stderr
