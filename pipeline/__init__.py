"""The training pipeline: one module per `dvc.yaml` stage (prepare, tokenizer, baseline,
train, export, validate), the `benchmark` stage as its own package (`pipeline/benchmark/`:
the stage, its figures and outputs, and the helpers only it uses: ceiling, loadgen,
ledger_capacity, naive_server, process, scratch_db), plus the typed params, paths and error
handling they share. It imports `serving` (the model-directory contract, tokenization, the
endpoint it benchmarks); `serving` never imports it.

Stage modules run as `python -m pipeline.<stage>` from the workspace root (DVC's cwd).
"""
