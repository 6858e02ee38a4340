"""MLflow wiring: where runs go and how a run starts. No metrics logic lives here.

The tracking URI defaults to a local SQLite store (`mlruns/mlflow.db`, artifacts in
`mlruns/artifacts`); set MLFLOW_TRACKING_URI to use a server instead.
"""

from __future__ import annotations

import os
from typing import Any, Dict

from pipeline import paths


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    paths.MLFLOW_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(paths.MLFLOW_DIR / 'mlflow.db').resolve()}"


def start_run(experiment: str, run_name: str):
    """Start an MLflow run in `experiment`, creating it (with local artifacts) if needed."""
    import mlflow

    # Read before set_tracking_uri, which exports MLFLOW_TRACKING_URI into os.environ.
    own_store = "MLFLOW_TRACKING_URI" not in os.environ
    mlflow.set_tracking_uri(tracking_uri())
    if mlflow.get_experiment_by_name(experiment) is None:
        location = (paths.MLFLOW_DIR / "artifacts").resolve().as_uri() if own_store else None
        mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    return mlflow.start_run(run_name=run_name)


def flatten(prefix: str, obj: Any) -> Dict[str, Any]:
    """{'a': {'b': 1}} -> {'prefix.a.b': 1}; lists become strings (MLflow params are flat)."""
    out: Dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
    else:
        out[prefix] = obj if isinstance(obj, (int, float, str, bool)) or obj is None else str(obj)
    return out
