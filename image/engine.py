"""Which container engine runs here (Docker or podman) and the flags each call needs.

Owns the argv prefix for build/run/import so that callers never spell engine flags. It does
not decide what to build (see `image.build`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

# Hybrid (v1 + unified) cgroup hosts: crun refuses them ("cgroups in hybrid mode not
# supported") and systemd is not PID 1 in a CI sandbox, so podman runs with runc + cgroupfs.
HYBRID_MARKER = Path("/sys/fs/cgroup/unified")
SYSTEMD_MARKER = Path("/run/systemd/system")


class EngineError(RuntimeError):
    """No usable engine; the message is one line that says what to install or start."""


@dataclass(frozen=True)
class Engine:
    name: str                                   # "docker" or "podman"
    global_flags: List[str] = field(default_factory=list)
    # podman raises RLIMIT_NOFILE/NPROC for each container unless told exact values, and an
    # unprivileged sandbox refuses the raise: pin them to what this process already has.
    ulimits: List[str] = field(default_factory=list)

    def cmd(self, *args: str) -> List[str]:
        return [self.name, *self.global_flags, *args]

    def build_cmd(self, *args: str) -> List[str]:
        return self.cmd("build", *self.ulimits, *args)

    def run_cmd(self, *args: str) -> List[str]:
        return self.cmd("run", *self.ulimits, *args)

    def create_cmd(self, *args: str) -> List[str]:
        return self.cmd("create", *self.ulimits, *args)

    def compose_cmd(self, *args: str) -> List[str]:
        """`docker compose ARGS`, or podman-compose with this engine's flags (podman 4.3 has
        no `podman compose`; Debian's podman-compose passes flags through these options)."""
        if self.name == "docker":
            return ["docker", "compose", *args]
        if shutil.which("podman-compose") is None:
            raise EngineError("compose with podman needs podman-compose "
                              "(Debian: apt-get install podman-compose)")
        return ["podman-compose", "--podman-args", " ".join(self.global_flags),
                "--podman-run-args", " ".join(self.ulimits), *args]


def _answers(argv: Sequence[str]) -> Optional[str]:
    """None when `argv` runs and exits 0, else its last line of complaint."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    if proc.returncode == 0:
        return None
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit {proc.returncode}"


def podman_flags() -> List[str]:
    flags: List[str] = []
    if HYBRID_MARKER.is_dir() and shutil.which("runc"):
        flags += ["--runtime", "runc"]
    if not SYSTEMD_MARKER.is_dir():
        flags += ["--cgroup-manager=cgroupfs"]
    return flags


# Ceilings for the values above: on our CI machines a sandbox reports a hard RLIMIT_NPROC of
# ~96k but refuses runc setting it (32768 passes), and refuses any NOFILE raise.
ULIMIT_CAPS = {"nofile": 65536, "nproc": 32768}


def current_ulimits() -> List[str]:
    import resource

    out = []
    for name, res in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        _, hard = resource.getrlimit(res)
        value = ULIMIT_CAPS[name] if hard == resource.RLIM_INFINITY else min(hard,
                                                                           ULIMIT_CAPS[name])
        # Soft = hard, at most what this process has: never a raise the sandbox would refuse.
        out += ["--ulimit", f"{name}={value}:{value}"]
    return out


def detect(prefer: str = "") -> Engine:
    """The first engine that answers: $TOKENMETER_ENGINE or `prefer`, else Docker, then podman."""
    wanted = prefer or os.environ.get("TOKENMETER_ENGINE", "")
    names = [wanted] if wanted else ["docker", "podman"]
    why = []
    for name in names:
        if name not in ("docker", "podman"):
            raise EngineError(f"unknown engine {name!r}: use docker or podman")
        if shutil.which(name) is None:
            why.append(f"no `{name}` command")
            continue
        engine = (Engine("docker") if name == "docker"
                  else Engine("podman", podman_flags(), current_ulimits()))
        problem = _answers(engine.cmd("info", "--format", "{{.Host.Arch}}")
                           if name == "podman" else engine.cmd("info", "--format",
                                                               "{{.ServerVersion}}"))
        if problem is None:
            return engine
        why.append(f"{name}: {problem}")
    raise EngineError("no container engine runs here (" + "; ".join(why) + "); install Docker "
                      "Engine, or podman (Debian: apt-get install podman buildah runc)")
