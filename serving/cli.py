"""Command line: `keys create|list|revoke`, `users budget`, `report`, `invoice`, `verify`,
`models status|canary|promote|rollback`, `serve`.

Wires settings, ledger, model and app together; every failure is one line on stderr and a
non-zero exit, never a traceback. Business rules live in the modules it calls.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import logging
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from pydantic import ValidationError

from serving import pricing
from serving.keys import create_key
from serving.ledger import Ledger, LedgerError, day_range, open_ledger_from
from serving.settings import Settings, load_settings


def count(text: str) -> int:
    """An argparse type: a whole number >= 0 (limits and token budgets)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; use 0 or more")
    return n


class CliError(Exception):
    """One line for the user; exit 2."""


def _settings(args) -> Settings:
    try:
        return load_settings(ledger=getattr(args, "ledger", None),
                             model_dir=getattr(args, "model_dir", None),
                             host=getattr(args, "host", None), port=getattr(args, "port", None))
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(p) for p in e.get("loc", ()))
        raise CliError(f"settings: TOKENMETER_{where.upper()}: {e.get('msg')}") from None


def _ledger(args) -> Ledger:
    return open_ledger_from(_settings(args))


def _table(rows: List[Dict[str, object]], columns: Sequence[str]) -> str:
    widths = [max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths))
              for r in rows]
    return "\n".join(lines)


def cmd_keys_create(args) -> int:
    budget = pricing.usd_to_micro(args.budget_usd) if args.budget_usd is not None else None
    ledger = _ledger(args)
    record, plaintext = create_key(ledger, args.user, name=args.name, is_admin=args.admin,
                                   rpm=args.rpm, tpm=args.tpm, budget_micro_usd=budget,
                                   budget_tokens=args.budget_tokens)
    if args.json:
        print(json.dumps({"id": record.id, "user": record.user_id, "key": plaintext}))
    else:
        print(f"created {record.id} for user {record.user_id}")
        print(f"key: {plaintext}")
        print("This is the only time the key is shown; it is stored hashed.", file=sys.stderr)
    return 0


def cmd_keys_list(args) -> int:
    rows = []
    for k in _ledger(args).list_keys():
        rows.append({"id": k.id, "user": k.user_id, "prefix": k.prefix + "...", "name": k.name,
                     "admin": k.is_admin, "rpm": k.rpm, "tpm": k.tpm,
                     "budget_usd": "" if k.budget_micro_usd is None
                     else pricing.micro_to_str(k.budget_micro_usd),
                     "budget_tokens": "" if k.budget_tokens is None else k.budget_tokens,
                     "created_at": k.created_at,
                     "status": "revoked" if k.revoked_at else "active"})
    if args.json:
        print(json.dumps(rows))
    else:
        print(_table(rows, ["id", "user", "prefix", "name", "admin", "rpm", "tpm",
                            "budget_usd", "budget_tokens", "created_at", "status"]))
    return 0


def cmd_keys_revoke(args) -> int:
    if not _ledger(args).revoke_key(args.key_id):
        raise CliError(f"no active key {args.key_id} (see `keys list`)")
    print(f"revoked {args.key_id}")
    return 0


def cmd_users_budget(args) -> int:
    """Change only the limits given (USD, tokens, or both); --clear removes the budget."""
    given = args.budget_usd is not None or args.budget_tokens is not None
    if args.clear == given:
        raise CliError("give --budget-usd and/or --budget-tokens, or --clear (not both)")
    ledger = _ledger(args)
    budget, tokens = None, None
    if not args.clear:
        budget, tokens = ledger.user_budget(args.user)
        if args.budget_usd is not None:
            budget = pricing.usd_to_micro(args.budget_usd)
        if args.budget_tokens is not None:
            tokens = args.budget_tokens
    ledger.set_user_budget(args.user, budget, tokens)
    shown = ", ".join(x for x in (
        f"${pricing.micro_to_str(budget)}" if budget is not None else "",
        f"{tokens} tokens" if tokens is not None else "") if x)
    print(f"user {args.user}: monthly budget {shown or 'none (unlimited)'}")
    return 0


def cmd_report(args) -> int:
    try:
        lo, hi = day_range(args.start, args.end)
    except ValueError as exc:
        raise CliError(f"--start/--end must be YYYY-MM-DD: {exc}") from None
    rows = _ledger(args).report(lo, hi)
    for r in rows:
        r["total_tokens"] = int(r["input_tokens"]) + int(r["output_tokens"])
        r["cost_usd"] = pricing.micro_to_str(int(r.pop("cost_micro")))
    columns = ["user", "requests", "input_tokens", "output_tokens", "total_tokens", "cost_usd"]
    if args.format == "json":
        print(json.dumps({"start": lo, "end_exclusive": hi, "users": rows}))
    elif args.format == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        sys.stdout.write(buf.getvalue())
    else:
        print(f"usage from {lo} to {hi} (exclusive), UTC")
        print(_table(rows, columns))
    return 0


def _slug(text: str) -> str:
    """A file-name-safe form of a user id (the invoice number keeps it unique)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:60] or "user"


def cmd_invoice(args) -> int:
    from serving.invoices import RENDERERS, InvoiceError, issue, to_pdf, users_in

    s = _settings(args)
    ledger = open_ledger_from(s)
    currency = pricing.currency_of(s.pricing_file)
    minimum = pricing.monthly_minimum_micro(s.pricing_file)
    try:
        users = [args.user] if args.user else users_in(ledger, args.period)
        if args.out is None and len(users) != 1:
            raise CliError(f"{len(users)} users have usage in {args.period}: give --user, or "
                           "--out DIR for one file each")
        for user in users:
            invoice = issue(ledger, user, args.period, currency, minimum, preview=args.preview)
            data = to_pdf(invoice.document) if args.format == "pdf" else \
                RENDERERS[args.format](invoice.document).encode("utf-8")
            if args.out is None:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
                continue
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"invoice-{args.period}-{_slug(user)}.{args.format}"
            tmp = path.with_suffix(path.suffix + ".tmp")  # never a half-written invoice
            tmp.write_bytes(data)
            tmp.replace(path)
            state = "final" if invoice.final else "preview"
            print(f"{path}  {invoice.document['total']} {currency}  {state}  "
                  f"sha256 {invoice.sha256[:16]}", file=sys.stderr)
    except InvoiceError as exc:
        raise CliError(str(exc)) from None
    return 0


# --- model versions: the rollout every replica follows (serving.versions) ---------------------
def _model(args):
    """(settings, the model's name, the folder of its versions) from TOKENMETER_MODEL_DIR or
    --model-dir (any version's directory: its parent holds the others)."""
    from serving.model_dir import read_card

    s = _settings(args)
    try:
        name = str(read_card(s.model_dir)["name"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(f"cannot read the model card in {s.model_dir} ({exc}); set "
                       "TOKENMETER_MODEL_DIR or --model-dir to an exported version") from None
    return s, name, Path(s.model_dir).parent


def _rollout(ledger: Ledger, name: str, default_version: str):
    from serving.versions import Rollout, stored_rollout

    return stored_rollout(ledger, name) or Rollout(stable=default_version)


def _passed_gate(ledger: Ledger, name: str, root: Path, version: str, report: Path) -> str:
    """The validate gate of `version`, or CliError: the report (when it is about this version)
    is recorded in the ledger first, so the verdict outlives the file."""
    from serving.versions import RolloutError, check_version_dir, gate_from_report

    try:
        check_version_dir(root, name, version)
    except RolloutError as exc:
        raise CliError(str(exc)) from None
    gate = None
    if report.is_file():
        try:
            gate = gate_from_report(json.loads(report.read_text(encoding="utf-8")), name,
                                    version)
        except ValueError as exc:
            raise CliError(f"{report} is not a validate report ({exc})") from None
    if gate is not None:
        ledger.set_gate(name, version, gate.passed, gate.detail)
        passed, detail = gate.passed, gate.detail
    else:
        stored = ledger.gate(name, version)
        if stored is None:
            raise CliError(f"no validate verdict for {name}/{version}: {report} is about another "
                           f"version or missing; validate it (export.version: {version} in "
                           f"params.yaml, dvc repro validate) or pass --report")
        passed, detail = stored
    if not passed:
        raise CliError(f"{name}/{version} did not pass the validate gate and cannot take "
                       f"traffic ({detail})")
    return detail


def cmd_models_status(args) -> int:
    from serving.versions import VERSION_RE

    s, name, root = _model(args)
    ledger = open_ledger_from(s)
    r = _rollout(ledger, name, Path(s.model_dir).name)
    on_disk = sorted((p.name for p in root.iterdir() if p.is_dir() and VERSION_RE.match(p.name)),
                     key=lambda v: (len(v), v))
    rows = []
    for v in on_disk:
        gate = ledger.gate(name, v)
        role = "stable" if v == r.stable else "canary" if v == r.canary else \
            "previous" if v == r.previous else ""
        rows.append({"version": v, "role": role, "traffic_percent": r.share(v),
                     "gate": "" if gate is None else "passed" if gate[0] else "failed"})
    if args.json:
        print(json.dumps({"model": name, "stable": r.stable, "canary": r.canary,
                          "canary_percent": r.canary_percent, "previous": r.previous,
                          "versions": rows}))
    else:
        print(f"{name}: {r.describe()}")
        print(_table(rows, ["version", "role", "traffic_percent", "gate"]))
    return 0


def _change(args, change, gated: bool = True) -> int:
    """Apply `change(rollout)` and store it; every replica follows within ROLLOUT_REFRESH_S.
    With `gated`, a version that gains traffic must have passed the validate gate (a rollback
    returns to a version that was already serving, without one)."""
    from serving.versions import RolloutError

    s, name, root = _model(args)
    ledger = open_ledger_from(s)
    before = _rollout(ledger, name, Path(s.model_dir).name)
    try:
        after = change(before)
    except RolloutError as exc:
        raise CliError(str(exc)) from None
    for version in ({after.stable, after.canary} - {before.stable, None}) if gated else ():
        detail = _passed_gate(ledger, name, root, str(version), Path(args.report))
        print(f"{name}/{version}: {detail}", file=sys.stderr)
    ledger.set_rollout(name, after.stable, after.canary, after.canary_percent, after.previous)
    print(f"{name}: {after.describe()} (was: {before.describe()}); replicas follow within "
          f"{s.rollout_refresh_s:g} s")
    return 0


def cmd_models_canary(args) -> int:
    from serving.versions import start_canary

    return _change(args, lambda r: start_canary(r, args.version, args.percent))


def cmd_models_promote(args) -> int:
    from serving.versions import promote

    return _change(args, lambda r: promote(r, args.version))


def cmd_models_rollback(args) -> int:
    from serving.versions import rollback

    return _change(args, rollback, gated=False)


def fetch_metrics(url: str) -> str:
    import httpx

    if not url.startswith(("http://", "https://")):
        raise CliError("--url must start with http:// or https://")
    resp = httpx.get(url.rstrip("/") + "/metrics", timeout=10)
    resp.raise_for_status()
    return resp.text


def cmd_verify(args) -> int:
    from serving.metrics import parse_billing_totals

    try:
        seen = parse_billing_totals(fetch_metrics(args.url))
    except Exception as exc:  # httpx: connection, timeout, HTTP status
        raise CliError(f"cannot read {args.url}/metrics: {exc}") from None
    if not seen["instance_id"]:
        raise CliError(f"{args.url}/metrics has no tokenmeter_instance_info: not tokenmeter?")
    ledger_totals = _ledger(args).totals_for_instance(str(seen["instance_id"]))
    drift = {k: int(ledger_totals[k]) - int(seen[k]) for k in ledger_totals}  # type: ignore
    ok = all(v == 0 for v in drift.values())
    print(json.dumps({"instance_id": seen["instance_id"], "ledger": ledger_totals,
                      "metrics": {k: seen[k] for k in ledger_totals}, "drift": drift,
                      "ok": ok}))
    if not ok:
        print("error: ledger and /metrics disagree (drift above)", file=sys.stderr)
    return 0 if ok else 1


class _JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if msg.startswith("{"):
            return msg  # already a JSON event (billing_event)
        out = {"level": record.levelname.lower(), "logger": record.name, "message": msg}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def cmd_serve(args) -> int:
    s = _settings(args)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonLineFormatter())
    root = logging.getLogger("tokenmeter")
    root.handlers[:] = [handler]
    root.setLevel(s.log_level.upper())
    root.propagate = False

    from serving.app import Components, create_app
    from serving.metering import Meter
    from serving.model_dir import TOKENIZER_FILE
    from serving.runner import ModelDirError, ModelRunner
    from serving.versions import Served, check_version_dir

    def load(model_dir: Path) -> Served:
        print(f"loading model {model_dir} ({s.execution})", file=sys.stderr)
        runner = ModelRunner(model_dir, execution=s.execution, max_batch=s.max_batch,
                             max_wait_s=s.max_wait_ms / 1000, queue_size=s.queue_size,
                             warmup=s.warmup)
        return Served(runner, Meter(Path(model_dir) / TOKENIZER_FILE, runner.info.max_tokens,
                                    runner.info.labels))

    try:
        ledger = open_ledger_from(s)
        first = load(Path(s.model_dir))
        runner, meter = first.runner, first.meter
        price = pricing.price_for(s.pricing_file, runner.info.name)
    except (ModelDirError, LedgerError, pricing.PricingError) as exc:
        raise CliError(str(exc)) from None

    def load_version(version: str) -> Served:
        """Another version, named by the rollout (serving.versions loads it in a thread)."""
        served = load(check_version_dir(Path(s.model_dir).parent, runner.info.name, version))
        gc.collect()
        gc.freeze()  # as below, for this version's objects
        return served

    ledger.start()
    # TF and the loaded model leave ~390,000 long-lived objects that every full collection
    # walks: ~190 ms with the GIL held, stalling the event loop and the model thread alike.
    # Frozen, a full collection takes ~0 ms; request garbage is young and still collected.
    gc.collect()
    gc.freeze()
    instance = s.instance_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
    app = create_app(Components(s, runner, ledger, meter, price, instance, load_version))

    import uvicorn

    print(f"serving {runner.info.name}/{runner.info.version} on http://{s.host}:{s.port} "
          f"(ledger: {ledger.kind}, instance {instance}, metering {s.metering})",
          file=sys.stderr)
    # One worker: the model runner and the ledger writer are threads of this process.
    uvicorn.run(app, host=s.host, port=s.port, log_level=s.log_level, access_log=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serving", description=__doc__.splitlines()[0])
    p.add_argument("--ledger", help="SQLite path or postgresql:// DSN "
                                    "(default: $TOKENMETER_LEDGER or ledger.sqlite3)")
    sub = p.add_subparsers(dest="command", required=True)

    keys = sub.add_parser("keys", help="create, list or revoke API keys")
    ks = keys.add_subparsers(dest="keys_command", required=True)
    c = ks.add_parser("create", help="create a key (printed once)")
    c.add_argument("--user", required=True)
    c.add_argument("--name", default="")
    c.add_argument("--admin", action="store_true", help="may read any user's usage")
    c.add_argument("--rpm", type=count, default=0, help="requests per minute (0 = default)")
    c.add_argument("--tpm", type=count, default=0, help="tokens per minute (0 = default)")
    c.add_argument("--budget-usd", help="monthly budget in USD, e.g. 5.00")
    c.add_argument("--budget-tokens", type=count, help="monthly budget in tokens")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_keys_create)
    ls = ks.add_parser("list", help="list keys (never the key itself)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_keys_list)
    r = ks.add_parser("revoke", help="revoke a key by id")
    r.add_argument("key_id")
    r.set_defaults(func=cmd_keys_revoke)

    users = sub.add_parser("users", help="per-user settings")
    us = users.add_subparsers(dest="users_command", required=True)
    b = us.add_parser("budget", help="set a user's monthly budget over all their keys; "
                                     "a limit not given stays as it is")
    b.add_argument("--user", required=True)
    b.add_argument("--budget-usd", help="monthly budget in USD, e.g. 20.00")
    b.add_argument("--budget-tokens", type=count, help="monthly budget in tokens")
    b.add_argument("--clear", action="store_true", help="remove the user's budget (unlimited)")
    b.set_defaults(func=cmd_users_budget)

    rep = sub.add_parser("report", help="per-user totals for a period")
    rep.add_argument("--start", help="YYYY-MM-DD (default: first day of this month, UTC)")
    rep.add_argument("--end", help="YYYY-MM-DD inclusive (default: today, UTC)")
    rep.add_argument("--format", choices=("table", "csv", "json"), default="table")
    rep.set_defaults(func=cmd_report)

    inv = sub.add_parser("invoice", help="a user's invoice for a month (final once the month "
                                         "is closed; stored and re-issued byte for byte)")
    inv.add_argument("--period", required=True, help="YYYY-MM (UTC calendar month)")
    inv.add_argument("--user", help="one user (default: every user billed in the period)")
    inv.add_argument("--format", choices=("json", "csv", "html", "pdf"), default="json",
                     help="json (the stored form), csv, html, or pdf (needs chromium)")
    inv.add_argument("--out", help="folder: one file per user (default: stdout, one user)")
    inv.add_argument("--preview", action="store_true",
                     help="a draft of any month, open ones included; never stored")
    inv.set_defaults(func=cmd_invoice)

    v = sub.add_parser("verify", help="reconcile the ledger with a running process's /metrics")
    v.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8000")
    v.set_defaults(func=cmd_verify)

    models = sub.add_parser("models", help="model versions: which one answers (the rollout "
                                           "every replica follows, without a restart)")
    models.add_argument("--model-dir", help="any exported version of the model (default: "
                                            "$TOKENMETER_MODEL_DIR); its parent holds the others")
    ms = models.add_subparsers(dest="models_command", required=True)
    st = ms.add_parser("status", help="the rollout and the versions on disk")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_models_status)
    report_help = ("the validate stage's report (default: metrics/validate.json); its verdict "
                   "on the version is recorded, and a version that failed cannot take traffic")
    ca = ms.add_parser("canary", help="send a share of unpinned requests to a version")
    ca.add_argument("version")
    ca.add_argument("--percent", type=count, required=True, help="0 to 100 (0: pinned only)")
    ca.add_argument("--report", default="metrics/validate.json", help=report_help)
    ca.set_defaults(func=cmd_models_canary)
    pr = ms.add_parser("promote", help="make the canary (or VERSION) the stable version")
    pr.add_argument("version", nargs="?")
    pr.add_argument("--report", default="metrics/validate.json", help=report_help)
    pr.set_defaults(func=cmd_models_promote)
    rb = ms.add_parser("rollback", help="withdraw the canary; without one, return to the "
                                        "version stable before the last promotion")
    rb.set_defaults(func=cmd_models_rollback, report="metrics/validate.json")

    sv = sub.add_parser("serve", help="run the endpoint under uvicorn")
    sv.add_argument("--host")
    sv.add_argument("--port", type=int)
    sv.add_argument("--model-dir")
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CliError, LedgerError, pricing.PricingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
