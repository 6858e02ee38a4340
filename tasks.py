"""invoke tasks: one entry per thing a developer does. `invoke --list` shows them.

Tasks run inside .venv (scripts/env.sh builds it); they shell out to the same commands
the README documents, so there is one way to do each thing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from invoke import Context, task

ROOT = Path(__file__).resolve().parent
ENV = f"source {ROOT}/scripts/env.sh"


def _run(c: Context, cmd: str, **kw):
    # From the project root, whatever folder invoke was started in.
    return c.run(f"bash -c 'cd {ROOT} && {ENV} && {cmd}'", pty=False, **kw)


@task
def lock(c):
    """Regenerate requirements.lock (hashes, Python 3.11, Linux x86_64) from pyproject.toml."""
    c.run("uv pip compile pyproject.toml --extra dev --python-version 3.11 "
          "--python-platform x86_64-manylinux_2_17 --generate-hashes --no-header "
          "-o requirements.lock")


@task(help={"force": "re-run every stage", "stage": "run only up to this stage"})
def repro(c, force=False, stage=""):
    """Run the pipeline (dvc repro) with the default profile."""
    _run(c, f"dvc repro {'--force ' if force else ''}{stage}")


@task(help={"dest": "workspace folder (replaced)"})
def smoke(c, dest="build/smoke"):
    """Run the whole chain on the smoke profile in a throw-away workspace (1-2 minutes)."""
    _run(c, f"python -m pipeline.workspace --profile smoke {dest} && cd {dest} && dvc repro")


@task(help={"args": "extra pytest arguments, e.g. \"-m 'not slow'\""})
def test(c, args=""):
    """Lint and run the test suite (the README's test command)."""
    c.run(f"bash {ROOT}/scripts/test {args}", pty=False)


@task
def lint(c):
    """ruff and mypy on the code (what scripts/test runs first)."""
    _run(c, "ruff check pipeline serving security image tests tasks.py && mypy")


@task(help={"only": "comma-separated checks (default all; `python -m security -h` lists them)",
            "offline": "skip checks that ask an online service (pip-audit)",
            "image": "image for trivy-image (default $TOKENMETER_IMAGE or tokenmeter:latest)"})
def scan(c, only="", offline=False, image=""):
    """Security scans (trivy, hadolint, pip-audit, bandit, SBOMs) under security/policy.yaml."""
    args = (f" --only {only}" if only else "") + (" --offline" if offline else "") \
        + (f" --image {image}" if image else "")
    _run(c, f"python -m security{args}")


@task(help={"model_dir": "exported model (default $TOKENMETER_MODEL_DIR or models/sentiment/1)",
            "port": "port on 127.0.0.1 (default $TOKENMETER_PORT or 8000)",
            "ledger": "SQLite path or postgresql:// DSN (default $TOKENMETER_LEDGER)"})
def serve(c, model_dir="", port=0, ledger=""):
    """Run the metered endpoint under uvicorn (settings: TOKENMETER_* environment variables)."""
    # _run single-quotes the command for bash -c: paths must not contain quotes or spaces.
    args = (f" --ledger {ledger}" if ledger else "") + " serve" \
        + (f" --model-dir {model_dir}" if model_dir else "") \
        + (f" --port {int(port)}" if port else "")
    _run(c, f"python -m serving{args}")


@task(help={"replicas": "replica counts, e.g. 1,2,3", "concurrency": "clients through HAProxy",
            "duration": "seconds of load per replica count",
            "model_dir": "exported model (default models/sentiment/1)",
            "pg_dsn": "PostgreSQL server for the shared ledger (default "
                      "$TOKENMETER_TEST_PG_DSN, else one shared SQLite file)"})
def scale(c, replicas="1,2,3", concurrency=32, duration=10.0, model_dir="", pg_dsn=""):
    """req/s and p50/p99 with 1, 2, 3 replicas behind HAProxy (metrics/scale.json)."""
    args = f" --replicas {replicas} --concurrency {int(concurrency)} --duration {float(duration)}" \
        + (f" --model-dir {model_dir}" if model_dir else "") \
        + (f" --pg-dsn {pg_dsn}" if pg_dsn else "")
    _run(c, f"python -m pipeline.benchmark.scale{args}")


@task(help={"args": "e.g. \"create --user alice --budget-usd 5\", \"list\", \"revoke KEY_ID\""})
def keys(c, args="list"):
    """Create (printed once), list or revoke API keys in the ledger."""
    _run(c, f"python -m serving keys {args}")


@task(help={"port": "port for the UI on 127.0.0.1"})
def mlflow_ui(c, port=5000):
    """Browse the MLflow runs of the local store."""
    _run(c, f"mlflow ui --backend-store-uri sqlite:///{ROOT}/mlruns/mlflow.db "
            f"--host 127.0.0.1 --port {port}")


@task
def clean(c):
    """Remove pipeline outputs (data, build, models); keeps .venv, mlruns and committed metrics."""
    for d in ("data", "build", "models"):
        shutil.rmtree(ROOT / d, ignore_errors=True)


# --- Container (docker/): the TF 2.9 image, built and run with Docker or podman (the
# `image` package finds the engine and its flags). Each task that needs an engine says so in
# one line when none runs. Imports are local so this block stays self-contained.

DOCKER_DIR = ROOT / "docker"
BASE_TAG = "2.9.3-gpu-jupyter"  # keep equal to ARG TF_TAG in docker/base/official.Dockerfile


def _engine(what: str):
    """The engine that runs here, or stop with one line (no traceback)."""
    from invoke.exceptions import Exit

    from image.engine import EngineError, detect

    try:
        return detect()
    except EngineError as exc:
        raise Exit(f"error: `invoke {what}` needs a container engine: {exc}", code=2) from None


def _compose(what: str, gpu: bool = False) -> str:
    """The compose command for the engine that runs here, with its flags and our files."""
    import shlex

    from invoke.exceptions import Exit

    from image.engine import EngineError

    files = ["-f", f"{DOCKER_DIR}/compose.yaml"]
    if gpu:
        files += ["-f", f"{DOCKER_DIR}/compose.gpu.yaml"]
    try:
        return shlex.join(_engine(what).compose_cmd(*files))
    except EngineError as exc:
        raise Exit(f"error: `invoke {what}`: {exc}", code=2) from None


def _compose_env(token: str = "") -> dict:
    import os
    import secrets

    # compose.yaml requires JUPYTER_TOKEN; a task that does not start Jupyter gets a
    # throw-away token (it is never shown, nothing listens with it).
    return {"JUPYTER_TOKEN": token or os.environ.get("JUPYTER_TOKEN") or secrets.token_hex(24)}


@task
def pin_base(c):
    """Pin the official base: pull it and record its digest in docker/base-image.digest."""
    eng = _engine("pin-base")
    ref = f"docker.io/tensorflow/tensorflow:{BASE_TAG}"
    c.run(" ".join(eng.cmd("pull", ref)), pty=False)
    out = c.run(" ".join(eng.cmd("image", "inspect", "--format",
                                 "'{{index .RepoDigests 0}}'", ref)),
                hide=True, pty=False).stdout.strip()
    digest = out.split("@", 1)[1]
    path = DOCKER_DIR / "base-image.digest"
    comments = [ln for ln in path.read_text().splitlines() if ln.startswith("#")]
    path.write_text("\n".join(comments + [digest]) + "\n")
    print(f"{ref} -> {digest} (docker/base-image.digest)")


@task(help={"debian": "also rewrite docker/base/debian-packages.lock (root, debootstrap)"})
def lock_image(c, debian=False):
    """Regenerate the image locks: one per base (Python 3.8 official, 3.9 debian), hashes."""
    _run(c, "python -m image.locks")
    if debian:
        _run(c, "python -m image lock-debian")


@task(help={"base": "official (Docker Hub's TF 2.9.3 GPU image) or debian (made here)",
            "gpu": "debian base with the CUDA 11 / cuDNN 8 wheels (official is always GPU)",
            "tag": "image name (default tokenmeter:<variant>; tokenmeter:latest too)",
            "fresh": "no layer cache, new root filesystem (what CI does)"})
def build(c, base="debian", gpu=False, tag="", fresh=False):
    """Build the image: base + the project layer (Docker or podman, whichever runs)."""
    args = f"--base {base}" + (" --gpu" if gpu else "") + (f" --tag {tag}" if tag else "") \
        + (" --fresh" if fresh else "")
    _run(c, f"python -m image build {args}")


@task(help={"services": "space-separated compose services (default: dev)",
            "key": "public key to authorise for SSH (default ~/.ssh/id_ed25519.pub)",
            "gpu": "reserve the host's NVIDIA GPUs (docker/compose.gpu.yaml)"})
def up(c, services="dev", key="", gpu=False):
    """Start the container(s): dev = Jupyter on 127.0.0.1:8888 + SSH on 127.0.0.1:2222."""
    import os
    import secrets

    token = os.environ.get("JUPYTER_TOKEN") or secrets.token_hex(24)
    env = _compose_env(token)
    if key:
        env["SSH_PUBLIC_KEY_FILE"] = str(Path(key).expanduser())
    c.run(f"{_compose('up', gpu)} up -d {services}", env=env, pty=False)
    if "dev" in services.split() and not os.environ.get("JUPYTER_TOKEN"):
        print(f"Jupyter: http://127.0.0.1:8888/lab?token={token}  (shown once; set "
              f"JUPYTER_TOKEN to choose it)")


@task(help={"volumes": "also delete the named volumes (models, mlruns, data, logs, ledger, "
                       "host keys)"})
def down(c, volumes=False):
    """Stop and remove the containers (volumes are kept unless --volumes)."""
    c.run(f"{_compose('down')} down{' --volumes' if volumes else ''}", env=_compose_env(),
          pty=False)


@task(help={"port": "published SSH port (default 2222)", "key": "private key to use"})
def ssh(c, port=2222, key=""):
    """Open a shell in the running dev container over SSH (key-only, user tokenmeter)."""
    ident = f"-i {key} " if key else ""
    c.run(f"ssh -p {int(port)} {ident}tokenmeter@127.0.0.1", pty=True)


@task(help={"stage": "run only up to this stage", "gpu": "reserve the host's NVIDIA GPUs"})
def container_repro(c, stage="", gpu=False):
    """`dvc repro` of this checkout inside a one-off dev container (shared volumes)."""
    c.run(f"{_compose('container-repro', gpu)} run --rm dev repro {stage}".rstrip(),
          env=_compose_env(), pty=False)
