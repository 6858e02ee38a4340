"""A closed-loop HTTP load generator for the benchmark: N concurrent keep-alive connections on
asyncio, each sending the next request as soon as its answer arrives, bounded in count and time.

Plain asyncio streams rather than an HTTP client library: on 2 shared cores the client's own CPU
cost is part of what is measured, and this keeps it to a fraction of httpx's. It speaks only the
HTTP/1.x subset our servers answer with (Content-Length bodies) and knows nothing of billing.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence
from urllib.parse import urlsplit


@dataclass
class Record:
    """One request as the client saw it."""

    worker: int
    start_s: float  # since the start of the run
    latency_s: float
    status: int  # 0 = no HTTP answer (connection error, time-out)
    texts: int
    tokens: int  # usage.total_tokens of a 200 answer, else 0
    error: str = ""


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    records: List[Record] = field(default_factory=list)

    @property
    def ok(self) -> List[Record]:
        return [r for r in self.records if r.status == 200]


class _Conn:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    async def request(self, head: bytes, body: bytes, timeout: float):
        if self.writer is None:
            self.reader, self.writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port), timeout)
        assert self.reader is not None and self.writer is not None
        self.writer.write(head + body)
        status_line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not status_line:
            raise ConnectionError("server closed the connection")
        parts = status_line.split(None, 2)
        version, status = parts[0], int(parts[1])
        headers: Dict[bytes, bytes] = {}
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        if b"content-length" in headers:
            data = await asyncio.wait_for(
                self.reader.readexactly(int(headers[b"content-length"])), timeout)
            keep = version == b"HTTP/1.1" and headers.get(b"connection", b"").lower() != b"close"
        else:  # no length: the body runs to the end of the connection
            data = await asyncio.wait_for(self.reader.read(), timeout)
            keep = False
        if not keep:
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _head(host: str, port: int, path: str, body: bytes, headers: Dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
             f"Content-Length: {len(body)}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _run(url: str, bodies: Sequence[bytes], texts_per_body: Sequence[int],
               concurrency: int, duration_s: float, max_requests: int,
               headers: Dict[str, str], timeout_s: float) -> LoadResult:
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    heads = [_head(host, port, path, b, headers) for b in bodies]
    result = LoadResult(concurrency=concurrency, duration_s=0.0)
    t0 = time.perf_counter()
    deadline = t0 + duration_s
    issued = 0

    async def worker(w: int) -> None:
        nonlocal issued
        conn = _Conn(host, port)
        try:
            while time.perf_counter() < deadline and issued < max_requests:
                i = issued % len(bodies)
                issued += 1
                start = time.perf_counter()
                status, tokens, error = 0, 0, ""
                try:
                    status, data = await conn.request(heads[i], bodies[i], timeout_s)
                    if status == 200:
                        tokens = int(json.loads(data)["usage"]["total_tokens"])
                    else:
                        error = data[:200].decode("utf-8", "replace")
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                        ValueError, KeyError) as exc:
                    conn.close()
                    error = f"{type(exc).__name__}: {exc}"[:200]
                end = time.perf_counter()
                result.records.append(Record(w, start - t0, end - start, status, texts_per_body[i],
                                             tokens, error))
        finally:
            conn.close()

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    result.duration_s = time.perf_counter() - t0
    return result


def run_load(url: str, bodies: Sequence[bytes], texts_per_body: Sequence[int], concurrency: int,
             duration_s: float, max_requests: int, headers: Optional[Dict[str, str]] = None,
             timeout_s: float = 30.0) -> LoadResult:
    """Drive `url` with `concurrency` closed-loop workers cycling through `bodies`.

    Stops issuing at `duration_s` or after `max_requests`, whichever comes first; requests in
    flight then finish (each bounded by `timeout_s`)."""
    if not bodies:
        raise ValueError("no request bodies to send")
    return asyncio.run(_run(url, bodies, texts_per_body, concurrency, duration_s, max_requests,
                            headers or {}, timeout_s))


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), without importing numpy."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(result: LoadResult) -> Dict[str, Optional[float]]:
    """req/s, tokens/s and latency percentiles of the 200 answers; error rate of all."""
    ok = result.ok
    n, dur = len(result.records), max(result.duration_s, 1e-9)
    lat = [r.latency_s * 1000 for r in ok]
    tokens = sum(r.tokens for r in ok)
    texts = sum(r.texts for r in ok)
    return {
        "concurrency": result.concurrency,
        "requests": n,
        "ok": len(ok),
        "errors": n - len(ok),
        "error_rate": round((n - len(ok)) / n, 6) if n else 0.0,
        "duration_s": round(dur, 4),
        "req_per_s": round(len(ok) / dur, 3),
        "texts_per_s": round(texts / dur, 3),
        "tokens": tokens,
        "tokens_per_s": round(tokens / dur, 3),
        "mean_tokens_per_request": round(tokens / len(ok), 4) if ok else 0.0,
        "p50_ms": round(percentile(lat, 50), 3) if lat else None,
        "p95_ms": round(percentile(lat, 95), 3) if lat else None,
        "p99_ms": round(percentile(lat, 99), 3) if lat else None,
    }
