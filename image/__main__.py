"""`python -m image build|lock-debian`: the image's command line (invoke build calls it).

Errors are one line on stderr with exit 2; a failed step shows its log's tail.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from image import build as image_build
from image import rootfs
from image.engine import EngineError, detect
from image.paths import WORK_DIR


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m image", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build a base and the project layer on it")
    b.add_argument("--base", default="debian", help="official or debian (default)")
    b.add_argument("--gpu", action="store_true",
                   help="debian base with TF 2.9.3 + CUDA 11 / cuDNN 8 wheels (the official "
                        "base is always the GPU image)")
    b.add_argument("--tag", default="", help="image name (default tokenmeter:<variant>, "
                                             "then also tagged tokenmeter:latest)")
    b.add_argument("--fresh", action="store_true",
                   help="no layer cache and a new root filesystem (what CI does)")
    b.add_argument("--engine", choices=("docker", "podman"), default="",
                   help="default: $TOKENMETER_ENGINE, else Docker, else podman")
    sub.add_parser("lock-debian", help="rewrite docker/base/debian-packages.lock from a fresh "
                                       "debootstrap (root)")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            image_build.variant(args.base, args.gpu)  # a wrong --base fails before any engine
            engine = detect(args.engine)
            res = image_build.build(args.base, args.gpu, args.tag, args.fresh, engine)
            total = sum(res.seconds.values())
            print(f"built {res.tag} with {res.engine} in {total:.0f} s "
                  f"({res.size_bytes / 1e9:.2f} GB; log: {res.log})")
        else:
            WORK_DIR.mkdir(parents=True, exist_ok=True)
            path = rootfs.relock(WORK_DIR, WORK_DIR / "lock-debian.log")
            print(f"wrote {path}")
    except (EngineError, image_build.BuildError, rootfs.RootfsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
