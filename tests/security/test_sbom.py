"""CycloneDX SBOMs from a lock (no network), and "not run" for a lock that is not there."""

from __future__ import annotations

import json

from security import sbom
from security.findings import NOT_RUN, RAN
from tests.security.scan_trees import need, write_tree


def test_sbom_lists_every_locked_package(tmp_path):
    need("cyclonedx-py")
    targets = write_tree(tmp_path, {
        "requirements.lock": "idna==3.7\npyyaml==6.0.1\n",
        "docker/requirements.lock": "numpy==1.24.4\n"})

    host = sbom.host(targets, tmp_path / "reports")
    image = sbom.image(targets, tmp_path / "reports")

    assert host.status == image.status == RAN
    assert host.checked.startswith("requirements.lock: 2 components")
    bom = json.loads((tmp_path / "reports" / "sbom-image.cdx.json").read_text())
    assert bom["bomFormat"] == "CycloneDX"
    assert [c["purl"] for c in bom["components"]] == ["pkg:pypi/numpy@1.24.4"]
    assert host.findings == [] and host.artifacts == [str(tmp_path / "reports" /
                                                          "sbom-host.cdx.json")]


def test_missing_lock_is_not_run(tmp_path):
    need("cyclonedx-py")
    targets = write_tree(tmp_path, {"README.md": "x\n"})

    result = sbom.image(targets, tmp_path / "reports")

    assert result.status == NOT_RUN
    assert not (tmp_path / "reports" / "sbom-image.cdx.json").exists()
