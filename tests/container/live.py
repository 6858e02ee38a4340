"""Real containers for the image tests: run, exec, inspect, stop and always clean up.

Every container and volume a test makes carries a unique prefix and is removed at teardown,
whatever the test did. The engine (podman or Docker) and its flags come from `image.engine`,
exactly as `invoke build` uses them.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from typing import Dict, List, Optional

from image.engine import Engine


class Container:
    def __init__(self, engine: Engine, name: str):
        self.engine, self.name = engine, name

    def exec(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.engine.cmd("exec", self.name, *argv), capture_output=True,
                              text=True, timeout=timeout)

    def inspect(self, fmt: str) -> str:
        return subprocess.run(self.engine.cmd("inspect", "--format", fmt, self.name),
                              capture_output=True, text=True, check=True).stdout.strip()

    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    def logs(self) -> str:
        out = subprocess.run(self.engine.cmd("logs", self.name), capture_output=True,
                             text=True)
        return out.stdout + out.stderr

    def stop(self, timeout_s: int = 30) -> int:
        """SIGTERM (then SIGKILL after timeout_s), as `docker stop`; the exit code."""
        subprocess.run(self.engine.cmd("stop", "-t", str(timeout_s), self.name),
                       capture_output=True, timeout=timeout_s + 60, check=True)
        return int(self.inspect("{{.State.ExitCode}}"))

    def wait_http(self, url: str, deadline_s: float = 120, headers: Optional[Dict] = None,
                  ok=(200,)) -> None:
        """Poll `url` until it answers one of `ok`; fail with the container's logs."""
        end = time.monotonic() + deadline_s
        last = ""
        while time.monotonic() < end:
            if not self.running():
                raise AssertionError(f"{self.name} stopped before {url} answered:\n"
                                     f"{self.logs()[-3000:]}")
            try:
                req = urllib.request.Request(url, headers=headers or {})
                with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 (loopback)
                    if resp.status in ok:
                        return
                    last = str(resp.status)
            except urllib.error.HTTPError as exc:
                if exc.code in ok:
                    return
                last = str(exc.code)
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(1)
        raise AssertionError(f"{url} not ready after {deadline_s:.0f} s ({last}):\n"
                             f"{self.logs()[-3000:]}")


class Containers:
    """Factory for containers and volumes of one test module, all removed by `cleanup`."""

    def __init__(self, engine: Engine, image: str):
        self.engine, self.image = engine, image
        self.prefix = f"tmtest-{secrets.token_hex(3)}"
        self.names: List[str] = []
        self.volumes: List[str] = []

    def volume(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        if full not in self.volumes:
            self.volumes.append(full)
        return full

    def start(self, *args: str, name: str = "c") -> Container:
        """`run -d` of the image with `args` (options, then the command after the image)."""
        full = f"{self.prefix}-{name}"
        self.names.append(full)
        proc = subprocess.run(self.engine.run_cmd("-d", "--name", full, *args),
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return Container(self.engine, full)

    def once(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`run --rm`: a one-off container; returns its exit status and output."""
        return subprocess.run(self.engine.run_cmd("--rm", *args), capture_output=True,
                              text=True, timeout=timeout)

    def cleanup(self) -> None:
        for name in reversed(self.names):
            subprocess.run(self.engine.cmd("rm", "-f", "-v", "-t", "5", name), capture_output=True)
        for vol in self.volumes:
            subprocess.run(self.engine.cmd("volume", "rm", "-f", vol), capture_output=True)


def image_labels(engine: Engine, image: str) -> Dict[str, str]:
    out = subprocess.run(engine.cmd("image", "inspect", "--format", "{{json .Labels}}", image),
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out) or {}
