"""The HTTP layer: routes (POST /v1/analyze, GET /v1/usage, /metrics, /healthz, /readyz), their
request dependencies, and the JSON error contract (a `Refused` kind -> status code and headers).

Routes stay thin: the billing flow itself is `serving.billing.Billing`, which knows no HTTP; this
module must not meter, price or touch the ledger beyond calling it.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import (
    AsyncIterator,
    Callable,
    Dict,
    List,
    Optional,
    Sequence,
    Tuple,
)

from anyio import to_thread
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import Gauge
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute
from typing_extensions import Annotated  # typing.Annotated is 3.9+; the official image has 3.8

from serving import pricing, reports
from serving.billing import IDEMPOTENCY_RE, Answer, Billing, Refused, invalid
from serving.ledger import KeyRecord, Ledger
from serving.metering import Meter
from serving.metrics import Metrics
from serving.openapi import (
    ANALYZE_RESPONSES,
    PRIORITY_HEADER,
    REPORT_RESPONSES,
    STRING,
    TOP_RESPONSES,
    USAGE_RESPONSES,
    VERSION_HEADER,
    AnalyzeResponse,
    DocumentedApp,
    Health,
    Readiness,
    analyze_request_schema,
    bearer,
    blank_ranges,
    priority_parameter,
    text_pattern,
    version_parameter,
)
from serving.pg_limits import PgRateLimiter
from serving.runner import ModelRunner
from serving.settings import Settings
from serving.shared_limits import RedisRateLimiter, SharedRateLimiter
from serving.versions import Rollout, Served, Versions, stored_rollout
from serving.watchdog import Watchdog, Watched

log = logging.getLogger("tokenmeter")

JSON = "application/json"
ANALYZE = "/v1/analyze"
PROMETHEUS = "text/plain; version=0.0.4"


class CountRequests:
    """Counts every answer by route template and status, times /v1/analyze, and serves
    POST /v1/analyze itself.

    Plain ASGI on purpose: as a `@app.middleware("http")` (BaseHTTPMiddleware) its task group
    and streaming-response wrapper took ~20% of the event loop at concurrency 32 (py-spy).
    The hot path goes from here straight to `analyze_asgi`: the layers inside this one
    (Starlette's exception middleware, FastAPI's exit stack, the router, the route's request
    wrapper, each wrapping `send` again) took ~20% of the event loop for the same answer.
    `hot` is the route that documents it (FastAPI's), used here as the metrics label.
    """

    def __init__(self, app, metrics: Metrics, hot: BaseRoute):
        self.app, self.metrics, self.hot = app, metrics, hot

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
            if scope["path"] == ANALYZE and scope["method"] == "POST":
                scope["route"] = self.hot
                await analyze_asgi(scope, receive, send_and_note)
            else:
                await self.app(scope, receive, send_and_note)
        finally:
            # The router writes the matched route into this same scope dict.
            path = getattr(scope.get("route"), "path", "other")  # bounded cardinality
            self.metrics.requests.labels(path, str(status[0])).inc()
            if path == ANALYZE:
                self.metrics.latency.labels(str(status[0])).observe(time.perf_counter() - t0)


@dataclass
class Components:
    settings: Settings
    runner: ModelRunner
    ledger: Ledger
    meter: Meter
    price: pricing.Price
    instance_id: str
    # Loads another version of the model (serving.versions); None serves `runner`'s only.
    load_version: Optional[Callable[[str], Served]] = None


# Refusal kind (serving.billing.KINDS) -> HTTP status and the error body's `type`.
HTTP_OF_KIND: Dict[str, Tuple[int, str]] = {
    "authentication": (401, "authentication_error"),
    "permission": (403, "permission_error"),
    "invalid": (400, "invalid_request_error"),
    "too_long": (413, "invalid_request_error"),
    "conflict": (409, "invalid_request_error"),
    "rate_limit": (429, "rate_limit_error"),
    "quota": (429, "insufficient_quota"),
    "overloaded": (503, "overloaded_error"),
    "unavailable": (503, "service_unavailable_error"),
}


def _error_response(status: int, type_: str, code: str, message: str,
                    headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": {"type": type_, "code": code, "message": message}},
                        status_code=status, headers=headers)


def refusal_response(exc: Refused) -> JSONResponse:
    status, type_ = HTTP_OF_KIND[exc.kind]
    headers = {}
    if exc.kind == "authentication":
        headers["WWW-Authenticate"] = "Bearer"
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(exc.retry_after_s)
    return _error_response(status, type_, exc.code, exc.message, headers)


def client_gone() -> Response:
    # The client hung up while sending its body: nothing was metered or billed, nobody reads
    # the answer. Counted as 499 (nginx's "client closed request"), not as an error.
    return Response(status_code=499)


def answer_response(answer: Answer) -> Response:
    return Response(answer.body, media_type=JSON,
                    headers={"Idempotent-Replayed": "true"} if answer.replayed else None)


# --- request dependencies ---------------------------------------------------------------------
async def billing_of(request: Request) -> Billing:
    # async: FastAPI runs a plain `def` dependency in its thread pool (a hop per request).
    return request.app.state.billing


BillingDep = Annotated[Billing, Depends(billing_of)]


async def caller_key(request: Request, billing: BillingDep) -> KeyRecord:
    """The key of `Authorization: Bearer <key>`, or a 401."""
    return await billing.authenticate(request.headers.get("authorization"))


CallerKey = Annotated[KeyRecord, Depends(caller_key)]


async def request_body(request: Request, billing: BillingDep) -> bytes:
    """The body, refused as soon as it is known to be over max_body_bytes."""
    limit = billing.settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise invalid("invalid_content_length", "Content-Length is not a number")
        if int(declared) > limit:
            raise invalid("body_too_large", f"the body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise invalid("body_too_large", f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_priority(value: Optional[str]) -> bool:
    """The Tokenmeter-Priority header: `high` asks for the priority tier; absent or `standard`
    does not. Anything else is a 400 naming the two values."""
    if value is None or value.strip().lower() == "standard":
        return False
    if value.strip().lower() == "high":
        return True
    raise invalid("invalid_priority", f"{PRIORITY_HEADER} must be `standard` or `high`")


# --- routes (registered per app by `routes`: the document depends on settings and model) ---
# POST /v1/analyze. Reads its headers itself, no FastAPI dependency: it is served by
# CountRequests (`analyze_asgi`); its parameters are documented in `routes`. (A comment, not a
# docstring: FastAPI would publish a docstring as the operation's description.)
async def analyze(request: Request) -> Response:
    billing: Billing = request.app.state.billing
    key = await caller_key(request, billing) if billing.metered else None
    body = await request_body(request, billing)
    headers = request.headers
    return answer_response(await billing.analyze(
        key, body, headers.get("idempotency-key"), headers.get("x-request-id"),
        parse_priority(headers.get(PRIORITY_HEADER)),
        headers.get(VERSION_HEADER)))  # "" is a version not served: a 400


async def analyze_asgi(scope, receive, send) -> None:
    """`analyze` as an ASGI app, its refusals answered as the app's exception handlers answer
    them; anything else propagates to the server-error handler (a JSON 500)."""
    try:
        response = await analyze(Request(scope, receive))
    except Refused as exc:
        response = refusal_response(exc)
    except ClientDisconnect:
        response = client_gone()
    await response(scope, receive, send)


# A date parameter of /v1/usage: YYYY-MM-DD, or empty for the default (Billing.usage treats
# "" as absent). Whether end >= start cannot be said per parameter: a 400 invalid_date.
_DAY = {"type": "string", "anyOf": [{"format": "date"}, {"maxLength": 0}]}


async def usage(key: CallerKey, billing: BillingDep,
                start: Annotated[Optional[str], Query(
                    description="first UTC day, YYYY-MM-DD (empty or absent: the 1st of this "
                                "month)", json_schema_extra=_DAY)] = None,
                end: Annotated[Optional[str], Query(
                    description="last UTC day, inclusive, YYYY-MM-DD, not before start (empty "
                                "or absent: today)", json_schema_extra=_DAY)] = None,
                # A plain str, checked by Billing.usage (code invalid_granularity); the enum is
                # the document's half of that rule.
                granularity: Annotated[str, Query(json_schema_extra={"enum": ["day"]})] = "day",
                user: Annotated[Optional[str], Query(
                    description="whose usage: another user's id needs an admin key (403 "
                                "otherwise)")] = None
                ) -> Dict[str, object]:
    """The caller's requests, tokens and cost by UTC day and model, start..end inclusive
    (YYYY-MM-DD; default this month). An admin key may pass `user`."""
    return await billing.usage(key, user, start, end, granularity)


def report_response(meta: Dict[str, object], rows: List[Dict[str, object]],
                    columns: List[str], fmt: str) -> Response:
    if fmt == "csv":
        return Response(reports.to_csv(rows, columns), media_type="text/csv")
    return JSONResponse({**meta, "data": rows})


Format = Annotated[str, Query(json_schema_extra={"enum": ["json", "csv"]},
                              description="json (default) or csv")]


async def usage_report(key: CallerKey, billing: BillingDep,
                       group_by: Annotated[str, Query(
                           json_schema_extra={"enum": list(reports.GROUPS)})] = "user",
                       granularity: Annotated[str, Query(
                           json_schema_extra={"enum": list(reports.GRANULARITIES)})] = "day",
                       start: Annotated[Optional[str], Query(
                           description="first UTC day, YYYY-MM-DD (default: the 1st of this "
                                       "month)", json_schema_extra=_DAY)] = None,
                       end: Annotated[Optional[str], Query(
                           description="last UTC day, inclusive (default: today)",
                           json_schema_extra=_DAY)] = None,
                       format: Format = "json") -> Response:
    """Every user's requests, tokens and cost grouped by user, key or model per UTC day or
    month (admin keys only)."""
    if format not in ("json", "csv"):
        raise invalid("invalid_format", "format must be json or csv")
    rows = await billing.usage_report(key, group_by, granularity, start or None, end or None)
    return report_response({"group_by": group_by, "granularity": granularity,
                            "start": start or "", "end": end or "",
                            "currency": billing.price.currency}, rows,
                           ["period", *reports.GROUP_COLUMNS[group_by], *REPORT_COLUMNS],
                           format)


async def top_users(key: CallerKey, billing: BillingDep,
                    period: Annotated[Optional[str], Query(
                        description="UTC month, YYYY-MM (default: this month)",
                        json_schema_extra={"pattern": "^[0-9]{4}-[0-9]{2}$"})] = None,
                    n: Annotated[int, Query(ge=1, le=1000)] = 10,
                    format: Format = "json") -> Response:
    """The n users with the highest billed cost in a month (admin keys only)."""
    if format not in ("json", "csv"):
        raise invalid("invalid_format", "format must be json or csv")
    rows = await billing.top_users(key, period or None, n)
    return report_response({"period": period or "", "n": n,
                            "currency": billing.price.currency}, rows,
                           ["rank", "user", *REPORT_COLUMNS], format)


REPORT_COLUMNS = ["requests", "input_tokens", "output_tokens", "total_tokens", "cost",
                  "currency"]


async def prometheus_metrics(request: Request) -> Response:
    metrics: Metrics = request.app.state.metrics
    billing: Billing = request.app.state.billing
    metrics.queue_depth.set(sum(v.runner.depth() for v in billing.versions.all()))
    return Response(metrics.render(), media_type=PROMETHEUS)


async def healthz() -> Dict[str, str]:
    return {"status": "ok"}


async def readyz(request: Request) -> JSONResponse:
    c: Components = request.app.state.components
    versions: Versions = request.app.state.billing.versions
    writable = await to_thread.run_sync(c.ledger.writable)
    served = versions.all()
    loaded = all(v.runner.ready for v in served)
    # A dead worker thread would leave every request waiting: not ready.
    threads = {"model_runner_alive": all(v.runner.alive() for v in served),
               "ledger_writer_alive": c.ledger.writer_alive()}
    ready = loaded and writable and all(threads.values())
    r = versions.rollout
    return JSONResponse({"ready": ready, "model_loaded": loaded,
                         "ledger_writable": writable, **threads, "model": versions.model,
                         "model_version": r.stable, "canary_version": r.canary,
                         "canary_percent": r.canary_percent,
                         "model_versions": sorted(versions.served)},
                        status_code=200 if ready else 503)


def routes(settings: Settings, metered: bool, meter: Meter, price: pricing.Price,
           versions: Sequence[str]) -> APIRouter:
    """The routes, documented as this app answers them: the body's maxItems and the
    Idempotency-Key's length come from `settings`, what makes a text from the model's tokenizer
    (`meter`), whether priority can be asked for from the `price`; without metering
    /v1/analyze asks no key."""
    r = APIRouter()
    # Read by `analyze` from the request itself, so that its schema can carry this app's
    # max_idempotency_key_len; Billing checks it (code invalid_idempotency_key).
    idempotency = {"name": "Idempotency-Key", "in": "header", "required": False,
                   "description": "1 to max_idempotency_key_len printable ASCII characters: a "
                                  "retry with the same key returns the first answer and is not "
                                  "billed again.",
                   "schema": {"type": "string", "pattern": IDEMPOTENCY_RE.pattern,
                              "minLength": 1, "maxLength": settings.max_idempotency_key_len}}
    auth = [Security(bearer)]
    request_id = {"name": "x-request-id", "in": "header", "required": False,
                  "description": "Stored with the billing row (first 100 characters).",
                  "schema": {"type": "string"}}
    # Documents POST /v1/analyze, which CountRequests serves (`analyze_asgi`).
    r.add_api_route(
        "/v1/analyze", analyze, methods=["POST"], response_model=AnalyzeResponse,
        operation_id="analyze",
        responses=ANALYZE_RESPONSES if metered else
        {s: v for s, v in ANALYZE_RESPONSES.items() if s != 401},
        dependencies=auth if metered else [],
        openapi_extra={"requestBody": {"required": True, "content": {
            JSON: {"schema": analyze_request_schema(
                settings.max_texts, text_pattern(blank_ranges(meter.tokenizer.to_str())))}}},
            "parameters": [request_id, idempotency, priority_parameter(price.has_priority),
                           version_parameter(versions)]})
    r.add_api_route("/v1/usage", usage, methods=["GET"], response_model=None,
                    responses=USAGE_RESPONSES, dependencies=auth)
    r.add_api_route("/v1/reports/usage", usage_report, methods=["GET"], response_model=None,
                    responses=REPORT_RESPONSES, dependencies=auth)
    r.add_api_route("/v1/reports/top-users", top_users, methods=["GET"], response_model=None,
                    responses=TOP_RESPONSES, dependencies=auth)
    r.add_api_route("/metrics", prometheus_metrics, methods=["GET"],
                    response_class=PlainTextResponse,
                    responses={200: {"description": "Prometheus text exposition format",
                                     "content": {"text/plain": STRING}}})
    r.add_api_route("/healthz", healthz, methods=["GET"], response_model=Health)
    r.add_api_route("/readyz", readyz, methods=["GET"], response_model=None,
                    responses={200: {"model": Readiness, "description": "ready"},
                               503: {"model": Readiness, "description": "not ready: the "
                                     "model is not loaded, the ledger is not writable or a "
                                     "worker thread is gone"}})
    return r


def shared_limiter(s: Settings, metrics: Metrics) -> Optional[SharedRateLimiter]:
    """The limits' store every replica uses (settings.limit_store: Redis, or PostgreSQL in the
    ledger's database; None: this process's memory), its state exported as
    tokenmeter_limit_store_up{store="redis"|"postgres"}. Nothing connects until a key with
    limits is admitted."""
    if s.limit_store not in ("redis", "postgres"):
        return None
    up = Gauge("tokenmeter_limit_store_up", "1 while the shared rate-limit store answers; 0: "
               "each replica limits at its share", ["store"],
               registry=metrics.registry).labels(s.limit_store)
    up.set(1)

    def on_store(ok: bool) -> None:
        up.set(1 if ok else 0)

    if s.limit_store == "redis":
        assert s.redis_url  # settings refuse redis without it
        return RedisRateLimiter(s.redis_url, s.limit_replicas, on_store=on_store)
    return PgRateLimiter(s.ledger, s.limit_replicas, on_store=on_store)


def model_versions(c: Components, metrics: Metrics, watchdog: Watchdog) -> Versions:
    """The versions this process serves: `c.runner`'s, and those the rollout in the ledger
    names when `c.load_version` can load them. Each loaded version gets the batch-size hook,
    the watchdog, and its line in tokenmeter_model_traffic_percent."""
    name = c.runner.info.name
    hooked: Dict[str, Served] = {}

    def applied(versions: Versions) -> None:
        for version, served in versions.served.items():
            if version not in hooked:
                hooked[version] = served
                served.runner.set_batch_hook(metrics.batch_size.observe)
                label = "model runner" if served is versions.default else \
                    f"model runner {version}"
                watchdog.add(Watched(label, served.runner.alive, served.runner.restart))
        for version in versions.served:
            metrics.traffic.labels(name, version).set(versions.rollout.share(version))

    def read_rollout() -> Optional[Rollout]:
        return stored_rollout(c.ledger, name)

    versions = Versions(Served(c.runner, c.meter), c.load_version,
                        read_rollout if c.load_version is not None else None,
                        c.settings.rollout_refresh_s, on_change=applied)
    applied(versions)
    return versions


def create_app(c: Components) -> FastAPI:
    info = c.runner.info
    metrics = Metrics(c.instance_id, info.name, info.version,
                      c.settings.hardware_usd_per_hour)
    shared = shared_limiter(c.settings, metrics)
    watchdog = Watchdog([Watched("ledger writer", c.ledger.writer_alive,
                                 c.ledger.restart_writer)],
                        on_restart=lambda name: metrics.thread_restarts.labels(name).inc())
    versions = model_versions(c, metrics, watchdog)
    billing = Billing(c.settings, c.runner, c.ledger, c.meter, c.price, c.instance_id, metrics,
                      shared=shared, versions=versions)
    if not billing.metered:
        log.warning("metering is off: answers are not authenticated, limited or billed "
                    "(benchmarks only)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await versions.follow()  # the rollout in the ledger, applied before the first request
        watchdog.start()
        yield
        watchdog.stop()  # first: the threads below end on purpose
        # Drain: the ledger writer commits what is queued before it stops.
        await versions.close()
        c.ledger.stop()
        if shared is not None:
            await shared.close()

    app = DocumentedApp(title="tokenmeter", version="1", lifespan=lifespan,
                        description="Sentiment analysis billed per token. Errors are "
                                    "`{\"error\": {\"type\", \"code\", \"message\"}}`; an "
                                    "error is never billed.")
    app.state.components, app.state.billing, app.state.metrics = c, billing, metrics

    @app.exception_handler(Refused)
    async def _refused(request: Request, exc: Refused) -> JSONResponse:
        return refusal_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        # exc.headers: Starlette's 405 carries `Allow` there (RFC 9110 requires it).
        return _error_response(exc.status_code, "invalid_request_error", code, str(exc.detail),
                               dict(exc.headers) if exc.headers else None)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error_response(400, "invalid_request_error", "invalid_parameter",
                               f"{where}: {first.get('msg', 'invalid')}")

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        return client_gone()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # The traceback goes to the server log (it holds no request text); the user gets a line.
        log.error("unhandled error", exc_info=exc)
        return _error_response(500, "server_error", "internal_error",
                               "internal error; the request was not billed")

    router = routes(c.settings, billing.metered, c.meter, c.price, sorted(versions.served))
    app.include_router(router)
    # POST /v1/analyze is served by CountRequests (see there); FastAPI's route documents it.
    hot = next(r for r in router.routes if getattr(r, "path", None) == ANALYZE)
    app.add_middleware(CountRequests, metrics=metrics, hot=hot)
    app.served_versions = lambda: sorted(versions.served)
    return app
