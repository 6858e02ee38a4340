"""The image's Python locks: one per base for the project layer, and the debian base's own.

`python -m image.locks` (invoke lock-image) resolves, with uv, hashes required:
- docker/locks/official.lock: docker/requirements.in for CPython 3.8 (the official base);
- docker/locks/debian.lock: the same inputs with the CPU build of TF for CPython 3.9, TF
  itself left out (the debian base installs it);
- docker/base/debian-{cpu,gpu}.lock: the debian base's TF + Jupyter (+ CUDA wheels), with
  debian.lock as constraints, so base and layer agree on every shared package.
It never installs anything.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import List

from image.paths import BASE_DIR, LAYER_INPUTS, LOCKS_DIR, ROOT, WORK_DIR

PLATFORM = "x86_64-manylinux_2_17"


def _compile(inputs: Path, output: Path, python: str, extra: List[str]) -> None:
    # Relative paths from the repository root: the locks' "via" comments name them.
    argv = ["uv", "pip", "compile", _rel(inputs), "--python-version", python,
            "--python-platform", PLATFORM, "--generate-hashes", "--no-header",
            "--quiet", "-o", _rel(output), *extra]
    print(f">> {_rel(output)} (CPython {python})")
    subprocess.run(argv, check=True, cwd=ROOT)


def _rel(path: Path) -> str:
    return str(path.resolve().relative_to(ROOT))


def pins_only(lock_text: str) -> str:
    """`name==version` lines of a hashed lock, usable as uv constraints."""
    return "".join(m.group(1) + "\n" for m in re.finditer(r"^([A-Za-z0-9._-]+==\S+)",
                                                          lock_text, re.M))


def main() -> None:
    _compile(LAYER_INPUTS, LOCKS_DIR / "official.lock", "3.8", [])
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    debian_in = WORK_DIR / "requirements-debian.in"
    debian_in.write_text(LAYER_INPUTS.read_text().replace("tensorflow==2.9.3",
                                                          "tensorflow-cpu==2.9.3"))
    debian_lock = LOCKS_DIR / "debian.lock"
    _compile(debian_in, debian_lock, "3.9", ["--no-emit-package", "tensorflow-cpu"])
    constraints = WORK_DIR / "debian-constraints.txt"
    constraints.write_text(pins_only(debian_lock.read_text()))
    for variant in ("cpu", "gpu"):
        _compile(BASE_DIR / f"debian-{variant}.in", BASE_DIR / f"debian-{variant}.lock",
                 "3.9", ["-c", _rel(constraints)])


if __name__ == "__main__":
    main()
