"""The `benchmark` stage (`python -m pipeline.benchmark`, see `__main__`) and everything only it
uses: `stage` (the run), `figures` (arithmetic on the results), `outputs` (CSVs, plots, MLflow,
the table), `ceiling` (model-only throughput), `loadgen` (the HTTP load generator),
`ledger_capacity` (the ledger alone), `naive_server` (the brief's naive design, measured for
comparison), `process` (child processes: start, wait ready, stop the group) and `scratch_db`
(a throw-away PostgreSQL database).
"""
