"""The servers the benchmark measures, as child processes on 127.0.0.1: start, wait until ready,
and always stop the whole process group (also when the load or the caller fails).

Knows how to run a command and speak a little HTTP to it; not what the server does.
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
from typing import Dict, List, Optional, Sequence

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


class ServerProcess:
    """A server command in its own process group, its output in `log_path`.

    Use as a context manager: entering starts it and waits for `ready_path` to answer 200;
    leaving stops the group (SIGTERM, then SIGKILL) whatever happened inside.
    """

    def __init__(self, name: str, argv: List[str], env: Dict[str, str], cwd: Path,
                 log_path: Path, port: int, ready_path: str, ready_timeout_s: float = 180):
        self.name, self.argv, self.env, self.cwd = name, argv, env, cwd
        self.log_path, self.port, self.ready_path = log_path, port, ready_path
        self.ready_timeout_s = ready_timeout_s
        self.proc: Optional[subprocess.Popen] = None
        self.url = f"http://{HOST}:{port}"

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            # A new session makes the server a group leader: stop() can signal all it spawned.
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env={**os.environ, **self.env},
                                         stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                fail(f"{self.name} server exited with {self.proc.returncode} before it was "
                     f"ready: {self.last_log_line()} (log: {self.log_path})")
            try:
                if http_get(self.port, self.ready_path, timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        fail(f"{self.name} server not ready after {self.ready_timeout_s:.0f}s "
             f"(log: {self.log_path})")

    def last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "no log"
        return (lines or ["no output"])[-1][:300]

    def stop(self, timeout_s: float = 30) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout=timeout_s)
        # Anything the server left in its group goes too.
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
