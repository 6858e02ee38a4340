"""Billing under faults, SQLite ledger: a real `python -m serving serve` process on a real ledger
file, driven by concurrent HTTP clients while the fault happens, then every 200 reconciled
against the ledger's rows (tests.serving.faults).

What it proves, each with lost == 0 (no 200 without its row) and doubled == 0 (no row beyond
the 200s), and `python -m serving verify` finding no drift between the ledger and /metrics:

1. The ledger's filesystem fills up (a small tmpfs written to ENOSPC under load): requests are
   refused 503 `ledger_unavailable` at once, never answered 200 unbilled and never left
   hanging; once space is freed, billing resumes within seconds without a restart.
2. Another process holds the ledger's write lock for 6 s: each group of billing rows gives up
   after TOKENMETER_SQLITE_BUSY_TIMEOUT_MS (503 `ledger_unavailable`, so latency stays bounded
   by that setting, not by the lock), and billing resumes when the lock is released.
3. Hundreds of clients hang up mid-request during normal load: the server stays ready (its
   model-runner and ledger-writer threads alive), and what it billed is exactly what it
   answered 200, whether or not the client was still there to read it: ledger rows ==
   billing log lines == the /metrics count of 200s.

Each result is one row of the README's fault table (`record`; TOKENMETER_FAULT_REPORT).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.conftest import Server, cli, make_key
from tests.serving.faults import Load, Sent, drive, reconcile, record

pytestmark = pytest.mark.slow

CONCURRENCY = 4  # load clients: enough to form groups of rows, light enough for 2 cores
BASELINE_S = 1.5  # load before the fault, so 200s before it are in the reconciliation too
AFTER_S = 2.0  # load after recovery: it must be all 200s
RECOVERY_WITHIN_S = 5.0  # after the fault ends, a 200 must come back within this
LOCK_HOLD_S = 6.0
BUSY_TIMEOUT_MS = 1000
HANGUPS = 320  # clients that really hang up mid-request ("hundreds": at least 300)


# --- what every scenario reads back ---------------------------------------------------------
def ledger_ids(ledger: str) -> List[str]:
    """Every billing row's id (the ledger is fresh per test, so: the rows of this load)."""
    with closing(sqlite3.connect(ledger, timeout=30)) as conn:
        return [r[0] for r in conn.execute("SELECT id FROM billing_events")]


def assert_verify_no_drift(server: Server) -> Dict[str, Any]:
    """`python -m serving verify`: the ledger's totals for this process equal its /metrics."""
    r = cli(server.ledger, "verify", "--url", server.url, check=False)
    assert r.returncode == 0, f"verify failed ({r.returncode}): {r.stdout} {r.stderr[-2000:]}"
    out = json.loads(r.stdout)
    assert out["ok"] is True and set(out["drift"].values()) == {0}, out
    return out


def assert_ready(server: Server) -> Dict[str, Any]:
    """/readyz 200, with both worker threads alive (a dead one would strand every request)."""
    r = httpx.get(server.url + "/readyz", timeout=30)
    assert r.status_code == 200, f"{r.status_code} {r.text} {server.log()[-3000:]}"
    body = r.json()
    assert body["model_runner_alive"] is True and body["ledger_writer_alive"] is True, body
    return body


def analyze_statuses(server: Server) -> Dict[str, int]:
    """/v1/analyze answers the server sent, by status (its own count, from /metrics)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    out: Dict[str, int] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "tokenmeter_requests_total" and s.labels.get("route") == "/v1/analyze":
                out[s.labels["status"]] = int(s.value)
    return out


# --- a fault injected under load --------------------------------------------------------------
@dataclass
class Faulted:
    """A load around one fault: `during` (baseline, fault, until it ends), `probes` (single
    requests that looked for the refusal and the recovery), `after` (once recovered)."""

    during: Load
    probes: Load
    after: Load
    refusal: Dict[str, Any] = field(default_factory=dict)  # the 503 body a probe got
    fault_s: float = 0.0  # from injected to released
    recovery_s: float = 0.0  # from released to the first 200

    @property
    def load(self) -> Load:
        return Load(self.during.sent + self.probes.sent + self.after.sent)


async def _post(http: httpx.AsyncClient, url: str, key: str, probes: Load) -> httpx.Response:
    """One request, recorded with the load (a probe's 200 is billed like any other)."""
    t0 = time.monotonic()
    r = await http.post(url + "/v1/analyze", json={"text": "质量不错，物流也快"},
                        headers={"Authorization": f"Bearer {key}"})
    eid = r.json().get("id") if r.status_code == 200 else None
    probes.sent.append(Sent(r.status_code, eid, time.monotonic() - t0))
    return r


async def _until(http: httpx.AsyncClient, url: str, key: str, probes: Load, status: int,
                 within_s: float) -> httpx.Response:
    """Requests, one at a time, until one is answered `status`; fails after `within_s`."""
    t0 = time.monotonic()
    while True:
        r = await _post(http, url, key, probes)
        if r.status_code == status:
            return r
        assert time.monotonic() - t0 < within_s, \
            f"no {status} within {within_s} s; last answer {r.status_code} {r.text[:300]}"
        await asyncio.sleep(0.05)


async def fault_under_load(server: Server, key: str, inject: Callable[[], None],
                           release: Callable[[], None]) -> Faulted:
    """Load; after BASELINE_S, `inject()` (blocking, in a thread); a probe must then get a 503;
    `release()` (blocking: returns when the fault is over); a probe measures how long until a
    200; then AFTER_S more load. The load clients never stop while the fault lasts."""
    over = asyncio.Event()
    during_task = asyncio.ensure_future(
        drive(server.url, key, 120, CONCURRENCY, stop=over.is_set))
    probes = Load()
    async with httpx.AsyncClient(timeout=60) as http:
        await asyncio.sleep(BASELINE_S)
        assert not during_task.done(), during_task  # the load is still running
        await asyncio.to_thread(inject)
        t_fault = time.monotonic()
        refused = await _until(http, server.url, key, probes, 503, within_s=10)
        await asyncio.to_thread(release)
        t_released = time.monotonic()
        await _until(http, server.url, key, probes, 200, within_s=RECOVERY_WITHIN_S)
        recovery_s = time.monotonic() - t_released
    over.set()
    during = await during_task
    after = await drive(server.url, key, AFTER_S, CONCURRENCY)
    return Faulted(during, probes, after, refused.json(), t_released - t_fault, recovery_s)


def summary(name: str, f: Faulted) -> str:
    return (f"{name}: during {f.during.statuses()}, probes {f.probes.statuses()}, after "
            f"{f.after.statuses()}, fault {f.fault_s:.2f} s, recovery {f.recovery_s:.2f} s, "
            f"longest {f.load.longest_s:.2f} s")


def assert_fault_shape(server: Server, f: Faulted) -> None:
    """What both ledger faults must look like from the client's side."""
    tail = server.log()[-3000:]
    # Billed before the fault, refused during it: the fault really reached the writer.
    assert f.during.count(200) > 0 and f.during.count(503) > 0, (f.during.statuses(), tail)
    assert f.refusal["error"]["code"] == "ledger_unavailable", f.refusal
    # Only 200 or 503: no 500, and no request left without an answer (status 0).
    for part in (f.during, f.probes, f.after):
        assert set(part.statuses()) <= {200, 503}, (part.statuses(), tail)
    # Once a 200 came back, billing stays back: every request after recovery is a 200.
    assert f.after.count(200) > 0 and set(f.after.statuses()) == {200}, \
        (f.after.statuses(), tail)


# --- 1. filesystem full -----------------------------------------------------------------------
@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A fresh tmpfs of `size` mounted at `where`, unmounted on leaving."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                    str(where)], check=True, capture_output=True, text=True)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            # Something still holds a file there (a server that would not stop): detach it
            # so that no mount outlives the test.
            subprocess.run(["umount", "-l", str(where)], check=True, capture_output=True)


def fill(path: Path) -> int:
    """Write zeros to `path` until the filesystem has no byte left (ENOSPC at 1 MiB, then at
    4 KiB, then at 1 byte); the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            chunk = b"\0" * size
            while True:
                try:
                    written += os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts a small tmpfs to fill up")
def test_sqlite_filesystem_full_refuses_then_recovers(model_dir, tmp_path):
    fault = "SQLite: filesystem full, then space freed"
    with tmpfs(tmp_path / "small", "12m") as small:
        ledger = str(small / "ledger.sqlite3")
        filler = small / "filler"
        key = make_key(ledger, "u-full")
        # The log stays off the small filesystem: it must keep recording while that is full.
        server = Server(model_dir, ledger, tmp_path / "server.log").start()
        try:
            filled: List[int] = []

            def inject() -> None:
                filled.append(fill(filler))
                st = os.statvfs(small)
                assert st.f_bavail == 0, f"{st.f_bavail} blocks still free after the filler"

            def release() -> None:
                time.sleep(2.0)  # full for a while under load, not just for one group
                filler.unlink()

            f = asyncio.run(fault_under_load(server, key, inject, release))
            print(summary(fault, f), f"filler {filled[0] / 2**20:.1f} MiB")
            assert_fault_shape(server, f)
            # A full disk fails a write at once (no lock to wait for): no answer may wait
            # anywhere near a busy timeout (5 s by default). Answers here take well under 0.1 s.
            assert f.load.longest_s < 2.0, summary(fault, f)
            assert_ready(server)
            assert_verify_no_drift(server)
            rows = ledger_ids(ledger)
        finally:
            server.stop()
        with closing(sqlite3.connect(ledger)) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    result = reconcile(fault, f.load, rows)
    print(result)
    assert result.lost == 0 and result.doubled == 0, result
    record(result)


# --- 2. write lock held by another process ----------------------------------------------------
# Holds the write lock as any other program on the same file could (the keys CLI, a backup,
# an operator's sqlite3 shell). In WAL mode readers never block and BEGIN EXCLUSIVE locks no
# more than BEGIN IMMEDIATE: both take the one write lock, which is what the writer needs.
LOCKER = textwrap.dedent("""
    import sqlite3, sys, time
    conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
    conn.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    conn.execute("ROLLBACK")
    print("released", flush=True)
""")


def test_sqlite_write_lock_held_elsewhere_refuses_then_recovers(model_dir, tmp_path):
    fault = f"SQLite: write lock held by another process ({LOCK_HOLD_S:g} s)"
    ledger = str(tmp_path / "ledger.sqlite3")
    key = make_key(ledger, "u-lock")
    server = Server(model_dir, ledger, tmp_path / "server.log",
                    env={"TOKENMETER_SQLITE_BUSY_TIMEOUT_MS": str(BUSY_TIMEOUT_MS)}).start()
    locker: Optional[subprocess.Popen] = None
    try:
        def inject() -> None:
            nonlocal locker
            locker = subprocess.Popen([sys.executable, "-c", LOCKER, ledger, str(LOCK_HOLD_S)],
                                      stdout=subprocess.PIPE, text=True)
            assert locker.stdout is not None
            assert locker.stdout.readline().strip() == "locked"

        def release() -> None:
            assert locker is not None and locker.stdout is not None
            assert locker.stdout.readline().strip() == "released"
            assert locker.wait(timeout=30) == 0

        f = asyncio.run(fault_under_load(server, key, inject, release))
        print(summary(fault, f))
        assert_fault_shape(server, f)
        assert f.fault_s >= LOCK_HOLD_S - 0.5, summary(fault, f)  # the lock really held
        # A request waits at most for the group being written when it arrives, which gives
        # up after the busy timeout, and then its own group, which does too: 2 x the busy
        # timeout, plus a second for the model, the event loop and 2 shared cores. Without
        # the timeout it would wait out the whole lock (6 s).
        bound = 2 * BUSY_TIMEOUT_MS / 1000 + 1.0
        assert f.load.longest_s < bound, summary(fault, f)
        assert_ready(server)
        assert_verify_no_drift(server)
        rows = ledger_ids(ledger)
    finally:
        if locker is not None and locker.poll() is None:
            locker.kill()
            locker.wait()
        server.stop()
    result = reconcile(fault, f.load, rows)
    print(result)
    assert result.lost == 0 and result.doubled == 0, result
    record(result)


# --- 3. clients hanging up mid-request --------------------------------------------------------
# 32 texts: the largest request (TOKENMETER_MAX_TEXTS), which keeps the model busy for a few
# ms, so that a client giving up after 1-40 ms often leaves while it runs.
LONG_BODY = json.dumps({"texts": ["这家店的服务很好，东西也不错，下次还来"] * 32},
                       ensure_ascii=False).encode()
HANGUP_MODES = ("read timeout", "closed after sending", "reset after sending",
                "closed mid-body")


def _raw_request(host: str, port: int, key: str, body: bytes) -> bytes:
    return (f"POST /v1/analyze HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def hang_up(server: Server, key: str, mode: str, rng: random.Random) -> Sent:
    """One request whose client leaves before the answer (HANGUP_MODES): httpx giving up after
    1-40 ms with the request sent in full; a socket closed (FIN) or reset (RST) right after
    sending it; a socket closed halfway through the body. Status 0 when the client left; an
    httpx client answered within its few ms records that answer."""
    t0 = time.monotonic()
    if mode == "read timeout":
        timeout = httpx.Timeout(10.0, read=rng.uniform(0.001, 0.040))  # sent, then gives up
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(timeout=timeout) as http:
            try:
                r = await http.post(server.url + "/v1/analyze", content=LONG_BODY,
                                    headers=headers)
            except httpx.TimeoutException:
                return Sent(0, None, time.monotonic() - t0, mode)
        eid = r.json().get("id") if r.status_code == 200 else None
        return Sent(r.status_code, eid, time.monotonic() - t0)
    host = "127.0.0.1"
    request = _raw_request(host, server.port, key, LONG_BODY)
    _, writer = await asyncio.open_connection(host, server.port)
    if mode == "closed mid-body":
        writer.write(request[:len(request) - len(LONG_BODY) // 2])
        await writer.drain()
        await asyncio.sleep(rng.uniform(0.001, 0.020))  # the server is reading the body
    else:
        writer.write(request)
        await writer.drain()
    if mode == "reset after sending":
        writer.transport.abort()  # RST: the socket is dropped, unread data and all
    else:
        writer.close()
        await writer.wait_closed()
    return Sent(0, None, time.monotonic() - t0, mode)


async def load_with_hangups(server: Server, key: str) -> Load:
    """Normal load (drive) while 8 clients keep hanging up, the modes in turn, until HANGUPS
    of them really left (a request answered within its timeout does not count)."""
    rng = random.Random(7)
    hung = Load()
    attempts = iter(range(4 * HANGUPS))  # a bound, should the answers keep beating timeouts

    def left() -> int:
        return sum(1 for s in hung.sent if s.status == 0)

    async def quitter() -> None:
        for i in attempts:
            if left() >= HANGUPS:
                return
            hung.sent.append(await hang_up(server, key, HANGUP_MODES[i % 4], rng))
            await asyncio.sleep(rng.uniform(0, 0.01))

    steady, _ = await asyncio.gather(
        drive(server.url, key, 120, CONCURRENCY, stop=lambda: left() >= HANGUPS),
        asyncio.gather(*(quitter() for _ in range(8))))
    return Load(steady.sent + hung.sent)


def settled_statuses(server: Server, quiet_s: float = 1.0, within_s: float = 20.0
                     ) -> Dict[str, int]:
    """The /metrics count once it stops moving: requests whose clients left are still being
    answered (to no one) for a moment after the load ends."""
    deadline = time.monotonic() + within_s
    last = analyze_statuses(server)
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = analyze_statuses(server)
        if now == last:
            return now
        last = now
    raise AssertionError(f"/metrics still moving after {within_s} s: {last}")


def test_client_disconnects_during_load_bill_exactly_what_was_answered(model_dir, tmp_path):
    ledger = str(tmp_path / "ledger.sqlite3")
    key = make_key(ledger, "u-hangup")
    server = Server(model_dir, ledger, tmp_path / "server.log").start()
    try:
        load = asyncio.run(load_with_hangups(server, key))
        modes = {m: sum(1 for s in load.sent if s.error == m) for m in HANGUP_MODES}
        hung_up = sum(modes.values())
        statuses = settled_statuses(server)
        print(f"client disconnects: {modes}; client side {load.statuses()}, "
              f"server side {statuses}")
        assert hung_up >= HANGUPS and min(modes.values()) > 0, modes  # they really left
        assert_ready(server)

        async def one() -> httpx.Response:
            async with httpx.AsyncClient(timeout=60) as http:
                return await _post(http, server.url, key, load)

        last = asyncio.run(one())
        assert last.status_code == 200, last.text  # and it still answers
        after = analyze_statuses(server)
        billed = [line["id"] for line in server.billing_lines()]
        rows = ledger_ids(ledger)
        assert_verify_no_drift(server)
        log = server.log()
    finally:
        server.stop()
    # Billed == answered: one row per 200 the server sent, listened to or not, each logged.
    answered = after.get("200", 0)
    assert len(rows) == len(set(rows)) == answered == len(billed) == len(set(billed)), \
        (len(rows), answered, len(billed))
    assert set(rows) == set(billed)
    assert set(load.ok_ids) <= set(billed)  # every 200 a client did read among them
    fault = f"Client disconnects ({hung_up} mid-request) during load"
    result = reconcile(fault, load, rows, answered_ids=billed)
    print(result)
    assert result.lost == 0 and result.doubled == 0, result
    # A client leaving is not a server error: no 5xx counted, no error logged for it.
    errors = [json.loads(line) for line in log.splitlines()
              if line.startswith("{") and '"level": "error"' in line]
    first = errors[0] if errors else {}
    assert not [s for s in after if s.startswith("5")] and not errors, (
        f"/v1/analyze answers {after}; {len(errors)} error lines in the log, the first: "
        f"{first.get('message')!r} {str(first.get('exception', '')).splitlines()[-1:]}")
    record(result)
