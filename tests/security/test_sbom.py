"""CycloneDX SBOMs from the locks (no network): one for the host lock, one per image lock
(docker/locks/*.lock, one per base), and "not run" for locks that are not there."""

from __future__ import annotations

import json

import pytest

from security import sbom
from security.findings import NOT_RUN, RAN
from tests.security.scan_trees import need, write_tree

pytestmark = pytest.mark.scanners("cyclonedx-py")


def test_sbom_lists_every_locked_package_of_every_lock(tmp_path):
    need("cyclonedx-py")
    targets = write_tree(tmp_path, {
        "requirements.lock": "idna==3.7\npyyaml==6.0.1\n",
        "docker/locks/official.lock": "numpy==1.24.4\n",
        "docker/locks/debian.lock": "numpy==1.26.4\nrequests==2.32.3\n",
        # Not a lock: left alone.
        "docker/locks/README.md": "one lock per base\n"})
    reports = tmp_path / "reports"

    host = sbom.host(targets, reports)
    image = sbom.image(targets, reports)

    assert host.status == image.status == RAN
    assert host.checked.startswith("requirements.lock: 2 components")
    assert image.checked == ("docker/locks/debian.lock: 2 components, CycloneDX 1.6; "
                             "docker/locks/official.lock: 1 components, CycloneDX 1.6")
    assert image.artifacts == [str(reports / "sbom-image-debian.cdx.json"),
                               str(reports / "sbom-image-official.cdx.json")]
    purls = {name: [c["purl"] for c in json.loads((reports / f"sbom-image-{name}.cdx.json")
                                                  .read_text())["components"]]
             for name in ("official", "debian")}
    assert purls == {"official": ["pkg:pypi/numpy@1.24.4"],
                     "debian": ["pkg:pypi/numpy@1.26.4", "pkg:pypi/requests@2.32.3"]}
    assert host.findings == image.findings == []
    assert host.artifacts == [str(reports / "sbom-host.cdx.json")]


def test_missing_locks_are_not_run(tmp_path):
    need("cyclonedx-py")
    # The pre-split location is not read any more.
    targets = write_tree(tmp_path, {"docker/requirements.lock": "numpy==1.24.4\n"})

    result = sbom.image(targets, tmp_path / "reports")

    assert result.status == NOT_RUN
    assert result.reason == "docker/locks/*.lock does not exist yet"
    assert not (tmp_path / "reports").exists() or not list((tmp_path / "reports").iterdir())
