"""The benchmark-only switch TOKENMETER_METERING=off: never the default, refused unless
TOKENMETER_ALLOW_UNMETERED=1 is also set, and when on it answers without a key and writes no
billing row."""

from __future__ import annotations

import sqlite3

import httpx
import pytest
from pydantic import ValidationError

from serving.metrics import parse_billing_totals
from serving.settings import Settings
from tests.serving.conftest import Server, cli


def test_metering_is_on_by_default_and_off_needs_an_explicit_allow(monkeypatch):
    for name in ("TOKENMETER_METERING", "TOKENMETER_ALLOW_UNMETERED"):
        monkeypatch.delenv(name, raising=False)
    assert Settings().metering == "on"
    with pytest.raises(ValidationError, match="ALLOW_UNMETERED"):
        Settings(metering="off")
    with pytest.raises(ValidationError, match="on or off"):
        Settings(metering="sometimes")
    monkeypatch.setenv("TOKENMETER_METERING", "off")
    with pytest.raises(ValidationError):
        Settings()
    monkeypatch.setenv("TOKENMETER_ALLOW_UNMETERED", "1")
    assert Settings().metering == "off"


def test_serve_refuses_unmetered_without_the_allow_flag(tmp_path):
    r = cli(str(tmp_path / "l.sqlite3"), "serve", env={"TOKENMETER_METERING": "off"},
            check=False)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: settings: TOKENMETER_METERING")
    assert "TOKENMETER_ALLOW_UNMETERED=1" in lines[0]


@pytest.mark.slow
def test_unmetered_server_answers_without_a_key_and_bills_nothing(model_dir, tmp_path):
    ledger = str(tmp_path / "ledger.sqlite3")
    server = Server(model_dir, ledger, tmp_path / "server.log",
                    env={"TOKENMETER_METERING": "off", "TOKENMETER_ALLOW_UNMETERED": "1"}).start()
    try:
        r = httpx.post(server.url + "/v1/analyze", json={"text": "这个手机很好用"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["total_tokens"] > 0
        metrics = httpx.get(server.url + "/metrics", timeout=10).text
    finally:
        server.stop()
    with sqlite3.connect(ledger) as conn:
        assert conn.execute("SELECT COUNT(*) FROM billing_events").fetchone()[0] == 0
    assert parse_billing_totals(metrics)["requests"] == 0
    assert "metering is off" in server.log() and not server.billing_lines()
