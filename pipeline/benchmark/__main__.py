"""`python -m pipeline.benchmark`, the `benchmark` stage's cmd in dvc.yaml: `stage.main` with the
pipeline's error handling (a user error is one line and exit code 2)."""

from pipeline.benchmark.stage import main
from pipeline.errors import run_stage

if __name__ == "__main__":
    run_stage("benchmark", main)
