"""Builds the image: a base (official TF 2.9 GPU image, or one made from Debian) and the one
project layer (docker/Dockerfile, `ARG BASE`) on top of it.

Each step's engine output goes to build/image/<variant>.log; the caller sees one line per
step with its time, and the log's tail when a step fails. It never runs containers.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from image import rootfs
from image.engine import Engine, detect
from image.paths import BASE_DIR, HOST_CA_BUNDLE, LAYER_DOCKERFILE, OFFICIAL_DIGEST, ROOT, WORK_DIR

BASES = ("official", "debian")
LATEST = "tokenmeter:latest"


class BuildError(RuntimeError):
    """A build step failed or cannot start; the message says what to do."""


@dataclass(frozen=True)
class Variant:
    """One buildable image: its base recipe and whether it carries the GPU libraries."""

    base: str
    gpu: bool

    @property
    def name(self) -> str:
        return "official" if self.base == "official" else f"debian-{'gpu' if self.gpu else 'cpu'}"

    @property
    def base_ref(self) -> str:
        return f"localhost/tokenmeter-base:{self.name}"

    @property
    def default_tag(self) -> str:
        return f"tokenmeter:{self.name}"

    @property
    def dockerfile(self) -> Path:
        return BASE_DIR / f"{self.base}.Dockerfile"


def variant(base: str, gpu: bool) -> Variant:
    if base not in BASES:
        raise BuildError(f"unknown base {base!r}: use one of {', '.join(BASES)}")
    # The official image is the GPU image; there is no CPU variant of it to choose.
    return Variant(base, gpu or base == "official")


def official_digest(path: Path = OFFICIAL_DIGEST) -> str:
    lines = [ln.strip() for ln in path.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    if len(lines) != 1 or not re.fullmatch(r"sha256:[0-9a-f]{64}", lines[0]):
        raise BuildError(f"{path.relative_to(ROOT)} holds no digest yet: run `invoke pin-base` "
                         "where Docker Hub is reachable, or build with --base debian")
    return lines[0]


@dataclass
class BuildResult:
    tag: str
    variant: Variant
    engine: str
    seconds: Dict[str, float] = field(default_factory=dict)
    size_bytes: int = 0
    log: Optional[Path] = None


def _common_flags(engine: Engine, fresh: bool) -> List[str]:
    # Host network: the build reaches the package index exactly as this machine does.
    flags = ["--network", "host"]
    if HOST_CA_BUNDLE.is_file():
        flags += ["--secret", f"id=ca,src={HOST_CA_BUNDLE}"]
    if fresh:
        flags += ["--no-cache"]
    if engine.name == "podman":
        flags += ["--format", "docker"]  # HEALTHCHECK and SHELL are Docker-format fields
    return flags


def _step(what: str, argv: List[str], log: Path, say: Callable[[str], None],
          seconds: Dict[str, float], env: Optional[Dict[str, str]] = None,
          hint: str = "") -> None:
    say(f">> {what}{f' ({hint})' if hint else ''}")
    start = time.monotonic()
    with open(log, "a") as out:
        out.write(f"\n### {what}: {' '.join(argv)}\n")
        out.flush()
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, **(env or {})})
    seconds[what] = round(time.monotonic() - start, 1)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").strip().splitlines()[-25:])
        raise BuildError(f"{what} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    say(f"   done in {seconds[what]:.0f} s")


def image_exists(engine: Engine, ref: str) -> bool:
    return subprocess.run(engine.cmd("image", "inspect", "--format", "{{.Id}}", ref),
                          capture_output=True).returncode == 0


def image_size(engine: Engine, ref: str) -> int:
    out = subprocess.run(engine.cmd("image", "inspect", "--format", "{{.Size}}", ref),
                         capture_output=True, text=True)
    return int(out.stdout.strip() or 0) if out.returncode == 0 else 0


def build(base: str = "debian", gpu: bool = False, tag: str = "", fresh: bool = False,
          engine: Optional[Engine] = None, say: Callable[[str], None] = print) -> BuildResult:
    """Build base and layer. `fresh`: no layer cache and a new root filesystem."""
    v = variant(base, gpu)
    eng = engine or detect()
    # tokenmeter:latest (what compose runs) follows default builds only: an explicit --tag
    # (a test's image, say) leaves the user's latest alone.
    tag_latest = not tag
    tag = tag or v.default_tag
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    log = WORK_DIR / f"{v.name}.log"
    log.write_text(f"# {v.name} built with {eng.name} at {datetime.datetime.now():%F %T}\n")
    result = BuildResult(tag=tag, variant=v, engine=eng.name, log=log)
    common = _common_flags(eng, fresh)
    env = {"DOCKER_BUILDKIT": "1"}  # Docker: RUN --mount and COPY --chmod need BuildKit

    if v.base == "debian":
        ref = rootfs.image_ref()
        if fresh or not image_exists(eng, ref):
            say(">> root filesystem: debootstrap bullseye + pinned packages (~1-2 minutes)")
            start = time.monotonic()
            rootfs.build(eng, WORK_DIR, log)
            result.seconds["root filesystem"] = round(time.monotonic() - start, 1)
            say(f"   done in {result.seconds['root filesystem']:.0f} s ({ref})")
        else:
            say(f">> root filesystem: reusing {ref} (--fresh rebuilds it)")
        base_args = ["--build-arg", f"ROOTFS={ref}",
                     "--build-arg", f"VARIANT={'gpu' if v.gpu else 'cpu'}"]
        hint = "TF 2.9.3 + CUDA/cuDNN wheels, ~2 GB download" if v.gpu else "TF 2.9.3 CPU"
    else:
        base_args = ["--build-arg", f"TF_DIGEST={official_digest()}"]
        hint = "pulls tensorflow/tensorflow:2.9.3-gpu-jupyter"
    _step(f"base image {v.base_ref}", eng.build_cmd(*common, *base_args, "-f",
                                                     str(v.dockerfile), "-t", v.base_ref,
                                                     str(ROOT)),
          log, say, result.seconds, env, hint)

    rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip() or "unknown"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    _step(f"project layer {tag}", eng.build_cmd(
        *common, "--build-arg", f"BASE={v.base_ref}", "--build-arg", f"VCS_REF={rev}",
        "--build-arg", f"BUILD_DATE={now}", "-f", str(LAYER_DOCKERFILE), "-t", tag,
        str(ROOT)), log, say, result.seconds, env, "locked packages, build-time check")
    if tag_latest:
        subprocess.run(eng.cmd("tag", tag, LATEST), check=True, capture_output=True)
    result.size_bytes = image_size(eng, tag)
    return result
