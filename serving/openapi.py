"""The OpenAPI document of the endpoint, written to match what the server answers: the request
body schema of POST /v1/analyze (from serving.billing.parse and the model's tokenizer), the
response models, each route's documented error answers and headers, and a FastAPI subclass whose
document lists no 422 and no nullable parameter.

It describes; it must not parse, meter or answer anything (serving.app and serving.billing do).
"""

from __future__ import annotations

import functools
import itertools
import unicodedata
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, Union

from fastapi import FastAPI
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field

# The body of /v1/analyze is parsed by hand (serving.billing.parse) so that every malformed body
# gets our error shape and code; its schema below is written from that parser.

def _may_be_blank(c: int) -> bool:
    """Whether a code point is worth asking the tokenizer about: whitespace, marks, controls,
    format, private-use and separator characters (Unicode categories M*, C*, Z*; not unassigned
    ones or surrogates) and U+FFFD, which BERT's clean_text deletes."""
    ch = chr(c)
    cat = unicodedata.category(ch)
    return ch.isspace() or (cat[0] in "MCZ" and cat not in ("Cn", "Cs")) or c == 0xFFFD


@functools.lru_cache(maxsize=4)
def blank_ranges(tokenizer_json: str) -> Tuple[Tuple[int, int], ...]:
    """Code point ranges of the characters a text may consist of and still be refused as
    `empty_text`: those the model's tokenizer turns into no token at all (its normaliser deletes
    them or reads them as space), plus everything str.isspace() accepts (billing.parse strips
    those). Whether a text has a token is a property of its single characters: normalising and
    pre-tokenising never make a kept character vanish, nor a deleted one count.

    Asked of the tokenizer itself, since its Unicode tables are not Python's: one encode of the
    ~140,000 candidates (~0.3 s); planes 3-13 hold no candidate (ideographs or unassigned)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)  # a copy: the Meter's stays untouched
    tokenizer.no_truncation()
    tokenizer.no_padding()
    candidates = [c for c in itertools.chain(range(0x30000), range(0xE0000, 0x110000))
                  if _may_be_blank(c)]
    text = " ".join(map(chr, candidates))  # each candidate its own word: offsets find it
    kept = {text[start] for start, _ in
            tokenizer.encode(text, add_special_tokens=False).offsets}
    blank = sorted(c for c in candidates if chr(c) not in kept or chr(c).isspace())
    ranges: List[Tuple[int, int]] = []
    for c in blank:
        if ranges and ranges[-1][1] == c - 1:
            ranges[-1] = (ranges[-1][0], c)
        else:
            ranges.append((c, c))
    return tuple(ranges)


def _class_char(c: int) -> str:
    # \uXXXX reads the same in ECMA-262, Python and Rust regexes; beyond the BMP the character
    # itself (ECMA's \u{...} and Python's \U........ are not shared).
    return f"\\u{c:04x}" if c < 0x10000 else chr(c)


def text_pattern(ranges: Sequence[Tuple[int, int]]) -> str:
    """A regex matching a text with at least one character outside `ranges` (unanchored)."""
    items = (_class_char(a) if a == b else f"{_class_char(a)}-{_class_char(b)}"
             for a, b in ranges)
    return f"[^{''.join(items)}]"


def analyze_request_schema(max_texts: int, pattern: str) -> Dict[str, Any]:
    """The request body of POST /v1/analyze as JSON Schema: exactly one of `text` or `texts`,
    optional `truncate`, nothing else, no nulls (billing.parse refuses each of those); each text
    matches `pattern` (text_pattern: it has a token)."""
    text = {"type": "string", "pattern": pattern,
            "description": "Must contain a character the model's tokenizer keeps: a text of "
                           "only whitespace, control, format or private-use characters or "
                           "lone combining marks (the pattern's class, derived from the "
                           "tokenizer) has no token and is refused as 400 `empty_text`."}
    return {
        "type": "object",
        "properties": {
            "text": {**text, "description": "One text. " + text["description"]},
            "texts": {"type": "array", "items": text, "minItems": 1, "maxItems": max_texts,
                      "description": f"1 to {max_texts} texts (settings.max_texts)."},
            "truncate": {"type": "boolean", "default": False,
                         "description": "Cut texts longer than the model's maximum to it (the "
                                        "cut count is billed) instead of 413."},
        },
        "oneOf": [{"required": ["text"]}, {"required": ["texts"]}],  # exactly one of the two
        "additionalProperties": False,
        "examples": [{"text": "很好"}, {"texts": ["好评", "太差了，退货"], "truncate": True}],
    }


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
    tier: str = Field(
        ..., pattern=r"^[a-z0-9_]+(\+priority)?$",
        description="the price tier applied: `long_context` when the request has more input "
                    "tokens than its model's long_context.above_input_tokens, else a volume "
                    "tier's name when the user's tokens this month reached it, else "
                    "`standard`; `+priority` when it was sent with `Tokenmeter-Priority: high`")


class AnalyzeResponse(BaseModel):
    id: str
    model: str
    model_version: str
    results: List[Result]
    usage: Usage
    cost: CostOut


class UsageCost(BaseModel):
    currency: str
    total: str = Field(..., description="decimal string, 6 places")


class UsageTotal(BaseModel):
    requests: int
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cost: UsageCost


class UsageRow(UsageTotal):
    date: str = Field(..., description="UTC day, YYYY-MM-DD")
    model: str


class UsageReport(BaseModel):
    user: str
    start: str = Field(..., description="first day, YYYY-MM-DD")
    end: str = Field(..., description="the day after the last one (exclusive), YYYY-MM-DD")
    granularity: Literal["day"]
    data: List[UsageRow]
    total: UsageTotal


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    model_loaded: bool
    ledger_writable: bool
    model_runner_alive: bool
    ledger_writer_alive: bool
    model: str
    model_version: str = Field(description="the stable version")
    canary_version: Optional[str] = None
    canary_percent: int = Field(0, description="the canary's share of unpinned requests")
    model_versions: List[str] = Field(description="every version loaded (any may be pinned)")


class ErrorDetail(BaseModel):
    type: str
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


# The type FastAPI's `responses=` takes: status code -> OpenAPI fields of that answer.
Responses = Dict[Union[int, str], Dict[str, Any]]

STRING = {"schema": {"type": "string"}}
_RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}


def _errors(described: Dict[int, str],
            headers: Optional[Dict[int, Dict[str, Any]]] = None) -> Responses:
    """Error answers of one route: each with our error body and the headers it carries."""
    out: Responses = {}
    for status, description in described.items():
        out[status] = {"model": ErrorBody, "description": description}
        if headers and status in headers:
            out[status]["headers"] = headers[status]
    return out


_UNAUTHENTICATED = ("missing_api_key, invalid_api_key or revoked_api_key "
                    "(`WWW-Authenticate: Bearer`)")
_ALWAYS_BEARER = {401: {"WWW-Authenticate": {**STRING, "required": True}}}
_ALWAYS_RETRY = {503: {"Retry-After": {**_RETRY_AFTER, "required": True}}}

PRIORITY_HEADER = "Tokenmeter-Priority"


def priority_parameter(available: bool) -> Dict[str, Any]:
    """The priority header of /v1/analyze: `high` only where the price file has a priority
    tier for the model (elsewhere it is a 400 priority_unavailable)."""
    return {"name": PRIORITY_HEADER, "in": "header", "required": False,
            "description": "`high`: the request goes ahead of standard ones in the model queue "
                           "and is priced with the priority surcharge (the answer's cost.tier "
                           "ends in `+priority`); `standard` or absent: neither.",
            "schema": {"type": "string",
                       "enum": ["standard", "high"] if available else ["standard"]}}


VERSION_HEADER = "Tokenmeter-Model-Version"


def version_parameter(served: Sequence[str]) -> Dict[str, Any]:
    """The header that pins a model version (serving.versions). The versions served change with
    the rollout: DocumentedApp rewrites the enum each time the document is asked for."""
    return {"name": VERSION_HEADER, "in": "header", "required": False,
            "description": "A version of the model to answer (e.g. `2`), whatever the rollout "
                           "says; a version this endpoint does not serve is a 400 "
                           "unknown_model_version naming the ones it does. Absent: the stable "
                           "version, or the canary for its share of requests.",
            "schema": {"type": "string", "enum": list(served)}}


ANALYZE_RESPONSES: Responses = {
    200: {"description": "the answer, billed; `Idempotent-Replayed: true` on a replay of an "
                         "earlier answer (not billed again)",
          "headers": {"Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]}}},
          # What a client may do next with this answer (OpenAPI links; schemathesis's stateful
          # phase follows them): send the same request under the same key again.
          "links": {"ReplayWithTheSameKey": {
              "operationId": "analyze",
              "description": "the same body and Idempotency-Key again: the first answer, "
                             "`Idempotent-Replayed: true`, not billed again",
              "parameters": {"header.Idempotency-Key": "$request.header.Idempotency-Key"},
              "requestBody": "$request.body"}}},
    **_errors({
        400: "invalid_json, invalid_body, missing_text, empty_text, invalid_text, "
             "invalid_texts, too_many_texts, body_too_large, ambiguous_input, unknown_field, "
             "invalid_truncate, invalid_idempotency_key, invalid_content_length, "
             "invalid_priority, priority_unavailable (this model has no priority tier), "
             "unknown_model_version (Tokenmeter-Model-Version names a version not served)",
        401: _UNAUTHENTICATED,
        409: "idempotency_key_reused: the Idempotency-Key was used for another request",
        413: "input_too_long: a text longer than the model's maximum tokens (without truncate)",
        429: "rate_limit_exceeded / token_rate_limit_exceeded (with Retry-After), or "
             "insufficient_quota (the key's or user's budget)",
        503: "overloaded, ledger_busy, ledger_unavailable or model_timeout (not billed), or "
             "ledger_outcome_unknown (may be billed: retry with the same Idempotency-Key); "
             "Retry-After says when to retry",
    }, headers={**_ALWAYS_BEARER, 429: {"Retry-After": _RETRY_AFTER}, **_ALWAYS_RETRY}),
}

USAGE_RESPONSES: Responses = {
    200: {"model": UsageReport, "description": "the usage report"},
    **_errors({
        400: "invalid_granularity, or invalid_date (not a date, or end before start)",
        401: _UNAUTHENTICATED,
        403: "forbidden: `user` names another user and the key is not an admin key",
        503: "ledger_unavailable: the ledger cannot be read; Retry-After says when to retry",
    }, headers={**_ALWAYS_BEARER, **_ALWAYS_RETRY}),
}

def _report_row(names: Dict[str, str], extra: Dict[str, Any]) -> Dict[str, Any]:
    props: Dict[str, Any] = {**extra, **{n: {"type": "string", "description": d}
                                         for n, d in names.items()}}
    for f in ("requests", "input_tokens", "output_tokens", "total_tokens"):
        props[f] = {"type": "integer", "minimum": 0}
    props["cost"] = {"type": "string", "description": "billed, decimal string, 6 places"}
    props["currency"] = {"type": "string"}
    return {"type": "object", "properties": props,
            "required": sorted(set(props) - {"user", "key_id", "model"})}


_GROUP_NAMES = {"user": "user id (group_by=user or key)", "key_id": "key id (group_by=key)",
                "model": "model name (group_by=model)"}
REPORT_ROW = _report_row(_GROUP_NAMES, {"period": {
    "type": "string", "description": "UTC day (YYYY-MM-DD) or month (YYYY-MM)"}})
TOP_ROW = _report_row({"user": "user id"}, {"rank": {"type": "integer", "minimum": 1}})
_REPORT_ERRORS = _errors({
    400: "invalid_group_by, invalid_granularity, invalid_date, invalid_period or invalid_n",
    401: _UNAUTHENTICATED,
    403: "forbidden: reports need an admin key",
    503: "ledger_unavailable: the ledger cannot be read; Retry-After says when to retry",
}, headers={**_ALWAYS_BEARER, **_ALWAYS_RETRY})


def _report_responses(row: Dict[str, Any], meta: Dict[str, Any], what: str) -> Responses:
    body = {"type": "object", "required": [*meta, "currency", "data"],
            "properties": {**meta, "currency": {"type": "string"},
                           "data": {"type": "array", "items": row}}}
    return {200: {"description": what + "; `format=csv`: the rows as CSV, one header line",
                  "content": {"application/json": {"schema": body},
                              "text/csv": STRING}},
            **_REPORT_ERRORS}


REPORT_RESPONSES = _report_responses(REPORT_ROW, {
    "group_by": {"type": "string", "enum": ["user", "key", "model"]},
    "granularity": {"type": "string", "enum": ["day", "month"]},
    "start": {"type": "string"}, "end": {"type": "string"}}, "usage by group and period")
TOP_RESPONSES = _report_responses(TOP_ROW, {"period": {"type": "string"},
                                            "n": {"type": "integer"}}, "the top users")

# Bearer keys, in the document only: caller_key reads the header itself so that each failure
# gets its own code; auto_error=False keeps this from answering anything.
bearer = HTTPBearer(auto_error=False, description="an API key made with `keys create`")


class DocumentedApp(FastAPI):
    """FastAPI whose document lists no 422 (a validation error is answered 400 here, by
    `_validation_error`, and each route documents its 400) and no nullable parameter; and
    whose Tokenmeter-Model-Version lists the versions `served_versions()` says are served now."""

    served_versions: Optional[Callable[[], List[str]]] = None

    def openapi(self) -> Dict[str, Any]:
        doc = self._document()
        if self.served_versions is not None:
            served = self.served_versions()
            for path in doc.get("paths", {}).values():
                for op in path.values():
                    for param in op.get("parameters", []):
                        if param.get("name") == VERSION_HEADER:
                            param["schema"]["enum"] = served
        return doc

    def _document(self) -> Dict[str, Any]:
        if self.openapi_schema is not None:
            return self.openapi_schema
        doc = super().openapi()  # built once, cached in self.openapi_schema (this same dict)
        for path in doc.get("paths", {}).values():
            for op in path.values():
                op.get("responses", {}).pop("422", None)
                for param in op.get("parameters", []):
                    # Optional[str] reads as anyOf [string, null]; a header or query parameter
                    # is absent or a string, never JSON null.
                    schema = param.get("schema", {})
                    kinds = schema.get("anyOf", [])
                    if {"type": "null"} in kinds and len(kinds) == 2:
                        schema.update(next(k for k in kinds if k != {"type": "null"}))
                        del schema["anyOf"]
        schemas = doc.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        return doc
