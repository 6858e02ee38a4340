"""The training pipeline: one module per `dvc.yaml` stage (prepare, tokenizer, baseline,
train, export, validate), plus the typed params, paths and error handling they share.

Stage modules run as `python -m pipeline.<stage>` from the workspace root (DVC's cwd).
"""
