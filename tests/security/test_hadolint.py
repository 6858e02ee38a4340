"""hadolint on temporary trees: USER root is caught at MEDIUM (our bar for the Dockerfiles)
and fails the policy, in the project layer and in each base (docker/base/*.Dockerfile);
inline ignore pragmas do not hide it; no Dockerfile at all is "not run"."""

from __future__ import annotations

import pytest

from security import policy, scan_hadolint
from security.findings import NOT_RUN, RAN
from tests.security.scan_trees import (
    NO_USER_DOCKERFILE,
    ROOT_DOCKERFILE,
    make_policy,
    need,
    write_tree,
)

pytestmark = pytest.mark.scanners("hadolint")


def test_user_root_is_caught_and_fails(tmp_path):
    need("hadolint")
    pragma = "# hadolint ignore=DL3002\n"  # must not work: only policy.yaml suppresses
    text = ROOT_DOCKERFILE.replace("USER root\n", pragma + "USER root\n")
    targets = write_tree(tmp_path, {"docker/Dockerfile": text})

    result = scan_hadolint.run(targets)

    assert result.status == RAN and result.checked == "docker/Dockerfile"
    [root] = [f for f in result.findings if f.rule_id == "DL3002"]
    assert root.severity == "MEDIUM" and root.location == "docker/Dockerfile:5"
    verdict = policy.evaluate([result], make_policy())
    assert verdict.exit_code == 1
    assert [j.finding.rule_id for j in verdict.violations] == ["DL3002"]


def test_missing_dockerfile_is_not_run(tmp_path):
    need("hadolint")
    targets = write_tree(tmp_path, {"README.md": "no image yet\n"})

    result = scan_hadolint.run(targets)

    assert result.status == NOT_RUN
    assert result.reason == "docker/Dockerfile does not exist yet"


def test_base_dockerfiles_are_linted_with_the_layer(tmp_path):
    need("hadolint")
    pragma = "# hadolint ignore=DL3002\n"
    targets = write_tree(tmp_path, {
        "docker/Dockerfile": NO_USER_DOCKERFILE,
        "docker/base/debian.Dockerfile": ROOT_DOCKERFILE.replace("USER root\n",
                                                                 pragma + "USER root\n"),
        "docker/base/official.Dockerfile": NO_USER_DOCKERFILE.replace("flask==3.0.0", "flask"),
        "docker/base/debian-cpu.lock": "numpy==1.26.4\n",  # not a Dockerfile: not linted
    })

    result = scan_hadolint.run(targets)

    assert result.status == RAN
    assert result.checked == ("docker/Dockerfile, docker/base/debian.Dockerfile, "
                              "docker/base/official.Dockerfile")
    found = {(f.rule_id, f.location, f.target) for f in result.findings}
    assert found == {
        ("DL3002", "docker/base/debian.Dockerfile:5", "docker/base/debian.Dockerfile"),
        ("DL3066", "docker/base/debian.Dockerfile:5", "docker/base/debian.Dockerfile"),
        ("DL3013", "docker/base/official.Dockerfile:2", "docker/base/official.Dockerfile")}
    verdict = policy.evaluate([result], make_policy())  # MEDIUM and above fail
    assert verdict.exit_code == 1
    assert {j.finding.path for j in verdict.violations} == {
        "docker/base/debian.Dockerfile", "docker/base/official.Dockerfile"}


def test_bases_alone_are_linted_and_named(tmp_path):
    need("hadolint")
    targets = write_tree(tmp_path, {"docker/base/official.Dockerfile": ROOT_DOCKERFILE})

    result = scan_hadolint.run(targets)

    assert result.status == RAN and result.checked == "docker/base/official.Dockerfile"
    assert [f.location for f in result.findings if f.rule_id == "DL3002"] == [
        "docker/base/official.Dockerfile:4"]
