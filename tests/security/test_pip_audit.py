"""pip-audit: a lock whose dependencies were all skipped is "not run", never clean; partial
skips are named; a vulnerability (no severity from pip-audit) ranks by the policy."""

from __future__ import annotations

from security import policy, scan_pip_audit
from security.findings import ERROR, NOT_RUN, PARTIAL, RAN, UNKNOWN
from tests.security.scan_trees import make_policy, need, write_tree

# The JSON pip-audit writes on machines where its service cannot be reached: exit 0,
# "No known vulnerabilities found" on the terminal, and every dependency skipped.
ALL_SKIPPED = {"dependencies": [
    {"name": "pyyaml", "skip_reason":
        "Dependency not found on PyPI and could not be audited: pyyaml (6.0.1)"},
    {"name": "requests", "skip_reason":
        "Dependency not found on PyPI and could not be audited: requests (2.19.0)"}],
    "fixes": []}

SOME_AUDITED = {"dependencies": [
    {"name": "requests", "version": "2.19.0", "vulns": [
        {"id": "PYSEC-2018-28", "fix_versions": ["2.20.0"], "aliases": ["CVE-2018-18074"],
         "description": "The Requests package sends an HTTP Authorization header to an "
                        "http URI upon receiving a same-hostname https-to-http redirect."}]},
    {"name": "pyyaml", "skip_reason":
        "Dependency not found on PyPI and could not be audited: pyyaml (6.0.1)"}],
    "fixes": []}


def test_all_skipped_is_not_run():
    result = scan_pip_audit.interpret(ALL_SKIPPED, "pip-audit-host", "requirements.lock")

    assert result.status == NOT_RUN
    assert "skipped all 2 dependencies" in result.reason
    assert "nothing was audited" in result.reason


def test_partial_audit_names_skips_and_vulnerability_fails():
    result = scan_pip_audit.interpret(SOME_AUDITED, "pip-audit-host", "requirements.lock")

    assert result.status == PARTIAL
    assert result.checked == "requirements.lock: 1 of 2 dependencies audited"
    assert "pyyaml" in result.reason
    [vuln] = result.findings
    assert (vuln.rule_id, vuln.severity, vuln.path) == ("PYSEC-2018-28", UNKNOWN,
                                                        "requests 2.19.0")
    assert vuln.fix == "upgrade requests to 2.20.0"
    verdict = policy.evaluate([result], make_policy())  # UNKNOWN ranks as HIGH by default
    assert verdict.exit_code == 1
    assert "only partly checked: pip-audit-host" in verdict.summary()


def test_real_pip_audit_never_reports_an_unaudited_lock_as_clean(tmp_path):
    need("pip-audit")
    targets = write_tree(tmp_path, {"requirements.lock": "pyyaml==6.0.1\nidna==3.7\n"})

    result = scan_pip_audit.host(targets)

    # Offline it skips everything ("not run"); online it audits ("ran"/"partial").
    assert result.status != ERROR, result.reason
    if result.status == NOT_RUN:
        assert "nothing was audited" in result.reason or "timed out" in result.reason
    else:
        assert result.status in (RAN, PARTIAL)
        assert not result.checked.startswith("requirements.lock: 0 of")


def test_missing_lock_is_not_run(tmp_path):
    need("pip-audit")
    targets = write_tree(tmp_path, {"requirements.lock": "idna==3.7\n"})

    result = scan_pip_audit.image(targets)

    assert result.status == NOT_RUN
    assert result.reason == "docker/requirements.lock does not exist yet"
