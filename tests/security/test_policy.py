"""The policy: thresholds, and an ignore list whose entries need a reason and an expiry.
An unexpired entry suppresses its finding; an expired one fails the scan (end to end through
`python -m security` on a real trivy/hadolint scan, and as plain functions)."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from security import policy
from security.findings import RAN, CheckResult, Finding
from security.targets import POLICY_FILE
from tests.security.scan_trees import (
    ROOT_DOCKERFILE,
    days_from_today,
    make_policy,
    need,
    run_cli,
    write_tree,
)


def finding(rule="DS-0002", severity="HIGH", scanner="trivy", path="docker/Dockerfile"):
    return Finding(scanner=scanner, check=f"{scanner}-x", target="t", rule_id=rule,
                   severity=severity, path=path, line=3, message="m")


def ran(*findings):
    return CheckResult(check="trivy-x", scanner="trivy", status=RAN, findings=list(findings))


def entry(expires, **extra):
    return {"id": "DS-0002", "reason": "accepted until the base image is replaced",
            "expires": expires, **extra}


def test_unexpired_entry_suppresses_only_its_finding():
    pol = make_policy(ignore=[entry(days_from_today(30), path="docker/*")])
    kept = finding(path="other/Dockerfile")

    verdict = policy.evaluate([ran(finding(), kept)], pol)

    assert [j.disposition for j in verdict.judged] == [policy.IGNORED, policy.VIOLATION]
    assert verdict.violations[0].finding is kept


def test_expired_entry_fails_even_with_nothing_left_to_hide():
    pol = make_policy(ignore=[entry("2020-01-31")])

    verdict = policy.evaluate([ran()], pol)

    assert verdict.failed and verdict.exit_code == 1
    assert [e.rule for e in verdict.expired] == ["DS-0002"]


def test_entry_is_valid_through_its_expiry_day():
    pol = make_policy(ignore=[entry("2030-06-30")])
    on_the_day = policy.evaluate([ran(finding())], pol, today=dt.date(2030, 6, 30))
    day_after = policy.evaluate([ran(finding())], pol, today=dt.date(2030, 7, 1))

    assert on_the_day.exit_code == 0
    assert day_after.exit_code == 1 and len(day_after.violations) == 1


@pytest.mark.parametrize("bad, message", [
    ({"id": "DS-0002", "expires": "2030-01-01"}, "'reason' is required"),
    ({"id": "DS-0002", "reason": "r"}, "'expires' is required"),
    ({"id": "DS-0002", "reason": "r", "expires": "next year"}, "not a date"),
    ({"id": "DS-0002", "reason": "r", "expires": "2030-01-01", "until": "x"}, "unknown key"),
])
def test_entry_without_reason_or_expiry_is_rejected(bad, message):
    with pytest.raises(policy.PolicyError, match=message):
        policy.parse({"fail_on": "HIGH", "ignore": [bad]})


def test_thresholds_by_scanner_and_unknown_severity():
    pol = make_policy()
    assert pol.fails(finding(severity="HIGH"))
    assert not pol.fails(finding(severity="MEDIUM"))
    assert pol.fails(finding(severity="MEDIUM", scanner="hadolint"))
    assert not pol.fails(finding(severity="LOW", scanner="bandit"))
    assert pol.fails(finding(severity="UNKNOWN", scanner="pip-audit"))
    with pytest.raises(policy.PolicyError, match="not one of"):
        policy.parse({"fail_on": "SEVERE"})


def test_project_policy_is_valid():
    pol = policy.load(POLICY_FILE)
    assert pol.fail_on in ("HIGH", "CRITICAL", "MEDIUM", "LOW")
    assert all(e.reason and e.expires for e in pol.ignore)


def _policy_file(tmp_path, expires):
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "fail_on": "HIGH", "fail_on_by_scanner": {"hadolint": "MEDIUM"},
        "ignore": [entry(expires, scanner="trivy"),
                   {"id": "DL3002", "scanner": "hadolint", "reason": "root until #12",
                    "expires": expires}]}))
    return path


@pytest.mark.scanners("trivy", "hadolint")
@pytest.mark.parametrize("expires, code", [(days_from_today(30), 0), ("2020-01-31", 1)],
                         ids=["unexpired-suppresses", "expired-fails"])
def test_scan_applies_ignore_entries_end_to_end(tmp_path, expires, code):
    need("trivy")
    need("hadolint")
    # Only the two rules the entries accept would fail this Dockerfile.
    dockerfile = ROOT_DOCKERFILE.replace("FROM python:3.11-slim",
                                         "FROM python:3.11-slim\nHEALTHCHECK CMD [\"true\"]")
    tree = tmp_path / "tree"
    write_tree(tree, {"docker/Dockerfile": dockerfile})

    proc = run_cli("--root", str(tree), "--policy", str(_policy_file(tmp_path, expires)),
                   "--reports", str(tmp_path / "reports"), "--only", "trivy-config,hadolint")

    assert proc.returncode == code, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "reports" / "scan-report.json").read_text())
    dispositions = {f["rule_id"]: f["disposition"] for f in doc["findings"]}
    if code == 0:
        assert dispositions["DS-0002"] == dispositions["DL3002"] == "ignored"
        assert doc["verdict"]["status"] == "PASSED"
    else:
        assert dispositions["DS-0002"] == dispositions["DL3002"] == "violation"
        assert "expired on 2020-01-31" in proc.stdout
        assert len(doc["policy"]["expired"]) == 2
