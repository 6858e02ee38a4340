"""scripts/env.sh is safe to source from a user's interactive shell: it sets no shell options,
keeps the working folder, and a failure returns an error instead of closing the shell."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV_SH = ROOT / "scripts" / "env.sh"


def interactive(script: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(["bash", "--norc", "-i", "-c", script], capture_output=True,
                          text=True, timeout=600, cwd="/tmp", env={**os.environ, **env})


def test_sourcing_leaves_the_shell_as_it_was_and_puts_the_venv_first():
    out = interactive(f"source {ENV_SH}; echo \"status=$? cwd=$PWD opts=$-\"; "
                      "set -o | grep -E '^(errexit|nounset|pipefail) ' | tr -s ' \\t' ' '; "
                      "command -v dvc")
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("status=0 cwd=/tmp "), out.stdout + out.stderr
    assert "e" not in lines[0].split("opts=")[1] and "u" not in lines[0].split("opts=")[1]
    assert lines[1:4] == ["errexit off", "nounset off", "pipefail off"]
    assert lines[4] == str(ROOT / ".venv" / "bin" / "dvc")


def test_a_failure_returns_an_error_and_the_shell_goes_on():
    out = interactive(f"source {ENV_SH}; echo \"still here, status=$?\"",
                      PYTHON="/nonexistent/python3.11")
    assert "error: /nonexistent/python3.11 not found" in out.stderr
    assert "still here, status=1" in out.stdout
