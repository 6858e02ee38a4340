"""Model versions in one endpoint (serving.versions): the rules of a rollout change, the validate
gate, routing by weight and by header, and -- with a real server and the `models` commands --
a canary split, a promotion and a rollback taking effect without a restart, with every billing
row and metric carrying the version that answered."""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import time
from collections import Counter
from typing import Dict, List, Optional

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.params import Validate
from pipeline.validate import gates
from serving.versions import (
    Gate,
    Rollout,
    RolloutError,
    Served,
    UnknownVersion,
    Versions,
    check_version_dir,
    gate_from_report,
    promote,
    rollback,
    start_canary,
)
from tests.serving.conftest import Server, cli, make_key, post_all


# --- the rules ----------------------------------------------------------------------------------
def test_canary_promote_and_rollback_follow_the_rules():
    r = Rollout(stable="1")
    r = start_canary(r, "2", 10)
    assert r == Rollout(stable="1", canary="2", canary_percent=10)
    assert rollback(r) == Rollout(stable="1")  # the canary withdrawn, stable untouched
    r = promote(r)
    assert r == Rollout(stable="2", previous="1")  # all unpinned traffic, the old one kept
    assert rollback(r) == Rollout(stable="1")  # back, and nothing further to go back to
    with pytest.raises(RolloutError, match="nothing to roll back"):
        rollback(rollback(r))
    with pytest.raises(RolloutError, match="no canary"):
        promote(Rollout(stable="1"))
    with pytest.raises(RolloutError, match="already the stable"):
        start_canary(Rollout(stable="1"), "1", 5)
    with pytest.raises(RolloutError, match="0 to 100"):
        start_canary(Rollout(stable="1"), "2", 101)
    assert promote(Rollout(stable="1"), "3") == Rollout(stable="3", previous="1")


def report(version_dir: str, accuracy: float) -> Dict[str, object]:
    """A report as the validate stage writes it, its gates from pipeline.validate itself."""
    v = Validate()
    behaved = {"minimum": {"pass_rate": 1.0}}
    g = gates(v, {"accuracy": accuracy, "macro_f1": accuracy}, {"accuracy": 0.84}, 1e-7, [],
              behaved)
    return {"model_dir": version_dir, "gates": g, "passed": all(x["passed"] for x in g.values())}


def test_the_gate_is_read_only_for_its_own_version():
    passed = gate_from_report(report("models/sentiment/2", 0.85), "sentiment", "2")
    assert passed is not None and passed.passed
    failed = gate_from_report(report("models/sentiment/2", 0.50), "sentiment", "2")
    assert failed == Gate(False, "validate failed: accuracy, baseline, macro_f1")
    assert gate_from_report(report("models/sentiment/3", 0.85), "sentiment", "2") is None
    assert gate_from_report(report("models/other/2", 0.85), "sentiment", "2") is None
    # `passed` false with every gate passing (an older report): not a pass.
    odd = {**report("models/sentiment/2", 0.85), "passed": False}
    assert gate_from_report(odd, "sentiment", "2") == Gate(False,
                                                          "validate failed: passed is false")


def test_a_version_directory_must_be_the_version_its_card_names(tmp_path, model_dir):
    shutil.copytree(model_dir, tmp_path / "2")
    with pytest.raises(RolloutError, match="not sentiment/2"):
        check_version_dir(tmp_path, "sentiment", "2")  # its card still says version 1
    with pytest.raises(RolloutError, match="does not exist"):
        check_version_dir(tmp_path, "sentiment", "7")
    with pytest.raises(RolloutError, match="is not a version"):
        check_version_dir(tmp_path, "sentiment", "../1")


# --- routing ------------------------------------------------------------------------------------
class FakeRunner:
    """What Versions reads of a runner: its info (name, version)."""

    def __init__(self, version: str):
        self.info = type("Info", (), {"name": "sentiment", "version": version})()
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


def served(version: str) -> Served:
    return Served(FakeRunner(version), None)  # type: ignore[arg-type]


def test_a_canary_takes_its_percent_of_unpinned_requests_and_pins_override():
    draws = iter([i / 100 for i in range(100)])  # one draw per percent: exact shares
    v = Versions(served("1"), draw=lambda: next(draws))
    v.served["2"] = served("2")
    v.rollout = Rollout(stable="1", canary="2", canary_percent=25)
    picked = Counter(v.pick().version for _ in range(100))
    assert picked == {"1": 75, "2": 25}
    assert v.pick("1").version == "1" and v.pick("2").version == "2"
    with pytest.raises(UnknownVersion) as err:
        v.pick("3")
    assert err.value.served == ["1", "2"]


def test_a_new_rollout_applies_once_its_versions_are_loaded_and_not_before():
    stored: List[Optional[Rollout]] = [None]
    loads: List[str] = []

    def load(version: str) -> Served:
        loads.append(version)
        if version == "bad":
            raise RuntimeError("saved_model.pb is corrupt")
        return served(version)

    changes: List[Rollout] = []
    v = Versions(served("1"), load, lambda: stored[0], refresh_s=0,
                 on_change=lambda vs: changes.append(vs.rollout))
    asyncio.run(v.refresh())
    assert v.rollout == Rollout(stable="1") and loads == [] and changes == []
    stored[0] = Rollout(stable="1", canary="2", canary_percent=50)
    asyncio.run(v.refresh())
    assert v.rollout == stored[0] and sorted(v.served) == ["1", "2"] and loads == ["2"]
    stored[0] = Rollout(stable="bad", previous="1")
    asyncio.run(v.refresh())  # cannot load: the process keeps the rollout it has
    assert v.rollout == Rollout(stable="1", canary="2", canary_percent=50)
    assert changes == [Rollout(stable="1", canary="2", canary_percent=50)]
    stored[0] = Rollout(stable="2", previous="1")
    asyncio.run(v.refresh())  # already loaded: applied with no load
    assert v.rollout == stored[0] and loads == ["2", "bad"]
    asyncio.run(v.close())
    assert all(s.runner.stopped for s in v.all())


# --- a real endpoint, its rollout changed by the `models` commands --------------------------------
@pytest.fixture(scope="module")
def versioned(model_dir, tmp_path_factory):
    """Versions 1, 2 and 3 of the smoke model (one set of weights; the cards name the
    versions), a SQLite ledger with a key, and an endpoint started on version 1."""
    d = tmp_path_factory.mktemp("versions")
    root = d / "models" / "sentiment"
    for version in ("1", "2", "3"):
        shutil.copytree(model_dir, root / version)
        card_file = root / version / "model_card.json"
        card = json.loads(card_file.read_text(encoding="utf-8"))
        card["version"] = int(version)
        card_file.write_text(json.dumps(card), encoding="utf-8")
    for version, accuracy in (("2", 0.85), ("3", 0.50)):
        (d / f"validate-{version}.json").write_text(json.dumps(report(
            f"models/sentiment/{version}", accuracy)), encoding="utf-8")
    ledger = str(d / "ledger.sqlite3")
    key = make_key(ledger, "u-versions")
    server = Server(root / "1", ledger, d / "server.log",
                    env={"TOKENMETER_ROLLOUT_REFRESH_S": "0.2"}).start()
    try:
        yield {"server": server, "ledger": ledger, "key": key, "root": root, "dir": d}
    finally:
        server.stop()


def models(env, *args: str, check: bool = True):
    return cli(env["ledger"], "models", "--model-dir", str(env["root"] / "1"), *args,
               check=check)


def ready(env) -> dict:
    return httpx.get(env["server"].url + "/readyz", timeout=30).json()


def until(env, **want) -> dict:
    """/readyz once it shows `want` (the rollout applied; loading a version takes seconds)."""
    deadline = time.monotonic() + 120
    while True:
        state = ready(env)
        if all(state.get(k) == v for k, v in want.items()):
            return state
        assert time.monotonic() < deadline, f"rollout not applied: {state}"
        time.sleep(0.2)


def ask(env, n: int, pinned: Optional[str] = None) -> Counter:
    """`n` requests, 16 at a time; the versions that answered them."""
    headers = {} if pinned is None else {"Tokenmeter-Model-Version": pinned}
    answers = []
    for start in range(0, n, 16):
        rs = post_all([env["server"].url], [env["key"]], min(16, n - start), {"text": "很好"},
                      headers=headers)
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
        answers += [r.json() for r in rs]
    # Each billing row carries the version that answered, as the answer says.
    with sqlite3.connect(env["ledger"]) as conn:
        for a in answers:
            (row_version,) = conn.execute("SELECT model_version FROM billing_events WHERE id = ?",
                                          (a["id"],)).fetchone()
            assert row_version == a["model_version"]
    return Counter(a["model_version"] for a in answers)


def metric(env, name: str) -> Dict[str, float]:
    text = httpx.get(env["server"].url + "/metrics", timeout=30).text
    return {s.labels["version"]: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == name}


@pytest.mark.slow
def test_canary_promote_and_rollback_without_a_restart(versioned):
    env, pid = versioned, versioned["server"].proc.pid
    assert ready(env)["model_versions"] == ["1"]
    r = httpx.post(env["server"].url + "/v1/analyze", json={"text": "很好"}, timeout=30,
                   headers={"Authorization": f"Bearer {env['key']}",
                            "Tokenmeter-Model-Version": "2"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_model_version"
    assert "versions served: 1" in r.json()["error"]["message"]

    out = models(env, "canary", "2", "--percent", "30", "--report",
                 str(env["dir"] / "validate-2.json"))
    assert "canary 2 at 30%" in out.stdout
    until(env, canary_version="2", canary_percent=30, model_versions=["1", "2"])
    # 300 unpinned requests: version 2 answers ~30% (binomial sd 7.9: 90 +- 40 is 5 sd).
    split = ask(env, 300)
    assert set(split) == {"1", "2"} and 50 <= split["2"] <= 130, split
    assert ask(env, 20, pinned="1") == {"1": 20} and ask(env, 20, pinned="2") == {"2": 20}
    with sqlite3.connect(env["ledger"]) as conn:
        billed = dict(conn.execute("SELECT model_version, COUNT(*) FROM billing_events"
                                   " GROUP BY model_version").fetchall())
    assert metric(env, "tokenmeter_billed_requests_total") == {k: float(v)
                                                                for k, v in billed.items()}
    assert metric(env, "tokenmeter_model_traffic_percent") == {"1": 70.0, "2": 30.0}

    # Version 3 failed validation: it can take no traffic, as canary or by promotion.
    failing = str(env["dir"] / "validate-3.json")
    for args in (("canary", "3", "--percent", "5"), ("promote", "3")):
        r = models(env, *args, "--report", failing, check=False)
        assert r.returncode == 2 and "did not pass the validate gate" in r.stderr, r.stderr
        assert "accuracy" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    status = json.loads(models(env, "status", "--json").stdout)
    assert (status["stable"], status["canary"], status["canary_percent"]) == ("1", "2", 30)
    assert {v["version"]: v["gate"] for v in status["versions"]} == \
        {"1": "", "2": "passed", "3": "failed"}

    # Promoted: the canary's gate verdict was recorded, so no report is needed any more.
    models(env, "promote", "--report", str(env["dir"] / "absent.json"))
    until(env, model_version="2", canary_version=None)
    assert ask(env, 40) == {"2": 40}
    models(env, "rollback")
    until(env, model_version="1", canary_version=None)
    assert ask(env, 40) == {"1": 40}
    r = models(env, "rollback", check=False)
    assert r.returncode == 2 and "nothing to roll back" in r.stderr
    assert env["server"].proc.pid == pid and env["server"].proc.poll() is None  # no restart
