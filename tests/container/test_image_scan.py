"""The built image scanned by the project's own checks, as `invoke scan` runs them: its files
(`trivy-rootfs`: secrets and misconfigurations, offline) pass the committed policy, and the
vulnerability scan (`trivy-image`) says it did not run where there is no trivy database,
instead of passing. A negative control plants a realistic fake AWS key in a tiny image and
must fail the same policy.

Uses the session's image (`image_ref`: built from nothing, or TOKENMETER_TEST_IMAGE).
"""

from __future__ import annotations

import re
import secrets
import subprocess
import tempfile

import pytest

from security import checks, policy, scan_trivy
from security.findings import NOT_RUN, RAN
from security.targets import POLICY_FILE, Targets
from tests.container.conftest import ROOT
from tests.security.scan_trees import fake_aws_credentials, need

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.scanners("trivy")]

SCANS = ["trivy-rootfs", "trivy-image"]


def scan(image: str, reports):
    need("trivy")
    results = checks.run_all(Targets.for_root(ROOT, image=image), reports, only=SCANS,
                             progress=lambda _msg: None)
    return {r.check: r for r in results}, policy.evaluate(results, policy.load(POLICY_FILE))


def test_image_files_pass_and_the_vulnerability_scan_is_not_a_pass(image_ref, tmp_path):
    by_check, verdict = scan(image_ref, tmp_path)

    rootfs = by_check["trivy-rootfs"]
    assert rootfs.status == RAN, rootfs.reason
    # It read the image's own files (the venv, the project), not an empty export.
    count = re.match(r"(\d+) files of image (\S+) ", rootfs.checked)
    assert count and count.group(2) == image_ref, rootfs.checked
    assert int(count.group(1)) > 10000, rootfs.checked
    open_findings = [f"{j.finding.rule_id} {j.finding.severity} {j.finding.location}"
                     for j in verdict.judged if j.disposition != policy.IGNORED]
    assert verdict.violations == [], open_findings
    # Vulnerabilities need trivy's database, which only a machine on the internet can fetch.
    image = by_check["trivy-image"]
    if (scan_trivy.cache_dir() / "db" / "trivy.db").is_file():
        assert image.ran, image.reason
    else:
        assert image.status == NOT_RUN and not image.ran and image.findings == []
        assert "no trivy vulnerability database" in image.reason
        assert "no container engine" not in image.reason and "not built" not in image.reason
        assert verdict.status == "PASSED (INCOMPLETE)" and verdict.exit_code == 0
        assert "did NOT run" in verdict.summary() and "trivy-image" in verdict.summary()


@pytest.fixture
def planted_image(engine, tmp_path):
    """A two-file image holding a realistic fake AWS key where our code lives (random, so
    never a real credential); removed at teardown."""
    key_id, secret = fake_aws_credentials()
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "settings.py").write_text(f"DEBUG = False\naws_access_key_id = {key_id}\n"
                                     f"aws_secret_access_key = {secret}\n")
    (ctx / "Containerfile").write_text("FROM scratch\nCOPY settings.py /workspace/pipeline/\n"
                                       "CMD [\"/none\"]\n")
    ref = f"localhost/tokenmeter-test-planted:{secrets.token_hex(4)}"
    build = subprocess.run(engine.build_cmd("--tag", ref, "--file", str(ctx / "Containerfile"),
                                            str(ctx)), capture_output=True, text=True,
                           timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    yield ref
    subprocess.run(engine.cmd("rmi", "--force", ref), capture_output=True, timeout=120)


def test_a_planted_key_in_an_image_fails_the_policy(planted_image, engine, tmp_path,
                                                    monkeypatch):
    # The unpacked files go to a folder we can inspect afterwards.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    by_check, verdict = scan(planted_image, tmp_path / "reports")

    rootfs = by_check["trivy-rootfs"]
    assert rootfs.status == RAN, rootfs.reason
    found = {(f.rule_id, f.severity, f.location) for f in rootfs.findings}
    assert found == {("aws-access-key-id", "CRITICAL", "workspace/pipeline/settings.py:2"),
                     ("aws-secret-access-key", "CRITICAL", "workspace/pipeline/settings.py:3")}
    assert verdict.exit_code == 1
    assert {j.finding.rule_id for j in verdict.violations} == {"aws-access-key-id",
                                                               "aws-secret-access-key"}
    # Nothing is left behind: no unpacked files, no container made from the image.
    assert list(scratch.iterdir()) == []
    left = subprocess.run(engine.cmd("ps", "--all", "--filter", f"ancestor={planted_image}",
                                     "--format", "{{.ID}}"),
                          capture_output=True, text=True, timeout=60)
    assert left.returncode == 0 and left.stdout.strip() == "", left.stdout + left.stderr
