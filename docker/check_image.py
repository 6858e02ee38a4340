#!/usr/bin/env python3
"""Build-time check of the image: TF 2.9.x built for CUDA 11.2 / cuDNN 8, packages importable.

Runs in `docker build` (no GPU there) and on demand with `--gpu` in a running container.
Python 3.8 syntax; prints one line per problem and exits 1 if there is any.
"""

import argparse
import importlib
import sys
from typing import Dict, List, Mapping

EXPECTED_TF = "2.9."
EXPECTED_CUDA = "11.2"
EXPECTED_CUDNN = "8"
# Imported at build time so that a wheel broken for Python 3.8 fails the build, not a user.
IMPORTS = ("transformers", "tokenizers", "datasets", "sklearn", "mlflow", "dvc", "fastapi",
           "uvicorn", "httpx", "prometheus_client", "psycopg", "pydantic_settings", "yaml",
           "snownlp", "jupyter_server", "jupyterlab")
PINNED: Dict[str, str] = {"transformers": "4.37.2"}


def tf_problems(version: str, build_info: Mapping[str, object]) -> List[str]:
    """What is wrong with a TF build for this image, from tf.__version__ and get_build_info()."""
    problems = []
    if not version.startswith(EXPECTED_TF):
        problems.append("tensorflow %s, expected %sx" % (version, EXPECTED_TF))
    if not build_info.get("is_cuda_build"):
        problems.append("tensorflow is not a CUDA build")
    cuda = str(build_info.get("cuda_version", ""))
    if cuda != EXPECTED_CUDA:
        problems.append("tensorflow built for CUDA %r, expected %s" % (cuda, EXPECTED_CUDA))
    cudnn = str(build_info.get("cudnn_version", ""))
    if cudnn.split(".")[0] != EXPECTED_CUDNN:
        problems.append("tensorflow built for cuDNN %r, expected %s.x" % (cudnn, EXPECTED_CUDNN))
    return problems


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gpu", action="store_true", help="also require a visible GPU")
    args = ap.parse_args(argv)
    import numpy
    import tensorflow as tf

    problems = tf_problems(tf.__version__, tf.sysconfig.get_build_info())
    if int(numpy.__version__.split(".")[0]) >= 2:
        problems.append("numpy %s: TF 2.9 needs numpy<2" % numpy.__version__)
    for name in IMPORTS:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # any import failure is a broken image
            problems.append("import %s failed: %s" % (name, exc))
            continue
        want = PINNED.get(name)
        if want and getattr(module, "__version__", "") != want:
            problems.append("%s %s, expected %s" % (name, module.__version__, want))
    if args.gpu and not tf.config.list_physical_devices("GPU"):
        problems.append("no GPU visible to TensorFlow (NVIDIA driver + container toolkit, "
                        "and `--gpus all` or the compose GPU reservation?)")
    for p in problems:
        print("image check: " + p, file=sys.stderr)
    if not problems:
        print("image check: tensorflow %s (CUDA %s, cuDNN %s) and %d packages OK"
              % (tf.__version__, EXPECTED_CUDA, EXPECTED_CUDNN, len(IMPORTS)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
