"""The HTTP layer: POST /v1/analyze (authenticate, parse, meter, limit, run, price, commit the
billing row, answer), GET /v1/usage, /metrics, /healthz, /readyz, and the JSON error contract.
It holds no state of its own beyond wiring; tokens, money, keys and storage live in their modules.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import pricing
from serving.keys import AuthError, authenticate
from serving.ledger import BillingEvent, KeyRecord, Ledger, day_range, now_iso, period_of
from serving.limits import RateLimiter
from serving.metering import InputError, Meter
from serving.metrics import Metrics
from serving.runner import ModelRunner, Overloaded
from serving.settings import Settings

log = logging.getLogger("tokenmeter")
billing_log = logging.getLogger("tokenmeter.billing")

JSON = "application/json"
IDEMPOTENCY_RE = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces


class ApiError(Exception):
    def __init__(self, status: int, type_: str, code: str, message: str,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.type, self.code, self.message = status, type_, code, message
        self.headers = headers or {}


class CountRequests:
    """Counts every answer by route template and status, and times /v1/analyze.

    Plain ASGI on purpose: as a `@app.middleware("http")` (BaseHTTPMiddleware) its task group
    and streaming-response wrapper took ~20% of the event loop at concurrency 32 (py-spy).
    """

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [500]  # what the client gets if the app raises before answering

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            # The router writes the matched route into this same scope dict.
            path = getattr(scope.get("route"), "path", "other")  # bounded cardinality
            self.metrics.requests.labels(path, str(status[0])).inc()
            if path == "/v1/analyze":
                self.metrics.latency.labels(str(status[0])).observe(time.perf_counter() - t0)


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, "invalid_request_error", code, message)


# --- OpenAPI models (documentation of the contract; parsing is done by hand below so that
# every malformed body gets our error shape and code) ---------------------------------------
class AnalyzeRequest(BaseModel):
    text: Optional[str] = Field(None, description="One text. Give `text` or `texts`.")
    texts: Optional[List[str]] = Field(None, description="Several texts (at most max_texts).")
    truncate: bool = Field(False, description="Cut texts longer than the model's maximum to "
                                              "it (the cut count is billed) instead of 413.")


class Result(BaseModel):
    label: str
    score: float


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int


class CostOut(BaseModel):
    currency: str
    input: str = Field(..., description="decimal string, 6 places")
    output: str
    total: str


class AnalyzeResponse(BaseModel):
    id: str
    model: str
    model_version: str
    results: List[Result]
    usage: Usage
    cost: CostOut


class ErrorDetail(BaseModel):
    type: str
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


# The type FastAPI's `responses=` takes: status code -> OpenAPI fields of that answer.
ERROR_RESPONSES: Dict[Union[int, str], Dict[str, Any]] = {
    s: {"model": ErrorBody, "description": d} for s, d in (
        (400, "malformed JSON, missing/empty/non-string text, too many texts, body too large"),
        (401, "missing, unknown or revoked API key"),
        (413, "a text longer than the model's maximum tokens (without truncate)"),
        (429, "RPM/TPM limit (with Retry-After) or code insufficient_quota (key or user budget)"),
        (503, "overloaded: the model queue is full"))}


@dataclass
class Components:
    settings: Settings
    runner: ModelRunner
    ledger: Ledger
    meter: Meter
    price: pricing.Price
    instance_id: str


def _error_response(status: int, type_: str, code: str, message: str,
                    headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "code": code, "message": message}},
                        status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("invalid_content_length", "Content-Length is not a number")
        if int(declared) > limit:
            raise bad_request("body_too_large", f"the body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise bad_request("body_too_large", f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_analyze(raw: bytes, max_texts: int) -> Tuple[List[str], bool]:
    """Texts and the truncate flag from a request body, or a 400 saying what is wrong."""
    try:
        payload = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("invalid_json", "the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise bad_request("invalid_body", "the body must be a JSON object")
    unknown = sorted(set(payload) - {"text", "texts", "truncate"})
    if unknown:
        raise bad_request("unknown_field", f"unknown field(s): {', '.join(unknown)[:200]}")
    if "text" in payload and "texts" in payload:
        raise bad_request("ambiguous_input", "give either `text` or `texts`, not both")
    if "text" in payload:
        texts = [payload["text"]]
    elif "texts" in payload:
        texts = payload["texts"]
        if not isinstance(texts, list):
            raise bad_request("invalid_texts", "`texts` must be a list of strings")
        if not texts:
            raise bad_request("missing_text", "`texts` is empty")
        if len(texts) > max_texts:
            raise bad_request("too_many_texts", f"at most {max_texts} texts per request")
    else:
        raise bad_request("missing_text", "the body needs `text` (a string) or `texts`")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise bad_request("invalid_text", f"text {i} is not a string")
        if not t.strip():
            raise bad_request("empty_text", f"text {i} is empty")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise bad_request("invalid_text", f"text {i} is not valid Unicode") from None
    truncate = payload.get("truncate", False)
    if not isinstance(truncate, bool):
        raise bad_request("invalid_truncate", "`truncate` must be true or false")
    return texts, truncate


def create_app(c: Components) -> FastAPI:
    s = c.settings
    info = c.runner.info
    metrics = Metrics(c.instance_id, info.name, info.version)
    limiter = RateLimiter()
    unmetered = s.metering == "off"
    if unmetered:
        log.warning("metering is off: answers are not authenticated, limited or billed "
                    "(benchmarks only)")
    c.runner.batcher.on_batch = lambda n: metrics.batch_size.observe(n)

    @asynccontextmanager
    async def lifespan(app):
        yield
        # Drain: the ledger writer commits what is queued before it stops.
        c.runner.stop()
        c.ledger.stop()

    app = FastAPI(title="tokenmeter", version="1", lifespan=lifespan,
                  description="Sentiment analysis billed per token. Errors are "
                              "`{\"error\": {\"type\", \"code\", \"message\"}}`; an error is "
                              "never billed.")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error_response(exc.status, exc.type, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error_response(exc.status_code, "invalid_request_error", code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error_response(400, "invalid_request_error", "invalid_parameter",
                               f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # The traceback goes to the server log (it holds no request text); the user gets a line.
        log.error("unhandled error", exc_info=exc)
        return _error_response(500, "server_error", "internal_error",
                               "internal error; the request was not billed")

    app.add_middleware(CountRequests, metrics=metrics)

    async def _key(request: Request):
        try:
            return await run_in_threadpool(authenticate, c.ledger,
                                           request.headers.get("authorization"))
        except AuthError as exc:
            raise ApiError(401, "authentication_error", exc.code, exc.message,
                           {"WWW-Authenticate": "Bearer"}) from None

    def _replay(body: str) -> Response:
        return Response(body, media_type=JSON, headers={"Idempotent-Replayed": "true"})

    @app.post("/v1/analyze", response_model=AnalyzeResponse, responses=ERROR_RESPONSES,
              openapi_extra={"requestBody": {"required": True, "content": {
                  JSON: {"schema": AnalyzeRequest.model_json_schema()}}},
                  "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                  "schema": {"type": "string"},
                                  "description": "A retry with the same key returns the first "
                                                 "answer and is not billed again."}]})
    async def analyze(request: Request):
        t0 = time.perf_counter()
        # Unmetered (benchmarks only, see Settings.metering): no key, limits, budget or ledger.
        key = None if unmetered else await _key(request)
        texts, truncate = parse_analyze(await _read_body(request, s.max_body_bytes),
                                        s.max_texts)
        idem = request.headers.get("idempotency-key")
        if idem is not None and key is not None:
            if len(idem) > s.max_idempotency_key_len or not IDEMPOTENCY_RE.match(idem):
                raise bad_request("invalid_idempotency_key",
                                  f"Idempotency-Key must be 1-{s.max_idempotency_key_len} "
                                  "printable ASCII characters")
            prior = await run_in_threadpool(c.ledger.find_idempotent, key.id, idem)
            if prior is not None:
                return _replay(prior)
        try:
            # On the event-loop thread only: one thread ever uses the tokenizer (HF fast
            # tokenizers are not safe to share across threads), and it takes well under a ms.
            metered = c.meter.meter(texts, truncate)
        except InputError as exc:
            raise ApiError(exc.status, "invalid_request_error", exc.code, exc.message) from None
        max_out = c.meter.max_output_tokens_per_text * len(texts)
        refusal = None if key is None else limiter.admit(key.id, metered.input_tokens + max_out,
                                key.rpm or s.default_rpm, key.tpm or s.default_tpm)
        if refusal is not None:
            raise ApiError(429, "rate_limit_error", refusal.code, refusal.message,
                           {"Retry-After": str(refusal.retry_after_s)})
        ts = now_iso()
        if key is not None and key.has_budget:
            # Cheap refusal before using the model; the authoritative check is in the commit.
            worst = (pricing.cost(c.price, metered.input_tokens, max_out).total_micro,
                     metered.input_tokens + max_out)
            if not await run_in_threadpool(_fits, c.ledger, key, period_of(ts), worst):
                raise _quota_error()
        try:
            future = c.runner.submit(metered.ids)
        except Overloaded:
            raise ApiError(503, "overloaded_error", "overloaded",
                           "the model is overloaded; retry later", {"Retry-After": "1"}) from None
        metrics.queue_depth.set(c.runner.batcher.depth())
        probs = await asyncio.wrap_future(future)
        label_ids = [int(i) for i in np.argmax(probs, axis=1)]
        output_tokens = c.meter.output_tokens(label_ids)
        cost = pricing.cost(c.price, metered.input_tokens, output_tokens)
        event_id = "evt_" + uuid.uuid4().hex
        body = {
            "id": event_id, "model": info.name, "model_version": info.version,
            "results": [{"label": info.labels[i], "score": round(float(p[i]), 6)}
                        for i, p in zip(label_ids, probs)],
            "usage": {"input_tokens": metered.input_tokens, "output_tokens": output_tokens,
                      "total_tokens": metered.input_tokens + output_tokens},
            "cost": {"currency": c.price.currency,
                     "input": pricing.micro_to_str(cost.input_micro),
                     "output": pricing.micro_to_str(cost.output_micro),
                     "total": pricing.micro_to_str(cost.total_micro)},
        }
        body_json = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        if key is None:
            return Response(body_json, media_type=JSON)
        latency_us = int((time.perf_counter() - t0) * 1e6)
        event = BillingEvent(
            id=event_id, ts=ts, key_id=key.id, user_id=key.user_id, model=info.name,
            model_version=info.version, input_tokens=metered.input_tokens,
            output_tokens=output_tokens, currency=c.price.currency,
            input_price_per_1k=str(c.price.input_per_1k),
            output_price_per_1k=str(c.price.output_per_1k), input_cost_micro=cost.input_micro,
            output_cost_micro=cost.output_micro, cost_micro=cost.total_micro,
            latency_us=latency_us, request_id=request.headers.get("x-request-id", event_id)[:100],
            instance_id=c.instance_id, idempotency_key=idem, response=body_json)
        # The row is durable before the answer leaves: a 200 the client sees is on disk.
        result = await asyncio.wrap_future(
            c.ledger.commit_event(event, key))
        if result.status == "duplicate":
            return _replay(result.response or "")
        if result.status == "insufficient_quota":
            raise _quota_error()
        metrics.billed.labels(info.name).inc()
        metrics.tokens.labels(info.name, "input").inc(metered.input_tokens)
        metrics.tokens.labels(info.name, "output").inc(output_tokens)
        metrics.cost.labels(info.name).inc(cost.total_micro)
        billing_log.info(json.dumps({
            "event": "billing_event", "id": event_id, "ts": ts, "key_id": key.id,
            "user": key.user_id, "model": info.name, "model_version": info.version,
            "input_tokens": metered.input_tokens, "output_tokens": output_tokens,
            "cost_micro_usd": cost.total_micro, "currency": c.price.currency,
            "latency_ms": round(latency_us / 1000, 3), "instance_id": c.instance_id,
            "truncated_texts": metered.truncated, "idempotency_key_set": idem is not None}))
        return Response(body_json, media_type=JSON)

    @app.get("/v1/usage", responses=ERROR_RESPONSES)
    async def usage(request: Request, start: Optional[str] = None, end: Optional[str] = None,
                    granularity: str = "day", user: Optional[str] = None):
        """The caller's requests, tokens and cost by UTC day and model, start..end inclusive
        (YYYY-MM-DD; default this month). An admin key may pass `user`."""
        key = await _key(request)
        if granularity != "day":
            raise bad_request("invalid_granularity", "granularity must be `day`")
        if user is not None and user != key.user_id and not key.is_admin:
            raise ApiError(403, "permission_error", "forbidden",
                           "only an admin key may read another user's usage")
        try:
            lo, hi = day_range(start, end)
        except ValueError as exc:
            raise bad_request("invalid_date", f"start/end must be YYYY-MM-DD: {exc}") from None
        who = user or key.user_id
        rows = await run_in_threadpool(c.ledger.usage, who, lo, hi)
        total = {"requests": 0, "input_tokens": 0, "output_tokens": 0, "cost_micro": 0}
        data = []
        for r in rows:
            for k in total:
                total[k] += r[k]
            data.append(_usage_row(r, c.price.currency))
        return {"user": who, "start": lo, "end": hi, "granularity": "day", "data": data,
                "total": _usage_row(total, c.price.currency)}

    @app.get("/metrics")
    async def prometheus_metrics():
        metrics.queue_depth.set(c.runner.batcher.depth())
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        writable = await run_in_threadpool(c.ledger.writable)
        ready = c.runner.ready and writable
        return JSONResponse({"ready": ready, "model_loaded": c.runner.ready,
                             "ledger_writable": writable, "model": info.name,
                             "model_version": info.version},
                            status_code=200 if ready else 503)

    return app


def _fits(ledger: Ledger, key: KeyRecord, period: str, worst: Tuple[int, int]) -> bool:
    """Whether the worst-case cost (micro-USD, tokens) still fits the key's and user's budgets."""
    for spent, limits in ((ledger.spent(key.id, period),
                           (key.budget_micro_usd, key.budget_tokens)),
                          (ledger.user_spent(key.user_id, period),
                           (key.user_budget_micro_usd, key.user_budget_tokens))):
        for used, add, limit in zip(spent, worst, limits):
            if limit is not None and used + add > limit:
                return False
    return True


def _quota_error() -> ApiError:
    return ApiError(429, "insufficient_quota", "insufficient_quota",
                    "the monthly budget of this key or its user is spent; "
                    "the request was not billed")


def _usage_row(r: Mapping[str, Union[int, str]], currency: str) -> Dict[str, object]:
    out: Dict[str, object] = {k: v for k, v in r.items() if k != "cost_micro"}
    out["total_tokens"] = int(r["input_tokens"]) + int(r["output_tokens"])
    out["cost"] = {"currency": currency,
                   "total": pricing.micro_to_str(int(r["cost_micro"]))}
    return out
