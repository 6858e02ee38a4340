"""trivy on temporary trees: a root Dockerfile (the layer's or a base's) and a fake AWS key
are caught with the right severity and fail the policy; a scan with nothing to look at, or
no engine/database/image, is "not run" with its reason. (trivy-rootfs on a real image:
tests/container/test_image_scan.py.)"""

from __future__ import annotations

import json

import pytest

from image.engine import detect
from security import checks, policy, report, scan_trivy
from security.findings import NOT_RUN, RAN
from security.targets import Targets
from tests.security.scan_trees import (
    NO_USER_DOCKERFILE,
    ROOT_DOCKERFILE,
    fake_aws_credentials,
    make_policy,
    need,
    write_tree,
)


@pytest.mark.scanners("trivy")
@pytest.mark.parametrize("dockerfile", [ROOT_DOCKERFILE, NO_USER_DOCKERFILE],
                         ids=["USER-root", "no-USER-line"])
def test_dockerfile_running_as_root_is_high_and_fails(tmp_path, dockerfile):
    need("trivy")
    targets = write_tree(tmp_path, {"docker/Dockerfile": dockerfile, "app.py": "print(1)\n"})

    result = scan_trivy.config(targets)

    assert result.status == RAN, result.reason
    assert "docker/Dockerfile" in result.checked
    root = [f for f in result.findings if f.rule_id == "DS-0002"]
    assert len(root) == 1, [f.rule_id for f in result.findings]
    assert root[0].severity == "HIGH"
    assert root[0].path == "docker/Dockerfile"
    verdict = policy.evaluate([result], make_policy())
    assert verdict.failed and verdict.exit_code == 1
    assert any(j.finding.rule_id == "DS-0002" for j in verdict.violations)


@pytest.mark.scanners("trivy")
def test_fake_aws_key_is_critical_and_fails(tmp_path):
    need("trivy")
    key_id, secret = fake_aws_credentials()
    creds = f"aws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n"
    targets = write_tree(tmp_path, {
        "src/settings.py": "DEBUG = False\n" + creds,
        # Skipped folders are not scanned ...
        ".venv/lib/vendored.py": creds,
        "data/raw.txt": creds,
        # ... and an ignore file in the tree is not honoured (policy.yaml only).
        ".trivyignore": "aws-access-key-id\naws-secret-access-key\n",
    })

    result = scan_trivy.secrets(targets)

    assert result.status == RAN, result.reason
    by_rule = {f.rule_id: f for f in result.findings}
    assert set(by_rule) == {"aws-access-key-id", "aws-secret-access-key"}, result.findings
    assert by_rule["aws-access-key-id"].severity == "CRITICAL"
    assert by_rule["aws-access-key-id"].location == "src/settings.py:2"
    assert {f.path for f in result.findings} == {"src/settings.py"}
    verdict = policy.evaluate([result], make_policy())
    assert verdict.exit_code == 1 and len(verdict.violations) == 2

    # The report names the finding but never repeats the secret.
    paths = report.write(verdict, tmp_path / "reports", targets.root)
    for path in paths:
        text = path.read_text(encoding="utf-8")
        assert "aws-access-key-id" in text
        assert key_id not in text and secret not in text


@pytest.mark.scanners("trivy")
def test_tree_without_iac_is_not_run(tmp_path):
    need("trivy")
    targets = write_tree(tmp_path, {"README.md": "# nothing to configure\n"})

    result = scan_trivy.config(targets)

    assert result.status == NOT_RUN
    assert "docker/Dockerfile does not exist" in result.reason
    assert not policy.evaluate([result], make_policy()).failed


@pytest.mark.scanners("trivy")
def test_base_dockerfiles_are_scanned_as_iac(tmp_path):
    need("trivy")
    # The bases are named *.Dockerfile: trivy must still read them as Dockerfiles.
    targets = write_tree(tmp_path, {
        "docker/Dockerfile": ROOT_DOCKERFILE.replace("USER root", "USER 1000:1000"),
        "docker/base/official.Dockerfile": ROOT_DOCKERFILE, "app.py": "print(1)\n"})

    result = scan_trivy.config(targets)

    assert result.status == RAN, result.reason
    assert "docker/base/official.Dockerfile (dockerfile)" in result.checked
    assert "docker/Dockerfile (dockerfile)" in result.checked
    root = [f.path for f in result.findings if f.rule_id == "DS-0002"]
    assert root == ["docker/base/official.Dockerfile"]


def _no_engine(monkeypatch, tmp_path):
    """No docker or podman command to be found (the scanners are found beside Python)."""
    monkeypatch.delenv("TOKENMETER_ENGINE", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))


@pytest.mark.scanners("trivy")
def test_image_scans_without_engine_are_not_run(tmp_path, monkeypatch):
    need("trivy")
    monkeypatch.setenv("TRIVY_CACHE_DIR", str(tmp_path / "empty-cache"))
    _no_engine(monkeypatch, tmp_path)
    targets = write_tree(tmp_path / "tree", {"docker/Dockerfile": ROOT_DOCKERFILE})

    image = scan_trivy.image(targets)
    rootfs = scan_trivy.rootfs(targets)

    # Both reasons, from image.engine.detect(): no database, and no engine.
    assert image.status == NOT_RUN
    assert "no trivy vulnerability database" in image.reason
    assert "no container engine runs here (no `docker` command; no `podman` command)" \
        in image.reason
    assert not image.ran and image.findings == []
    # trivy-rootfs needs no database: only the engine is missing.
    assert rootfs.status == NOT_RUN and rootfs.findings == []
    assert rootfs.reason.startswith("no container engine runs here")
    assert rootfs.checked == "image tokenmeter:latest"


@pytest.mark.scanners("trivy")
@pytest.mark.container_engine
def test_image_scans_of_an_image_not_built_are_not_run(tmp_path, monkeypatch):
    need("trivy")
    engine = detect()  # the container_engine mark skips this test where detect() fails
    monkeypatch.setenv("TRIVY_CACHE_DIR", str(tmp_path / "empty-cache"))
    ref = "localhost/tokenmeter-never-built:absent"
    targets = write_tree(tmp_path / "tree", {"docker/Dockerfile": ROOT_DOCKERFILE})

    results = checks.run_all(Targets.for_root(targets.root, image=ref),
                             tmp_path / "reports", only=["trivy-image", "trivy-rootfs"],
                             progress=lambda _: None)

    by_check = {r.check: r for r in results}
    assert by_check["trivy-rootfs"].status == NOT_RUN
    assert by_check["trivy-rootfs"].reason == f"image {ref} is not built (invoke build)"
    image = by_check["trivy-image"]
    assert image.status == NOT_RUN and f"image {ref} is not built" in image.reason
    assert "no trivy vulnerability database" in image.reason
    assert "no container engine" not in image.reason, engine
    verdict = policy.evaluate(results, make_policy())
    assert verdict.status == "NOTHING CHECKED" and verdict.exit_code == 2


def test_vulnerability_report_parsed_into_common_shape():
    # The documented shape of `trivy image --format json` (schema 2), cut to one entry.
    doc = json.loads("""{"SchemaVersion": 2, "Results": [{"Target": "tokenmeter (ubuntu 20.04)",
      "Class": "os-pkgs", "Type": "ubuntu", "Vulnerabilities": [{"VulnerabilityID":
      "CVE-2023-0286", "PkgName": "libssl1.1", "InstalledVersion": "1.1.1f-1ubuntu2.16",
      "FixedVersion": "1.1.1f-1ubuntu2.17", "Severity": "HIGH",
      "Title": "openssl: X.400 address type confusion in X.509 GeneralName"}]}]}""")

    [f] = scan_trivy.parse_report(doc, "trivy-image", "tokenmeter:latest")

    assert (f.scanner, f.check, f.rule_id, f.severity) == ("trivy", "trivy-image",
                                                           "CVE-2023-0286", "HIGH")
    assert f.path == "tokenmeter (ubuntu 20.04): libssl1.1 1.1.1f-1ubuntu2.16"
    assert f.fix == "upgrade libssl1.1 to 1.1.1f-1ubuntu2.17"
