"""The `debian` base's root filesystem: debootstrap bullseye, every package version pinned.

Builds the tree with debootstrap (minbase + docker/base/debian-packages.in, then bullseye's
updates and security suites), compares every installed package with
docker/base/debian-packages.lock, and imports the tree into the engine as an image. It needs
root and Debian's archive; it knows nothing of Python packages (docker/base/debian.Dockerfile).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List

from image.engine import Engine
from image.paths import BASE_DIR

SUITE = "bullseye"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("DEBIAN_SECURITY_MIRROR",
                                 "http://deb.debian.org/debian-security")
PACKAGES_IN = BASE_DIR / "debian-packages.in"
PACKAGES_LOCK = BASE_DIR / "debian-packages.lock"
LOCK_HEADER = ("# Every Debian package of the `debian` base image, name=version, as installed by\n"
               "# `python -m image lock-debian` (debootstrap --variant=minbase bullseye +\n"
               "# debian-packages.in, upgraded from bullseye-updates and bullseye-security).\n"
               "# A build whose root filesystem differs from this list fails.\n")
# A clean environment for commands in the new root: nothing of the host's leaks in.
CHROOT_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
              "LANG": "C.UTF-8", "HOME": "/root"}


class RootfsError(RuntimeError):
    """The root filesystem could not be made or does not match its lock (one line)."""


def wanted_packages() -> List[str]:
    lines = PACKAGES_IN.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def read_lock(text: str) -> Dict[str, str]:
    pins = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.strip().partition("=")
            pins[name] = version
    return pins


def lock_diff(want: Dict[str, str], have: Dict[str, str]) -> List[str]:
    """Human-readable differences between the lock (`want`) and a root (`have`)."""
    out = []
    for name in sorted(set(want) | set(have)):
        if want.get(name) != have.get(name):
            out.append(f"{name}: locked {want.get(name, '(absent)')}, "
                       f"installed {have.get(name, '(absent)')}")
    return out


def image_ref() -> str:
    """Tag of the imported root: changes whenever the package list or its lock changes."""
    digest = hashlib.sha256(PACKAGES_IN.read_bytes() + PACKAGES_LOCK.read_bytes()).hexdigest()
    return f"localhost/tokenmeter-rootfs:{SUITE}-{digest[:12]}"


def _run(argv: List[str], what: str, log: Path, **kw) -> None:
    with open(log, "a") as out:
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, **kw)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        raise RootfsError(f"{what} failed (exit {proc.returncode}); last lines of {log}:\n"
                          + "\n".join(tail))


def installed(root: Path) -> Dict[str, str]:
    out = subprocess.run(["dpkg-query", f"--admindir={root}/var/lib/dpkg", "-W",
                          "-f", "${Package}=${Version}\\n"],
                         check=True, capture_output=True, text=True).stdout
    return read_lock(out)


def make_tree(root: Path, log: Path) -> None:
    """debootstrap + updates + security upgrade, then strip what an image must not carry."""
    if os.geteuid() != 0:
        raise RootfsError("the debian base needs root (debootstrap, chroot); run as root")
    if shutil.which("debootstrap") is None:
        raise RootfsError("debootstrap is not installed (Debian: apt-get install debootstrap)")
    _run(["debootstrap", "--variant=minbase", "--include=" + ",".join(wanted_packages()),
          SUITE, str(root), MIRROR], "debootstrap", log)
    (root / "etc/apt/sources.list").write_text(
        f"deb {MIRROR} {SUITE} main\n"
        f"deb {MIRROR} {SUITE}-updates main\n"
        f"deb {SECURITY_MIRROR} {SUITE}-security main\n")
    _run(["chroot", str(root), "/bin/sh", "-c",
          "apt-get update -qq && apt-get upgrade -y -qq && apt-get clean"],
         "apt-get upgrade in the new root", log, env=CHROOT_ENV)
    # No apt lists (stale tomorrow), no host keys (each container volume makes its own).
    for pattern in ("var/lib/apt/lists/*", "etc/ssh/ssh_host_*", "var/cache/apt/*.bin",
                    "var/log/*.log", "var/log/apt/*"):
        for path in root.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()


def import_tree(engine: Engine, root: Path, ref: str, log: Path) -> None:
    tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-cf", "-", "."],
                           stdout=subprocess.PIPE)
    try:
        _run(engine.cmd("import", "--change", 'CMD ["/bin/bash"]', "-", ref),
             f"{engine.name} import", log, stdin=tar.stdout)
    finally:
        if tar.stdout:
            tar.stdout.close()
        tar.wait()


def build(engine: Engine, work: Path, log: Path) -> str:
    """Make, check and import the root filesystem; return its image reference."""
    ref = image_ref()
    root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=work))
    try:
        make_tree(root, log)
        diff = lock_diff(read_lock(PACKAGES_LOCK.read_text()), installed(root))
        if diff:
            shown = "; ".join(diff[:5]) + (f"; and {len(diff) - 5} more" if len(diff) > 5
                                           else "")
            raise RootfsError(f"Debian {SUITE} no longer matches {PACKAGES_LOCK.name} ({shown});"
                              f" review and run `python -m image lock-debian` to accept")
        import_tree(engine, root, ref, log)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return ref


def relock(work: Path, log: Path) -> Path:
    """Write debian-packages.lock from a fresh tree (the Debian side of `invoke lock-image`)."""
    root = Path(tempfile.mkdtemp(prefix="rootfs-", dir=work))
    try:
        make_tree(root, log)
        pins = installed(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    tmp = PACKAGES_LOCK.with_suffix(".tmp")
    tmp.write_text(LOCK_HEADER + "".join(f"{n}={v}\n" for n, v in sorted(pins.items())))
    tmp.replace(PACKAGES_LOCK)
    return PACKAGES_LOCK
