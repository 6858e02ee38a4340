#!/usr/bin/env python3
"""Build-time check of the image: TF 2.9.x, its CUDA libraries, the locked packages.

On a GPU base (official, debian-gpu): TF built for CUDA 11.2 / cuDNN 8, and every CUDA and
cuDNN library TF 2.9 dlopens at run time present and loadable -- provable without a GPU. On
the CPU base (debian-cpu): the CPU build of TF 2.9. Runs in the image build (no GPU there)
and on demand with `--gpu` in a running container (then a visible GPU is required too).
Python 3.8 syntax; prints one line per problem and exits 1 if there is any.
"""

import argparse
import ctypes
import importlib
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

EXPECTED_TF = "2.9."
EXPECTED_CUDA = "11.2"
EXPECTED_CUDNN = "8"
# Imported at build time so that a wheel broken for Python 3.8 fails the build, not a user.
IMPORTS = ("transformers", "tokenizers", "datasets", "sklearn", "mlflow", "dvc", "fastapi",
           "uvicorn", "httpx", "prometheus_client", "psycopg", "psycopg_pool", "tenacity", "redis",
           "pydantic_settings", "yaml",
           "snownlp", "jupyter_server", "jupyterlab")
PINNED: Dict[str, str] = {"transformers": "4.37.2"}
BASE_FILE = Path("/etc/tokenmeter/base")  # written by docker/base/*.Dockerfile
# The sonames TF 2.9's dso_loader opens on first GPU use (CUDA 11 runtime, cuBLAS, cuFFT,
# cuRAND, cuSOLVER, cuSPARSE, cuDNN 8 and the sub-libraries cuDNN 8 loads lazily). A
# missing one shows up only on a GPU, as a silent fall back to the CPU; here it fails the build.
CUDA_LIBRARIES = ("libcudart.so.11.0", "libcublas.so.11", "libcublasLt.so.11",
                  "libcufft.so.10", "libcurand.so.10", "libcusolver.so.11",
                  "libcusparse.so.11", "libcudnn.so.8", "libcudnn_ops_infer.so.8",
                  "libcudnn_ops_train.so.8", "libcudnn_cnn_infer.so.8",
                  "libcudnn_cnn_train.so.8", "libcudnn_adv_infer.so.8",
                  "libcudnn_adv_train.so.8")


def missing_libraries(names: Sequence[str]) -> List[str]:
    """The libraries of `names` that the dynamic loader cannot open, with its reason."""
    problems = []
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError as exc:
            problems.append("cannot load %s: %s" % (name, exc))
    return problems


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


def cpu_tf_problems(version: str) -> List[str]:
    if not version.startswith(EXPECTED_TF):
        return ["tensorflow %s, expected %sx" % (version, EXPECTED_TF)]
    return []


def main(argv: List[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gpu", action="store_true", help="also require a visible GPU")
    ap.add_argument("--base", default="", help="official, debian-gpu or debian-cpu "
                    "(default: read from %s)" % BASE_FILE)
    args = ap.parse_args(argv)
    base = args.base or (BASE_FILE.read_text().strip() if BASE_FILE.is_file() else "official")
    cuda = base != "debian-cpu"
    import numpy
    import tensorflow as tf

    if cuda:
        problems = tf_problems(tf.__version__, tf.sysconfig.get_build_info())
        problems += missing_libraries(CUDA_LIBRARIES)
    else:
        problems = cpu_tf_problems(tf.__version__)
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
    if args.gpu and not cuda:
        problems.append("this is the CPU image (%s); build the GPU one: invoke build --base "
                        "debian --gpu" % base)
    elif args.gpu and not tf.config.list_physical_devices("GPU"):
        problems.append("no GPU visible to TensorFlow (NVIDIA driver + container toolkit, "
                        "and `--gpus all` or the compose GPU reservation?)")
    for p in problems:
        print("image check: " + p, file=sys.stderr)
    if not problems:
        what = ("CUDA %s, cuDNN %s, %d CUDA libraries loadable"
                % (EXPECTED_CUDA, EXPECTED_CUDNN, len(CUDA_LIBRARIES)) if cuda else "CPU build")
        print("image check: %s base, tensorflow %s (%s) and %d packages OK"
              % (base, tf.__version__, what, len(IMPORTS)))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
