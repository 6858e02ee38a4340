"""The `scale` command (`python -m pipeline.benchmark.scale`): 1 and 2 replicas of the real
endpoint behind the committed haproxy.cfg, one PostgreSQL ledger. What it reports must agree
with what really happened, read from elsewhere: the ledger (queried here) billed exactly the
200s the report counts, per replica count and per replica; with 2 replicas both billed some;
each replica's share comes from its own /metrics and adds up to the client's 200s; the ratio
is that of the reported req/s; every process it started is gone; the plot and the MLflow run
hold the same figures. No timing asserts. The slow test is marked slow, postgres and haproxy
and skipped (with the reason) where PostgreSQL or haproxy is missing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.benchmark.cluster import HAPROXY_CFG, haproxy_config
from pipeline.benchmark.process import port_is_free
from pipeline.benchmark.scratch_db import sibling_dsn
from tests.serving.conftest import PG_ENV, PG_MISSING

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_MISSING = "needs haproxy (Debian's `haproxy`; scripts/system-packages.sh)"
TEXTS = ["这个手机很好用，电池也耐用", "太差了，退货", "物流很快，包装完好", "质量一般，不推荐",
         "非常满意，下次还来", "客服态度很差", "好评", "差评"]


def _command(cwd: Path, *args: str, env=None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full.pop("MLFLOW_TRACKING_URI", None)  # the local store under cwd
    return subprocess.run([sys.executable, "-m", "pipeline.benchmark.scale", *args], cwd=cwd,
                          env=full, capture_output=True, text=True, timeout=900)


# --- the config rewriting (shared with tests/serving/test_replicas.py) ------------------------
@pytest.mark.parametrize("ports", [[9101], [9101, 9102], [9101, 9102, 9103, 9104]])
def test_the_haproxy_config_gets_one_server_line_per_replica_and_nothing_else_changes(ports):
    committed = HAPROXY_CFG.read_text(encoding="utf-8").splitlines()
    out = haproxy_config(9000, ports).splitlines()
    servers = [ln.strip() for ln in out if ln.strip().startswith("server ")]
    assert servers == [f"server r{i} 127.0.0.1:{p} check" for i, p in enumerate(ports, 1)]
    assert [ln for ln in out if "bind " in ln] == ["    bind 127.0.0.1:9000"]
    # Every other line is the committed file's, in order.
    assert [ln for ln in out if not ln.strip().startswith(("server ", "bind "))] == \
        [ln for ln in committed if not ln.strip().startswith(("server ", "bind "))]


def test_three_replicas_get_the_committed_file_with_only_its_ports_changed():
    text = HAPROXY_CFG.read_text(encoding="utf-8")
    expected = re.sub(r"127\.0\.0\.1:8000", "127.0.0.1:9000", text)
    for i in (1, 2, 3):
        expected = expected.replace(f"127.0.0.1:800{i}", f"127.0.0.1:910{i}")
    assert haproxy_config(9000, [9101, 9102, 9103]) == expected


def test_a_missing_haproxy_is_one_line_naming_the_package(tmp_path):
    # PATH with only the interpreter's folder: no haproxy (nothing is started before the check).
    r = _command(tmp_path, "--replicas", "1", env={"PATH": str(Path(sys.executable).parent)})
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "haproxy" in lines[0] and "Debian" in lines[0], r.stderr
    assert not (tmp_path / "metrics").exists()


# --- the command, for real --------------------------------------------------------------------
@pytest.fixture(scope="module")
def scaled(model_dir, tmp_path_factory):
    """The command run once with 1 and 2 replicas (tiny duration), its scratch ledger kept for
    the tests to read and dropped afterwards."""
    import psycopg
    from psycopg import sql

    ws = tmp_path_factory.mktemp("scale")
    texts = ws / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS),
                     encoding="utf-8")
    admin = os.environ[PG_ENV]
    r = _command(ws, "--replicas", "1,2", "--concurrency", "4", "--duration", "2",
                 "--warmup", "10", "--model-dir", str(model_dir), "--texts", str(texts),
                 "--pg-dsn", admin, "--keep-ledger")
    report = json.loads((ws / "metrics" / "scale.json").read_text(encoding="utf-8")) \
        if (ws / "metrics" / "scale.json").exists() else None
    try:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert report is not None
        yield ws, r, report, sibling_dsn(admin, report["ledger"]["database"])
    finally:
        if report is not None and report["ledger"].get("database"):
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                             .format(sql.Identifier(report["ledger"]["database"])))


def _billed(dsn: str, user: str):
    import psycopg

    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT instance_id, COUNT(*) FROM billing_events"
                                 " WHERE user_id = %s GROUP BY 1", (user,)).fetchall())


class TestTheCommand:
    # skipif as well as the markers: tests/serving/conftest.py's hook does not see this folder
    # when it runs alone.
    pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.haproxy,
                  pytest.mark.skipif(not os.environ.get(PG_ENV), reason=PG_MISSING),
                  pytest.mark.skipif(shutil.which("haproxy") is None, reason=HAPROXY_MISSING)]

    def test_every_replica_count_is_measured_and_the_ledger_billed_exactly_its_200s(self, scaled):
        _, result, report, dsn = scaled
        assert [lv["replicas"] for lv in report["levels"]] == [1, 2]
        assert report["ledger"]["backend"] == "postgresql"
        for lv in report["levels"]:
            n = lv["replicas"]
            assert lv["ok"] > 0 and lv["ok"] + lv["errors"] == lv["requests"], lv
            for key in ("req_per_s", "p50_ms", "p99_ms", "error_rate", "duration_s"):
                assert lv[key] is not None, (n, key)
            assert lv["p50_ms"] <= lv["p99_ms"]
            billed = _billed(dsn, f"scale-r{n}")
            # The ledger, read here: one row per 200 the client counted (warm-up included), each
            # from one of this count's replicas, and with 2 replicas both billed some.
            assert sum(billed.values()) == lv["warmup"]["ok"] + lv["ok"], (n, billed, lv)
            mine = {p["instance_id"] for p in lv["per_replica"]}
            assert len(mine) == n and set(billed) == mine, (n, billed, lv["per_replica"])
            assert all(c > 0 for c in billed.values())
            # Each replica's measured share is from its own /metrics: they add up to the client's
            # 200s, and no replica billed fewer rows in the ledger than it says it served.
            assert sum(p["served"] for p in lv["per_replica"]) == lv["ok"]
            for p in lv["per_replica"]:
                assert 0 < p["served"] <= billed[p["instance_id"]], (n, p, billed)
            assert abs(sum(p["share"] for p in lv["per_replica"]) - 1) < 1e-3
        r1, r2 = report["levels"]
        assert report["ratios"]["req_per_s_2_vs_1"] == round(r2["req_per_s"] / r1["req_per_s"], 3)
        assert "req_per_s_2_vs_1" in result.stdout  # the table printed at the end

    def test_it_stops_every_process_it_started(self, scaled):
        _, _, report, _ = scaled
        for lv in report["levels"]:
            for p in lv["per_replica"]:
                with pytest.raises(ProcessLookupError):
                    os.kill(p["pid"], 0)  # signal 0: only asks whether the process exists
        ws = scaled[0]
        cfgs = sorted((ws / "build" / "scale").glob("r*/haproxy.cfg"))
        assert len(cfgs) == 2
        for cfg in cfgs:  # nobody listens on the balancer's port any more
            port = int(re.search(r"bind 127\.0\.0\.1:(\d+)", cfg.read_text()).group(1))
            assert port_is_free(port), cfg

    def test_the_plot_and_the_mlflow_run_hold_the_reported_figures(self, scaled):
        ws, _, report, _ = scaled
        assert (ws / "plots" / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{ws / 'mlruns' / 'mlflow.db'}")
        run = client.get_run(report["mlflow_run_id"])
        for lv in report["levels"]:
            n = lv["replicas"]
            assert run.data.metrics[f"r{n}.req_per_s"] == pytest.approx(lv["req_per_s"])
            assert run.data.metrics[f"r{n}.p99_ms"] == pytest.approx(lv["p99_ms"])
        assert run.data.metrics["ratio.req_per_s_2_vs_1"] == \
            pytest.approx(report["ratios"]["req_per_s_2_vs_1"])
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"scale.json", "scale.png"} <= artifacts
