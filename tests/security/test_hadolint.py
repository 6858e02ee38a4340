"""hadolint on temporary trees: USER root is caught at MEDIUM (our bar for the Dockerfile)
and fails the policy; inline ignore pragmas do not hide it; no Dockerfile is "not run"."""

from __future__ import annotations

from security import policy, scan_hadolint
from security.findings import NOT_RUN, RAN
from tests.security.scan_trees import ROOT_DOCKERFILE, make_policy, need, write_tree


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
