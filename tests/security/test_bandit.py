"""bandit on a temporary tree: a shell-injection call is HIGH and fails, `# nosec` does not
hide it (only policy.yaml can); a tree without our code folders is "not run"."""

from __future__ import annotations

import pytest

from security import policy, scan_bandit
from security.findings import NOT_RUN, RAN
from tests.security.scan_trees import make_policy, need, write_tree

pytestmark = pytest.mark.scanners("bandit")

RUNNER = """\
import subprocess


def run(user_text):
    return subprocess.call("echo " + user_text, shell=True)  # nosec
"""


def test_shell_injection_is_caught_despite_nosec(tmp_path):
    need("bandit")
    targets = write_tree(tmp_path, {"serving/runner.py": RUNNER})

    result = scan_bandit.run(targets)

    assert result.status == RAN, result.reason
    assert result.checked.startswith("1 Python files")
    [shell] = [f for f in result.findings if f.rule_id == "B602"]
    assert shell.severity == "HIGH" and shell.location == "serving/runner.py:5"
    verdict = policy.evaluate([result], make_policy())
    assert verdict.exit_code == 1


def test_no_code_is_not_run(tmp_path):
    need("bandit")
    targets = write_tree(tmp_path, {"README.md": "docs only\n"})

    result = scan_bandit.run(targets)

    assert result.status == NOT_RUN and "tasks.py" in result.reason
