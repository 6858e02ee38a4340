"""Helpers for the security tests: small temporary trees to scan, a realistic fake AWS key
made at test time (so no secret-looking string is committed), and the lookup of a scanner
binary (tests that need one are marked `scanners(...)`: tests/conftest.py skips them at
collection, naming the missing scanner)."""

from __future__ import annotations

import datetime as dt
import os
import secrets
import string
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from security import policy
from security.targets import Targets
from security.tools import MissingBinary, find_binary

REPO = Path(__file__).resolve().parents[2]

ROOT_DOCKERFILE = """\
FROM python:3.11-slim
RUN pip install --no-cache-dir flask==3.0.0
COPY app.py /app/app.py
USER root
CMD ["python", "/app/app.py"]
"""

NO_USER_DOCKERFILE = """\
FROM python:3.11-slim
RUN pip install --no-cache-dir flask==3.0.0
COPY app.py /app/app.py
CMD ["python", "/app/app.py"]
"""


def need(tool: str) -> str:
    """The scanner's path, found as the scans find it (security.tools.find_binary). A test that
    calls this carries `pytest.mark.scanners(tool)`, which skips it at collection where the
    binary is missing; missing here anyway is a failure, never a skip."""
    try:
        return find_binary(tool)
    except MissingBinary as exc:
        raise AssertionError(f"scanner binary {tool} is not installed, yet the test ran: mark it "
                             f"pytest.mark.scanners({tool!r}) ({exc})") from None


def fake_aws_credentials() -> Tuple[str, str]:
    """An access key id and secret shaped like real ones (trivy ignores AWS's documented
    example key, so a realistic fake is needed); random, so never a real credential."""
    key_id = "AKIA" + "".join(secrets.choice(string.ascii_uppercase + "234567")
                              for _ in range(16))
    secret = "".join(secrets.choice(string.ascii_letters + string.digits + "+/")
                     for _ in range(40))
    return key_id, secret


def write_tree(root: Path, files: Dict[str, str]) -> Targets:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return Targets.for_root(root)


def make_policy(fail_on: str = "HIGH", ignore: Optional[List[dict]] = None) -> policy.Policy:
    """The shape of the project's policy: HIGH overall, MEDIUM for our Dockerfile and code."""
    return policy.parse({"fail_on": fail_on,
                         "fail_on_by_scanner": {"hadolint": "MEDIUM", "bandit": "MEDIUM"},
                         "ignore": ignore or []}, "test-policy")


def days_from_today(days: int) -> str:
    return (dt.date.today() + dt.timedelta(days=days)).isoformat()


def run_cli(*args: str, env: Optional[Dict[str, str]] = None,
            timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m security ARGS` in a fresh process, as `invoke scan` runs it."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "security", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
