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
