"""The training pipeline: one module per `dvc.yaml` stage (prepare, tokenizer, baseline,
train, export, validate, benchmark), plus the typed params, paths and error handling they
share, and the benchmark's helpers (ceiling, loadgen, servers, naive_baseline,
ledger_capacity). It imports `serving` (the model-directory contract, tokenization, the
endpoint it benchmarks); `serving` never imports it.

Stage modules run as `python -m pipeline.<stage>` from the workspace root (DVC's cwd).
"""
