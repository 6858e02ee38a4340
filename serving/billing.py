"""The billing flow of one request as plain code: authenticate -> parse -> meter -> limit ->
reserve -> run -> price -> commit, then the answer. Every step is a method a test or a tool can
call without HTTP; `analyze` runs them in that order.

It must not know HTTP: no status codes, headers or request objects. Anything that is not a
billed answer leaves as `Refused` with a `kind`, and `serving.app` maps kinds to status codes.
An answer is returned only after its billing row is durable; a refusal is never billed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import numpy as np
from anyio import to_thread

from serving import pricing, reports
from serving.cache import TtlCache
from serving.errors import first_line
from serving.keys import AuthError, bearer_token, check_record, hash_key
from serving.ledger import (
    BillingEvent,
    KeyRecord,
    Ledger,
    LedgerBusy,
    LedgerError,
    OutcomeUnknown,
    Reprice,
    day_range,
    month_bounds,
    now_iso,
    period_of,
)
from serving.limits import RateLimiter
from serving.metering import InputError, Meter, Metered
from serving.metrics import Metrics
from serving.openapi import VERSION_HEADER
from serving.runner import ModelInfo, Overloaded
from serving.settings import Settings
from serving.shared_limits import SharedRateLimiter
from serving.versions import Served, UnknownVersion, Versions

log = logging.getLogger("tokenmeter")
billing_log = logging.getLogger("tokenmeter.billing")

T = TypeVar("T")

IDEMPOTENCY_RE = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces

# What a refusal can be; serving.app gives each its status code (README "Errors").
KINDS = ("authentication", "permission", "invalid", "too_long", "conflict", "rate_limit",
         "quota", "overloaded", "unavailable")


class Refused(Exception):
    """Not answered and not billed: `kind` (one of KINDS), a stable `code`, a message safe to
    show, and how long to wait before retrying where waiting helps."""

    def __init__(self, kind: str, code: str, message: str,
                 retry_after_s: Optional[int] = None):
        assert kind in KINDS, kind
        super().__init__(message)
        self.kind, self.code, self.message = kind, code, message
        self.retry_after_s = retry_after_s


def invalid(code: str, message: str) -> Refused:
    return Refused("invalid", code, message)


def reused_key_refusal() -> Refused:
    return Refused("conflict", "idempotency_key_reused",
                   "this Idempotency-Key was already used with a different request; send a "
                   "new key for a new request (nothing was billed)")


def request_hash(texts: Sequence[str], truncate: bool, model: str, version: str,
                 priority: bool = False) -> str:
    """What a request asks, as a hash: the same Idempotency-Key may only repeat it. Priority
    is part of it (it changes the price); a standard request hashes as it always did."""
    asked: List[Any] = [model, version, truncate, list(texts)] + (["priority"] if priority else [])
    canonical = json.dumps(asked, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def replay(prior_body: Optional[str], prior_hash: Optional[str], this_hash: str) -> Answer:
    """The first answer for a retry of the same request; a conflict for another request.
    Rows from before request hashes were stored (NULL) replay as they always did."""
    if prior_hash is not None and prior_hash != this_hash:
        raise reused_key_refusal()
    return Answer(prior_body or "", replayed=True, fingerprint=prior_hash or this_hash)


def outcome_unknown_refusal() -> Refused:
    return Refused("unavailable", "ledger_outcome_unknown",
                   "the billing ledger did not confirm this request in time, so whether it was "
                   "billed is not known; retry with the same Idempotency-Key to get its answer "
                   "without paying twice", retry_after_s=1)


def quota_refusal() -> Refused:
    return Refused("quota", "insufficient_quota",
                   "the monthly budget of this key or its user is spent; "
                   "the request was not billed")


class Runner(Protocol):
    """What the flow needs of the model runner (serving.runner.ModelRunner is one)."""

    info: ModelInfo

    def submit(self, rows: List[List[int]], priority: bool = False) -> Future: ...

    def depth(self) -> int: ...


@dataclass
class Answer:
    """A 200: the JSON body, and whether it is a replay of an earlier billed answer."""

    body: str
    replayed: bool = False
    fingerprint: Optional[str] = None  # the request hash it answers (Idempotency-Key only)


def parse(raw: bytes, max_texts: int) -> Tuple[List[str], bool]:
    """Texts and the truncate flag from a request body, or `invalid` saying what is wrong."""
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise invalid("invalid_json", "the body is not valid JSON") from None
    except RecursionError:  # e.g. 2 KB of `[[[[`: valid JSON nested deeper than Python recurses
        raise invalid("invalid_json", "the body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise invalid("invalid_body", "the body must be a JSON object")
    unknown = sorted(set(payload) - {"text", "texts", "truncate"})
    if unknown:
        raise invalid("unknown_field", f"unknown field(s): {', '.join(unknown)[:200]}")
    if "text" in payload and "texts" in payload:
        raise invalid("ambiguous_input", "give either `text` or `texts`, not both")
    if "text" in payload:
        texts = [payload["text"]]
    elif "texts" in payload:
        texts = payload["texts"]
        if not isinstance(texts, list):
            raise invalid("invalid_texts", "`texts` must be a list of strings")
        if not texts:
            raise invalid("missing_text", "`texts` is empty")
        if len(texts) > max_texts:
            raise invalid("too_many_texts", f"at most {max_texts} texts per request")
    else:
        raise invalid("missing_text", "give exactly one of `text` (a string) or `texts` (a "
                      "list of strings)")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise invalid("invalid_text", f"text {i} is not a string")
        if not t.strip():
            raise invalid("empty_text", f"text {i} is empty")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise invalid("invalid_text", f"text {i} is not valid Unicode") from None
    truncate = payload.get("truncate", False)
    if not isinstance(truncate, bool):
        raise invalid("invalid_truncate", "`truncate` must be true or false")
    return texts, truncate


Spend = Tuple[int, int]  # (micro-USD, tokens) billed in a month


def budget_fits(key: KeyRecord, key_spent: Spend, user_spent: Spend, worst: Spend) -> bool:
    """Whether the worst-case cost (micro-USD, tokens) still fits the key's and user's budgets."""
    for spent, limits in ((key_spent, (key.budget_micro_usd, key.budget_tokens)),
                          (user_spent, (key.user_budget_micro_usd, key.user_budget_tokens))):
        for used, add, limit in zip(spent, worst, limits):
            if limit is not None and used + add > limit:
                return False
    return True


class Billing:
    """One model (its versions, each with its meter), its price, limits and ledger: turns request
    bodies into billed answers. `runner` and `meter` are the default version's; `versions`, when
    given, serves more (serving.versions).

    `metered=False` (settings.metering "off", benchmarks only) skips key, limits, budgets and
    ledger: the caller passes no key and nothing is billed.
    """

    def __init__(self, settings: Settings, runner: Runner, ledger: Ledger, meter: Meter,
                 price: pricing.Price, instance_id: str, metrics: Optional[Metrics] = None,
                 limiter: Optional[RateLimiter] = None,
                 shared: Optional[SharedRateLimiter] = None,
                 versions: Optional[Versions] = None):
        self.settings, self.runner, self.ledger = settings, runner, ledger
        self.meter, self.price, self.instance_id = meter, price, instance_id
        self.metrics = metrics
        self.limiter = limiter or RateLimiter()
        self.shared = shared  # limits in Redis, shared by the replicas; else this process's
        self.metered = settings.metering != "off"
        self.info = runner.info
        self.versions = versions or Versions(Served(runner, meter))
        # Bounded staleness, see serving.cache: keys by hash, spend by (owner, id, month).
        self.keys: TtlCache[str, KeyRecord] = TtlCache(settings.key_cache_s)
        self.spend: TtlCache[Tuple[str, str, str], Spend] = TtlCache(settings.key_cache_s)
        # Requests with an Idempotency-Key being answered now, by (key id, Idempotency-Key):
        # a concurrent duplicate waits for the first instead of running the model again.
        self.inflight: Dict[Tuple[str, str], "asyncio.Future[Answer]"] = {}

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """A ledger read in a worker thread; a database that cannot answer is a 503 refusal
        (the request was not billed), not a 500."""
        try:
            return await to_thread.run_sync(fn, *args)
        except Exception as exc:
            log.warning("ledger read failed: %s", first_line(exc))
            raise Refused("unavailable", "ledger_unavailable", "the billing ledger is "
                          "unavailable; retry later (nothing was billed)",
                          retry_after_s=1) from None

    # --- the steps, in order ----------------------------------------------------------------
    async def authenticate(self, authorization: Optional[str]) -> KeyRecord:
        """The key record behind an `Authorization: Bearer` header value; from the cache when
        it was read less than key_cache_s ago (no thread hop), else from the ledger."""
        try:
            key_hash = hash_key(bearer_token(authorization))
            record = self.keys.get(key_hash)
            if record is None:
                record = await self.read(self.ledger.key_by_hash, key_hash)
                if record is not None:
                    self.keys.put(key_hash, record)
            return check_record(record)
        except AuthError as exc:
            raise Refused("authentication", exc.code, exc.message) from None

    def parse(self, raw: bytes) -> Tuple[List[str], bool]:
        return parse(raw, self.settings.max_texts)

    def check_idempotency_key(self, idem: str) -> None:
        limit = self.settings.max_idempotency_key_len
        if len(idem) > limit or not IDEMPOTENCY_RE.match(idem):
            raise invalid("invalid_idempotency_key",
                          f"Idempotency-Key must be 1-{limit} printable ASCII characters")

    def route(self, pinned: Optional[str]) -> Served:
        """The version that answers: the pinned one (Tokenmeter-Model-Version), else the
        rollout's choice."""
        try:
            return self.versions.pick(pinned)
        except UnknownVersion as exc:
            raise invalid("unknown_model_version",
                          f"{VERSION_HEADER} {exc.version[:64]!r} is not served; versions "
                          f"served: {', '.join(exc.served)}") from None

    def meter_texts(self, texts: Sequence[str], truncate: bool,
                    served: Optional[Served] = None) -> Metered:
        # On the event-loop thread only: one thread ever uses the tokenizer (HF fast
        # tokenizers are not safe to share across threads), and it takes well under a ms.
        try:
            return (served or self.versions.default).meter.meter(texts, truncate)
        except InputError as exc:
            raise Refused(exc.kind, exc.code, exc.message) from None

    @staticmethod
    def max_output_tokens(served: Served, texts: int) -> int:
        return served.meter.max_output_tokens_per_text * texts

    async def limit(self, key: KeyRecord, metered: Metered, served: Served) -> None:
        """RPM and TPM of the key; tokens are counted at their worst case (largest output)."""
        s = self.settings
        args = (key.id, metered.input_tokens + self.max_output_tokens(served, len(metered.ids)),
                key.rpm or s.default_rpm, key.tpm or s.default_tpm)
        refusal = await self.shared.admit(*args) if self.shared is not None \
            else self.limiter.admit(*args)
        if refusal is not None:
            raise Refused("rate_limit", refusal.code, refusal.message, refusal.retry_after_s)

    async def reserve(self, key: KeyRecord, metered: Metered, ts: str, served: Served,
                      priority: bool = False) -> None:
        """Cheap refusal before using the model when the worst case cannot fit the budgets,
        from spend read at most key_cache_s ago; the authority is the conditional update in
        `commit`, so a stale figure can cost a model call, never an overspend."""
        if not key.has_budget:
            return
        max_out = self.max_output_tokens(served, len(metered.ids))
        key_spent, user_spent = await self.month_spend(key, period_of(ts))
        # Volume tiers priced from the cached month: a stale (lower) figure prices at a tier
        # at or below the one the commit will use, as tiers are read in ascending tokens.
        worst = (pricing.cost(self.price, metered.input_tokens, max_out, user_spent[1],
                              priority).total_micro,
                 metered.input_tokens + max_out)
        if not budget_fits(key, key_spent, user_spent, worst):
            raise quota_refusal()

    async def month_spend(self, key: KeyRecord, period: str) -> Tuple[Spend, Spend]:
        """(key's, user's) spend in the month `period`, cached."""
        k, u = ("key", key.id, period), ("user", key.user_id, period)
        cached_key, cached_user = self.spend.get(k), self.spend.get(u)
        if cached_key is not None and cached_user is not None:
            return cached_key, cached_user
        key_spent, user_spent = await self.read(self._read_spend, key, period)
        self.spend.put(k, key_spent)
        self.spend.put(u, user_spent)
        return key_spent, user_spent

    def _read_spend(self, key: KeyRecord, period: str) -> Tuple[Spend, Spend]:
        return self.ledger.spent(key.id, period), self.ledger.user_spent(key.user_id, period)

    async def run(self, metered: Metered, served: Served, priority: bool = False
                  ) -> Tuple[List[int], np.ndarray]:
        """Label ids and class probabilities, one row per text; a priority request goes ahead
        of the standard ones queued for the model."""
        try:
            future = served.runner.submit(metered.ids, priority)
        except Overloaded:
            raise Refused("overloaded", "overloaded", "the model is overloaded; retry later",
                          retry_after_s=1) from None
        if self.metrics is not None:
            self.metrics.queue_depth.set(served.runner.depth())
        try:
            # Bounded like the commit: a runner thread that died holding this job (the
            # watchdog starts a new one) must not leave the request waiting for ever.
            probs = await asyncio.wait_for(asyncio.wrap_future(future),
                                           self.settings.billing_deadline_s)
        except asyncio.TimeoutError:
            raise Refused("unavailable", "model_timeout", "the model did not answer in time; "
                          "retry later (nothing was billed)", retry_after_s=1) from None
        return [int(i) for i in np.argmax(probs, axis=1)], probs

    def answer(self, served: Served, event_id: str, label_ids: Sequence[int],
               probs: np.ndarray, input_tokens: int, output_tokens: int,
               cost: pricing.Cost) -> str:
        info, currency = served.info, self.price.currency
        body = {
            "id": event_id, "model": info.name, "model_version": info.version,
            "results": [{"label": info.labels[i], "score": round(float(p[i]), 6)}
                        for i, p in zip(label_ids, probs)],
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens,
                      "total_tokens": input_tokens + output_tokens},
            "cost": {"currency": currency,
                     "input": pricing.micro_to_str(cost.input_micro),
                     "output": pricing.micro_to_str(cost.output_micro),
                     "total": pricing.micro_to_str(cost.total_micro),
                     "tier": cost.tier},
        }
        return json.dumps(body, ensure_ascii=False, separators=(",", ":"))

    async def commit(self, event: BillingEvent, key: KeyRecord,
                     reprice: Optional[Reprice] = None) -> Tuple[Answer, BillingEvent]:
        """The billing row, durable before the answer leaves: a 200 the client sees is on disk.
        A concurrent retry with the same idempotency key gets the first answer. With `reprice`
        the writer prices the row (volume tiers); the row as written comes back with the
        answer."""
        try:
            # Shielded: a request that times out here leaves its row to the writer, which
            # settles it either way; only the wait is bounded.
            result = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(self.ledger.commit_event(event, reprice))),
                self.settings.billing_deadline_s)
        except asyncio.TimeoutError:
            log.warning("billing row %s not confirmed within %s s", event.id,
                        self.settings.billing_deadline_s)
            raise outcome_unknown_refusal() from None
        except OutcomeUnknown as exc:
            log.warning("billing row %s: %s", event.id, exc)
            raise outcome_unknown_refusal() from None
        except LedgerBusy:
            raise Refused("overloaded", "ledger_busy", "the billing ledger is saturated; retry "
                          "later (nothing was billed)", retry_after_s=1) from None
        except LedgerError as exc:
            # The transaction was rolled back (or never began): nothing is billed.
            log.warning("billing row not committed: %s", exc)
            raise Refused("unavailable", "ledger_unavailable", "the billing ledger is "
                          "unavailable; retry later (nothing was billed)",
                          retry_after_s=1) from None
        if result.status == "duplicate":  # a concurrent request with the same key won
            return replay(result.response, result.request_hash, event.request_hash or ""), event
        if result.status == "insufficient_quota":
            raise quota_refusal()
        event = result.event or event
        if key.has_budget:  # what this process billed, until the cached figures expire
            period, add = period_of(event.ts), (event.cost_micro,
                                                event.input_tokens + event.output_tokens)
            for owner in (("key", key.id, period), ("user", key.user_id, period)):
                self.spend.update(owner, lambda v: (v[0] + add[0], v[1] + add[1]))
        return Answer(event.response, fingerprint=event.request_hash), event

    # --- the whole flow -----------------------------------------------------------------------
    def check_priority(self, priority: bool) -> None:
        if priority and not self.price.has_priority:
            raise invalid("priority_unavailable",
                          f"model {self.info.name!r} has no priority tier; send the request "
                          f"without the priority header")

    async def analyze(self, key: Optional[KeyRecord], raw: bytes,
                      idempotency_key: Optional[str] = None,
                      request_id: Optional[str] = None, priority: bool = False,
                      version: Optional[str] = None) -> Answer:
        """A billed answer for one request body, or Refused. `key` is None only unmetered;
        `priority`: the request asked for the priority tier (it goes first, at a surcharge);
        `version`: the model version it pins (else the rollout chooses)."""
        t0 = time.perf_counter()
        texts, truncate = self.parse(raw)
        self.check_priority(priority)
        served = self.route(version)
        if key is None or idempotency_key is None:
            return await self.bill(t0, key, texts, truncate, None, None, request_id, served,
                                   priority)
        self.check_idempotency_key(idempotency_key)
        # The version as asked (pinned or not), not as routed: a retry may meet another
        # version of a canary split and is still the same request.
        fingerprint = request_hash(texts, truncate, self.info.name, version or "", priority)
        slot = (key.id, idempotency_key)
        while slot in self.inflight:  # a duplicate of a request still being answered
            try:
                first = await asyncio.shield(self.inflight[slot])
            except Exception:  # the first was refused or failed: this one tries on its own
                continue
            return replay(first.body, first.fingerprint, fingerprint)
        mine: "asyncio.Future[Answer]" = asyncio.get_running_loop().create_future()
        self.inflight[slot] = mine
        try:
            answer = await self._bill_once(t0, key, texts, truncate, idempotency_key,
                                           fingerprint, request_id, served, priority)
            mine.set_result(answer)
            return answer
        except BaseException as exc:
            mine.set_exception(exc if isinstance(exc, Exception) else Refused(
                "unavailable", "cancelled", "the first request with this key was cancelled"))
            mine.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            del self.inflight[slot]

    async def _bill_once(self, t0: float, key: KeyRecord, texts: List[str], truncate: bool,
                         idem: str, fingerprint: str, request_id: Optional[str],
                         served: Served, priority: bool) -> Answer:
        """The first answer billed under this Idempotency-Key (a replay), or a new one."""
        prior = await self.read(self.ledger.find_idempotent, key.id, idem)
        if prior is not None:
            return replay(prior[0], prior[1], fingerprint)
        return await self.bill(t0, key, texts, truncate, idem, fingerprint, request_id,
                               served, priority)

    async def bill(self, t0: float, key: Optional[KeyRecord], texts: List[str], truncate: bool,
                   idem: Optional[str], fingerprint: Optional[str],
                   request_id: Optional[str], served: Served,
                   priority: bool = False) -> Answer:
        """Meter, limit, reserve, run, price and commit: a new billed answer by `served`."""
        metered = self.meter_texts(texts, truncate, served)
        ts = now_iso()
        if key is not None:
            await self.limit(key, metered, served)
            await self.reserve(key, metered, ts, served, priority)
        label_ids, probs = await self.run(metered, served, priority)
        output_tokens = served.meter.output_tokens(label_ids)
        event_id = "evt_" + uuid.uuid4().hex
        if key is None:  # unmetered: nobody's month, so the first volume tier
            cost = pricing.cost(self.price, metered.input_tokens, output_tokens, 0, priority)
            return Answer(self.answer(served, event_id, label_ids, probs,
                                      metered.input_tokens, output_tokens, cost))
        latency_us = int((time.perf_counter() - t0) * 1e6)

        def priced(month_tokens: int) -> BillingEvent:
            """The row and its answer, priced with the user's tokens earlier this month."""
            cost = pricing.cost(self.price, metered.input_tokens, output_tokens, month_tokens,
                                priority)
            body = self.answer(served, event_id, label_ids, probs, metered.input_tokens,
                               output_tokens, cost)
            return self.event(served, event_id, ts, key, metered.input_tokens, output_tokens,
                              cost, latency_us, (request_id or event_id)[:100], idem, body,
                              fingerprint)

        # Without volume tiers the month does not matter: priced here, off the writer thread.
        # With them, the writer prices it under the user's spend-row lock (ledger.Reprice).
        by_volume = self.price.by_volume
        answer, event = await self.commit(priced(0), key, priced if by_volume else None)
        if not answer.replayed:
            self.record(event, metered.truncated)
        return answer

    def event(self, served: Served, event_id: str, ts: str, key: KeyRecord, input_tokens: int,
              output_tokens: int, cost: pricing.Cost, latency_us: int, request_id: str,
              idem: Optional[str], body: str,
              request_hash: Optional[str] = None) -> BillingEvent:
        info, price = served.info, self.price
        input_rate, output_rate = cost.input_per_1k, cost.output_per_1k  # what was charged
        return BillingEvent(
            id=event_id, ts=ts, key_id=key.id, user_id=key.user_id, model=info.name,
            model_version=info.version, input_tokens=input_tokens, output_tokens=output_tokens,
            currency=price.currency, input_price_per_1k=str(input_rate),
            output_price_per_1k=str(output_rate), input_cost_micro=cost.input_micro,
            output_cost_micro=cost.output_micro, cost_micro=cost.total_micro,
            latency_us=latency_us, request_id=request_id, instance_id=self.instance_id,
            idempotency_key=idem, response=body, request_hash=request_hash,
            price_tier=cost.tier)

    def record(self, event: BillingEvent, truncated: int) -> None:
        """Metrics and the billing log line of a billed (not replayed) answer."""
        if self.metrics is not None:
            m, name, version = self.metrics, event.model, event.model_version
            m.billed.labels(name, version).inc()
            m.tokens.labels(name, version, "input").inc(event.input_tokens)
            m.tokens.labels(name, version, "output").inc(event.output_tokens)
            m.cost.labels(name, version).inc(event.cost_micro)
        billing_log.info(json.dumps({
            "event": "billing_event", "id": event.id, "ts": event.ts, "key_id": event.key_id,
            "user": event.user_id, "model": event.model, "model_version": event.model_version,
            "input_tokens": event.input_tokens, "output_tokens": event.output_tokens,
            "cost_micro_usd": event.cost_micro, "currency": event.currency,
            "latency_ms": round(event.latency_us / 1000, 3), "instance_id": event.instance_id,
            "truncated_texts": truncated,
            "idempotency_key_set": event.idempotency_key is not None}))

    # --- reading the ledger back ------------------------------------------------------------
    async def usage(self, key: KeyRecord, user: Optional[str], start: Optional[str],
                    end: Optional[str], granularity: str = "day") -> Dict[str, object]:
        """Requests, tokens and cost by UTC day and model, start..end inclusive (default: this
        month); only an admin key may read another user's."""
        if granularity != "day":
            raise invalid("invalid_granularity", "granularity must be `day`")
        if user is not None and user != key.user_id and not key.is_admin:
            raise Refused("permission", "forbidden",
                          "only an admin key may read another user's usage")
        try:
            lo, hi = day_range(start, end)
        except ValueError as exc:
            raise invalid("invalid_date", f"start/end must be YYYY-MM-DD: {exc}") from None
        who = user or key.user_id
        rows = await self.read(self.ledger.usage, who, lo, hi)
        total = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_micro": 0}
        data = []
        for r in rows:
            for k in total:
                total[k] += r[k]
            data.append(self._usage_row(r))
        return {"user": who, "start": lo, "end": hi, "granularity": "day", "data": data,
                "total": self._usage_row(total)}

    def _admin(self, key: KeyRecord) -> None:
        if not key.is_admin:
            raise Refused("permission", "forbidden", "reports need an admin key "
                          "(`keys create --admin`)")

    async def usage_report(self, key: KeyRecord, group_by: str, granularity: str,
                           start: Optional[str], end: Optional[str]) -> List[Dict[str, Any]]:
        """Every user's requests, tokens and cost grouped by user, key or model per UTC day or
        month, start..end inclusive (default: this month). Admin keys only."""
        self._admin(key)
        if group_by not in reports.GROUPS:
            raise invalid("invalid_group_by", f"group_by must be one of {reports.GROUPS}")
        if granularity not in reports.GRANULARITIES:
            raise invalid("invalid_granularity",
                          f"granularity must be one of {reports.GRANULARITIES}")
        try:
            lo, hi = day_range(start, end)
        except ValueError as exc:
            raise invalid("invalid_date", f"start/end must be YYYY-MM-DD: {exc}") from None
        rows = await self.read(self.ledger.daily_usage, lo, hi)
        return [reports.present(r, self.price.currency)
                for r in reports.aggregate(rows, group_by, granularity)]

    async def top_users(self, key: KeyRecord, period: Optional[str], n: int
                        ) -> List[Dict[str, Any]]:
        """The n users with the highest billed cost in a UTC month (default: this one)."""
        self._admin(key)
        period = period or now_iso()[:7]
        try:
            lo, hi = month_bounds(period)
        except ValueError as exc:
            raise invalid("invalid_period", str(exc)) from None
        if not 1 <= n <= 1000:
            raise invalid("invalid_n", "n must be between 1 and 1000")
        rows = await self.read(self.ledger.daily_usage, now_iso(lo), now_iso(hi))
        return [reports.present(r, self.price.currency) for r in reports.top_users(rows, n)]

    def _usage_row(self, r: Mapping[str, Union[int, str]]) -> Dict[str, object]:
        out: Dict[str, object] = {k: v for k, v in r.items() if k != "cost_micro"}
        out["total_tokens"] = int(r["input_tokens"]) + int(r["output_tokens"])
        out["cost"] = {"currency": self.price.currency,
                       "total": pricing.micro_to_str(int(r["cost_micro"]))}
        return out
