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
    return c.run(f"bash -c '{ENV} && {cmd}'", pty=False, **kw)


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
    """Run the whole chain on the smoke profile in a throw-away workspace (~2 minutes)."""
    _run(c, f"python -m pipeline.workspace --profile smoke {dest} && cd {dest} && dvc repro")


@task(help={"args": "extra pytest arguments, e.g. \"-m 'not slow'\""})
def test(c, args=""):
    """Lint and run the test suite (the README's test command)."""
    c.run(f"bash {ROOT}/scripts/test {args}", pty=False)


@task
def lint(c):
    """ruff on the code."""
    _run(c, "ruff check pipeline serving security tests tasks.py")


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


# --- Container (docker/): the TF 2.9 GPU image. Each task that needs Docker says so in one
# line when there is no engine. Imports are local so this block stays self-contained.

DOCKER_DIR = ROOT / "docker"
COMPOSE = f"docker compose -f {DOCKER_DIR}/compose.yaml"
IMAGE = "tokenmeter:latest"
BASE_TAG = "2.9.3-gpu-jupyter"  # keep equal to ARG BASE_TAG in docker/Dockerfile


def _need_docker(what: str) -> None:
    """Stop with one line (no traceback) when the docker CLI or its engine is missing."""
    import subprocess

    from invoke.exceptions import Exit

    if shutil.which("docker") is None:
        raise Exit(f"error: `invoke {what}` needs Docker: no `docker` command on PATH "
                   f"(install Docker Engine + the NVIDIA container toolkit)", code=2)
    info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"],
                          capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        why = (info.stderr.strip().splitlines() or ["no answer"])[-1]
        raise Exit(f"error: `invoke {what}` needs a running Docker engine ({why})", code=2)


def _base_digest() -> str:
    """The pinned digest from docker/base-image.digest, or stop saying how to pin it."""
    import re

    from invoke.exceptions import Exit

    lines = [ln.strip() for ln in (DOCKER_DIR / "base-image.digest").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    if len(lines) != 1 or not re.fullmatch(r"sha256:[0-9a-f]{64}", lines[0]):
        raise Exit("error: docker/base-image.digest holds no digest yet; run `invoke pin-base` "
                   "where Docker Hub is reachable", code=2)
    return lines[0]


def _compose_env(digest: str = "", token: str = "") -> dict:
    import os
    import secrets

    # compose.yaml requires both variables; a task that does not start Jupyter gets a
    # throw-away token (it is never shown, nothing listens with it).
    return {"TOKENMETER_BASE_DIGEST": digest or "sha256:" + "0" * 64,
            "JUPYTER_TOKEN": token or os.environ.get("JUPYTER_TOKEN")
            or secrets.token_hex(24)}


@task
def pin_base(c):
    """Pin the base image: pull it and record its digest in docker/base-image.digest."""
    _need_docker("pin-base")
    ref = f"tensorflow/tensorflow:{BASE_TAG}"
    c.run(f"docker pull {ref}", pty=False)
    out = c.run(f"docker image inspect --format '{{{{index .RepoDigests 0}}}}' {ref}",
                hide=True, pty=False).stdout.strip()
    digest = out.split("@", 1)[1]
    path = DOCKER_DIR / "base-image.digest"
    comments = [ln for ln in path.read_text().splitlines() if ln.startswith("#")]
    path.write_text("\n".join(comments + [digest]) + "\n")
    print(f"{ref} -> {digest} (docker/base-image.digest)")


@task
def lock_image(c):
    """Regenerate docker/requirements.lock (hashes, CPython 3.8, manylinux) from its .in."""
    c.run(f"uv pip compile {DOCKER_DIR}/requirements.in --python-version 3.8 "
          "--python-platform x86_64-manylinux_2_17 --generate-hashes --no-header "
          f"-o {DOCKER_DIR}/requirements.lock", pty=False)


@task(help={"tag": f"image name (default {IMAGE})"})
def build(c, tag=IMAGE):
    """Build the TF 2.9 GPU image from docker/Dockerfile (base pinned by digest)."""
    import datetime

    _need_docker("build")
    digest = _base_digest()
    rev = c.run("git rev-parse HEAD", hide=True, warn=True, pty=False).stdout.strip()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    # BuildKit: the Dockerfile uses COPY --chmod.
    c.run(f"docker build -f {DOCKER_DIR}/Dockerfile --build-arg BASE_DIGEST={digest} "
          f"--build-arg VCS_REF={rev or 'unknown'} --build-arg BUILD_DATE={now} "
          f"-t {tag} {ROOT}", env={"DOCKER_BUILDKIT": "1"}, pty=False)


@task(help={"services": "space-separated compose services (default: dev)",
            "key": "public key to authorise for SSH (default ~/.ssh/id_ed25519.pub)"})
def up(c, services="dev", key=""):
    """Start the container(s): dev = Jupyter on 127.0.0.1:8888 + SSH on 127.0.0.1:2222."""
    import os
    import secrets

    _need_docker("up")
    token = os.environ.get("JUPYTER_TOKEN") or secrets.token_hex(24)
    env = _compose_env(_base_digest(), token)
    if key:
        env["SSH_PUBLIC_KEY_FILE"] = str(Path(key).expanduser())
    c.run(f"{COMPOSE} up -d {services}", env=env, pty=False)
    if "dev" in services.split() and not os.environ.get("JUPYTER_TOKEN"):
        print(f"Jupyter: http://127.0.0.1:8888/lab?token={token}  (shown once; set "
              f"JUPYTER_TOKEN to choose it)")


@task(help={"volumes": "also delete the named volumes (models, mlruns, data, logs, ledger, "
                       "host keys)"})
def down(c, volumes=False):
    """Stop and remove the containers (volumes are kept unless --volumes)."""
    _need_docker("down")
    c.run(f"{COMPOSE} down{' --volumes' if volumes else ''}", env=_compose_env(), pty=False)


@task(help={"port": "published SSH port (default 2222)", "key": "private key to use"})
def ssh(c, port=2222, key=""):
    """Open a shell in the running dev container over SSH (key-only, user tokenmeter)."""
    _need_docker("ssh")
    ident = f"-i {key} " if key else ""
    c.run(f"ssh -p {int(port)} {ident}tokenmeter@127.0.0.1", pty=True)


@task(help={"stage": "run only up to this stage"})
def container_repro(c, stage=""):
    """`dvc repro` inside a one-off dev container (GPU, shared volumes)."""
    _need_docker("container-repro")
    c.run(f"{COMPOSE} run --rm dev repro {stage}".rstrip(),
          env=_compose_env(_base_digest()), pty=False)


@task(help={"dest": "work folder, rebuilt each run (default build/tf29)"})
def tf29_check(c, dest=""):
    """TF 2.9 parity without Docker: bullseye chroot, smoke pipeline, SavedModel, billed call."""
    c.run(f"bash {DOCKER_DIR}/tf29_check.sh {dest}".rstrip(), pty=False)
