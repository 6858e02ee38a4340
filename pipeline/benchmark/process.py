"""Child processes on 127.0.0.1, the one way the project starts them: a free port, the command in
its own process group with its output in a log file, a wait until it is ready (an HTTP path
answering 200, or any check), and a stop of the whole group (SIGTERM, then SIGKILL) whatever
happened. Used by the benchmark's servers and by the endpoint and container tests.

Knows how to run a command and speak a little HTTP to it; not what the server does. Failures
are `ProcessError` (the message, the log's path and tail); each caller turns it into its own
kind of failure (the benchmark into one `PipelineError` line, tests into AssertionError).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from pipeline.errors import fail

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    """True when no socket listens on the port. SO_REUSEADDR, as a server would set it: closed
    connections lingering in TIME_WAIT (a server that closes first leaves them) do not count."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
        return True


def http_get(port: int, path: str, timeout: float = 10.0) -> "tuple[int, str]":
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def answers_200(port: int, path: str) -> Callable[[], bool]:
    """A readiness check: GET `path` on 127.0.0.1:`port` answers 200."""

    def check() -> bool:
        try:
            return http_get(port, path, timeout=2)[0] == 200
        except OSError:
            return False

    return check


def serving_cli(args: Sequence[str], env: Dict[str, str], cwd: Path) -> str:
    """`python -m serving ARGS` (e.g. keys create); its stdout, or one line on failure."""
    r = subprocess.run([sys.executable, "-m", "serving", *args], cwd=cwd,
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        fail(f"`python -m serving {' '.join(args[:2])}` failed: {last}")
    return r.stdout


def cpu_seconds(pid: int) -> Optional[float]:
    """User + system CPU time of a live process (Linux /proc), or None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def read_log(path: Optional[Path]) -> str:
    """The whole log ('' when there is none yet)."""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace") if path else ""
    except OSError:
        return ""


class ProcessError(Exception):
    """A process exited before it was ready, or was not ready in time. `str()` says which;
    `log_path` and `tail()` / `last_line()` give what it wrote, for the caller to show."""

    def __init__(self, message: str, log_path: Optional[Path] = None):
        super().__init__(message)
        self.log_path = log_path

    def tail(self, chars: int = 3000) -> str:
        return read_log(self.log_path)[-chars:]

    def last_line(self) -> str:
        if self.log_path is None or not Path(self.log_path).exists():
            return "no log"
        return (read_log(self.log_path).splitlines() or ["no output"])[-1][:300]


def start_group(argv: Sequence[str], log_path: Path, env: Optional[Dict[str, str]] = None,
                cwd: Optional[Path] = None, **popen_kw: Any) -> subprocess.Popen:
    """`argv` as the leader of a new session (so `stop_group` reaches all it spawns), stdout
    and stderr appended to `log_path`; `env` is the whole environment (None: inherit)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(list(argv), cwd=cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, **popen_kw)


def wait_ready(proc: subprocess.Popen, ready: Callable[[], bool], timeout_s: float,
               what: str = "process", log_path: Optional[Path] = None,
               poll_s: float = 0.3) -> None:
    """Poll `ready` until true; ProcessError if `proc` exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ProcessError(f"{what} exited with {proc.returncode} before it was ready",
                               log_path)
        if ready():
            return
        time.sleep(poll_s)
    raise ProcessError(f"{what} not ready after {timeout_s:.0f}s", log_path)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the process group, SIGKILL the leader if it outlives `grace_s`, reap it, then
    SIGKILL whatever is left in the group (the leader may be gone while children run)."""
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=grace_s)
    signal_group(proc, signal.SIGKILL)


class Process:
    """One command in its own process group, its output in `log_path`: `launch()`, then
    `wait_until(check)` or `wait_http(port, path)`; `stop()` (or `kill()`) ends the group.
    As a context manager it stops the group on leaving, whatever happened inside."""

    def __init__(self, argv: Sequence[str], log_path: Path,
                 env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
                 what: str = "process", **popen_kw: Any):
        self.argv: List[str] = list(argv)
        self.log_path, self.env, self.cwd, self.what = Path(log_path), env, cwd, what
        self.popen_kw = popen_kw
        self.proc: Optional[subprocess.Popen] = None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def launch(self) -> "Process":
        self.proc = start_group(self.argv, self.log_path, self.env, self.cwd, **self.popen_kw)
        return self

    def wait_until(self, ready: Callable[[], bool], timeout_s: float) -> "Process":
        """Wait for `ready`; on ProcessError the group is stopped before it propagates."""
        assert self.proc is not None, "launch() first"
        try:
            wait_ready(self.proc, ready, timeout_s, self.what, self.log_path)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_http(self, port: int, path: str, timeout_s: float) -> "Process":
        return self.wait_until(answers_200(port, path), timeout_s)

    def log(self) -> str:
        return read_log(self.log_path)

    def stop(self, grace_s: float = 30.0) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace_s)

    def kill(self) -> None:
        """SIGKILL the group at once (a crash, not a shutdown) and reap the leader."""
        if self.proc is not None:
            signal_group(self.proc, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerProcess(Process):
    """A benchmarked server on `port`: entering starts it and waits for `ready_path` to answer
    200; leaving stops the group. A server that cannot start is one PipelineError line."""

    def __init__(self, name: str, argv: List[str], env: Dict[str, str], cwd: Path,
                 log_path: Path, port: int, ready_path: str, ready_timeout_s: float = 180):
        super().__init__(argv, log_path, {**os.environ, **env}, cwd, f"{name} server")
        self.name = name
        self.port, self.ready_path, self.ready_timeout_s = port, ready_path, ready_timeout_s
        self.url = f"http://{HOST}:{port}"

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def start(self) -> None:
        self.launch()
        try:
            self.wait_http(self.port, self.ready_path, self.ready_timeout_s)
        except ProcessError as exc:
            fail(f"{exc}: {exc.last_line()} (log: {self.log_path})")
