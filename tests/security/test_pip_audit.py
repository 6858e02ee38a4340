"""pip-audit: a lock whose dependencies were all skipped is "not run", never clean; partial
skips are named; a vulnerability (no severity from pip-audit) ranks by the policy; the image
locks (one per base) make one check that is only "ran" when every lock was audited."""

from __future__ import annotations

from security import policy, scan_pip_audit
from security.findings import ERROR, NOT_RUN, PARTIAL, RAN, UNKNOWN, combine, error
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


ALL_AUDITED = {"dependencies": [
    {"name": "requests", "version": "2.19.0", "vulns": SOME_AUDITED["dependencies"][0]["vulns"]},
    {"name": "idna", "version": "3.7", "vulns": []}], "fixes": []}


def test_image_locks_make_one_check_no_better_than_its_worst_lock():
    check = "pip-audit-image"
    debian = scan_pip_audit.interpret(ALL_AUDITED, check, "docker/locks/debian.lock")
    official = scan_pip_audit.interpret(ALL_SKIPPED, check, "docker/locks/official.lock")
    assert (debian.status, official.status) == (RAN, NOT_RUN)

    both = combine(check, "pip-audit", [debian, official])

    # One lock audited, the other not: partial, naming the lock that was not checked.
    assert both.status == PARTIAL
    assert both.checked == "docker/locks/debian.lock: 2 of 2 dependencies audited"
    assert "docker/locks/official.lock" in both.reason and "nothing was audited" in both.reason
    [vuln] = both.findings
    assert (vuln.target, vuln.rule_id) == ("docker/locks/debian.lock", "PYSEC-2018-28")
    verdict = policy.evaluate([both], make_policy())
    assert verdict.exit_code == 1 and "only partly checked: pip-audit-image" in verdict.summary()
    # A lock that broke makes the check an error; none audited is "not run", never clean.
    broke = error(check, "pip-audit", "pip-audit exited 2 without a report: boom",
                  checked="docker/locks/official.lock")
    assert combine(check, "pip-audit", [debian, broke]).status == ERROR
    assert combine(check, "pip-audit", [official, official]).status == NOT_RUN
    assert combine(check, "pip-audit", [debian, debian]).status == RAN


def test_real_pip_audit_audits_every_image_lock(tmp_path):
    need("pip-audit")
    targets = write_tree(tmp_path, {"docker/locks/official.lock": "idna==3.7\n",
                                    "docker/locks/debian.lock": "pyyaml==6.0.1\n",
                                    "docker/requirements.lock": "requests==2.19.0\n"})

    result = scan_pip_audit.image(targets)

    assert result.status != ERROR, result.reason
    said = result.checked + " " + result.reason
    # Both locks were given to pip-audit (offline: both skipped, named in the reason); the
    # pre-split docker/requirements.lock is not read any more.
    assert "docker/locks/debian.lock" in said and "docker/locks/official.lock" in said
    assert "requirements.lock" not in said.replace("docker/locks/", "")


def test_missing_locks_are_not_run(tmp_path):
    need("pip-audit")
    targets = write_tree(tmp_path, {"requirements.lock": "idna==3.7\n",
                                    "docker/locks/README.md": "no lock yet\n"})

    result = scan_pip_audit.image(targets)

    assert result.status == NOT_RUN
    assert result.reason == "docker/locks/*.lock does not exist yet"
