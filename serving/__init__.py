"""The metered endpoint: a SavedModel behind per-token billing, API keys, budgets and a ledger.

One module per concern (settings, pricing, metering, runner, ledger, keys, limits, metrics,
app, cli). `python -m serving -h` lists the commands; the README's "Metered endpoint" section
is the HTTP contract.
"""
