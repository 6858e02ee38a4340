"""N endpoint replicas behind HAProxy, as deploy/haproxy/haproxy.cfg runs them: that committed
file with this run's ports and server count, Debian's `haproxy` started on it once every
replica is ready, and all of it stopped (balancer first) whatever happens. Used by the `scale`
command and by tests/serving/test_replicas.py.

Starts and stops processes (`process`); knows nothing of ledgers, keys or load. The replicas are
`Process` objects with a `port` (the caller builds them with its own environment: the same
ledger, Redis, ...), launched together so their models load at the same time.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import List, Optional, Protocol, Sequence

from pipeline.benchmark.process import HOST, Process, free_port
from pipeline.errors import fail

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
_SERVER = re.compile(r"^(?P<indent>[ \t]*)server r\d+ 127\.0\.0\.1:\d+(?P<rest>.*)$", re.M)


class Replica(Protocol):
    port: int

    def launch(self) -> object: ...

    def wait_http(self, port: int, path: str, timeout_s: float) -> object: ...

    def stop(self, grace_s: float = 30.0) -> None: ...


def haproxy_config(front: int, backends: Sequence[int], template: Optional[str] = None) -> str:
    """The committed config (or `template`) listening on `front`, its `server rN` lines replaced
    by one per port of `backends` (r1, r2, ...), each with the first line's options."""
    text = HAPROXY_CFG.read_text(encoding="utf-8") if template is None else template
    if not backends:
        raise ValueError("no backend ports")
    if "bind 127.0.0.1:8000" not in text:
        raise ValueError("haproxy.cfg: no `bind 127.0.0.1:8000` line to rewrite")
    text = text.replace("bind 127.0.0.1:8000", f"bind 127.0.0.1:{front}")
    found = list(_SERVER.finditer(text))
    if not found:
        raise ValueError("haproxy.cfg: no `server rN 127.0.0.1:PORT` line to rewrite")
    first, last = found[0], found[-1]
    if text[first.start(): last.end()].count("\n") != len(found) - 1:
        raise ValueError("haproxy.cfg: the `server rN` lines are not one block")
    lines = [f"{first['indent']}server r{i} 127.0.0.1:{port}{first['rest']}"
             for i, port in enumerate(backends, 1)]
    return text[: first.start()] + "\n".join(lines) + text[last.end():]


def haproxy_binary() -> str:
    """Path of `haproxy`, or one PipelineError line naming the Debian package."""
    exe = shutil.which("haproxy")
    if exe is None:
        fail("haproxy is not installed: install Debian's `haproxy` package "
             "(scripts/system-packages.sh)")
    return exe


class Cluster:
    """`replicas` behind one HAProxy on a free port of 127.0.0.1 (`url`). `start()` launches every
    replica, waits for each /readyz, writes `workdir`/haproxy.cfg and starts the balancer; a
    replica or balancer that is not ready is a ProcessError after everything was stopped.
    `stop()` (or leaving the `with` block) stops the balancer, then the replicas."""

    def __init__(self, replicas: Sequence[Replica], workdir: Path,
                 ready_timeout_s: float = 180.0, balancer_timeout_s: float = 60.0):
        self.replicas: List[Replica] = list(replicas)
        self.workdir = Path(workdir)
        self.ready_timeout_s, self.balancer_timeout_s = ready_timeout_s, balancer_timeout_s
        self.front = free_port()
        self.url = f"http://{HOST}:{self.front}"
        self.config = self.workdir / "haproxy.cfg"
        self.balancer = Process([haproxy_binary(), "-f", str(self.config), "-db"],
                                self.workdir / "haproxy.log", what="haproxy")

    def start(self) -> "Cluster":
        try:
            for r in self.replicas:
                r.launch()
            for r in self.replicas:
                r.wait_http(r.port, "/readyz", self.ready_timeout_s)
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.config.write_text(haproxy_config(self.front, [r.port for r in self.replicas]),
                                   encoding="utf-8")
            self.balancer.launch().wait_http(self.front, "/readyz", self.balancer_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Balancer first (no request reaches a stopping replica), then every replica; each
        stop is tried even when an earlier one fails."""
        errors: List[BaseException] = []
        stops = [self.balancer.stop] + [r.stop for r in self.replicas]
        for stop in stops:
            try:
                stop()
            except Exception as exc:  # noqa: BLE001 (re-raised below, after the others)
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
