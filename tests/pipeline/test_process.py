"""The one process helper (pipeline.benchmark.process) and the scratch PostgreSQL database
(pipeline.benchmark.scratch_db), which the benchmark and the endpoint and container tests share:
readiness, failures with the log, the whole process group stopped; the database dropped."""

from __future__ import annotations

import os
import sys
import time

import pytest

from pipeline.benchmark.process import (
    Process,
    ProcessError,
    ServerProcess,
    free_port,
    port_is_free,
)
from pipeline.benchmark.scratch_db import scratch_database, sibling_dsn
from pipeline.errors import PipelineError
from tests.serving.conftest import PG_ENV, PG_MISSING


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_process_that_exits_before_it_is_ready_says_so_with_its_log(tmp_path):
    p = Process(["sh", "-c", "echo starting; echo no model here >&2; exit 3"],
                tmp_path / "p.log", what="toy")
    with pytest.raises(ProcessError, match="toy exited with 3 before it was ready") as err:
        p.launch().wait_until(lambda: False, timeout_s=30)
    assert err.value.last_line() == "no model here"
    assert "starting" in err.value.tail()


def test_not_ready_in_time_stops_the_process(tmp_path):
    p = Process(["sleep", "300"], tmp_path / "p.log", what="sleeper").launch()
    with pytest.raises(ProcessError, match="sleeper not ready after 1s"):
        p.wait_until(lambda: False, timeout_s=1)
    assert p.proc is not None and p.proc.poll() is not None


def test_stop_ends_the_whole_group_children_included(tmp_path):
    child = tmp_path / "child.pid"
    with Process(["sh", "-c", f"sleep 300 & echo $! > {child}; wait"], tmp_path / "p.log") as p:
        p.launch().wait_until(lambda: child.is_file() and child.read_text().strip() != "", 30)
        pid = int(child.read_text())
        assert not _gone(pid)
    assert p.proc is not None and p.proc.poll() is not None
    for _ in range(50):  # the child is reaped by init; give it a moment
        if _gone(pid):
            break
        time.sleep(0.1)
    assert _gone(pid)


def test_a_server_is_ready_when_its_path_answers_200_and_its_port_is_freed(tmp_path):
    port = free_port()
    server = ServerProcess("files", [sys.executable, "-m", "http.server", str(port), "--bind",
                                     "127.0.0.1", "--directory", str(tmp_path)], {}, tmp_path,
                           tmp_path / "files.log", port, "/", ready_timeout_s=60)
    with server:
        assert not port_is_free(port)
    assert server.proc is not None and server.proc.poll() is not None
    assert port_is_free(port)


def test_a_benchmarked_server_that_cannot_start_is_one_pipeline_error_line(tmp_path):
    server = ServerProcess("broken", ["sh", "-c", "echo bad flag >&2; exit 2"], {}, tmp_path,
                           tmp_path / "broken.log", free_port(), "/", ready_timeout_s=30)
    with pytest.raises(PipelineError) as err:
        server.start()
    message = str(err.value)
    assert message.startswith("broken server exited with 2 before it was ready: bad flag")
    assert "\n" not in message and str(tmp_path / "broken.log") in message


def test_the_scratch_dsn_names_the_new_database_on_the_same_server():
    assert sibling_dsn("postgresql://u@127.0.0.1:5432/admin", "tm_x") == \
        "postgresql://u@127.0.0.1:5432/tm_x"
    assert sibling_dsn("postgresql://u@h/admin?sslmode=disable", "tm_x") == \
        "postgresql://u@h/tm_x?sslmode=disable"
    assert sibling_dsn("postgresql://u@h:5432", "tm_x") == "postgresql://u@h:5432/tm_x"


@pytest.mark.postgres
@pytest.mark.skipif(not os.environ.get(PG_ENV), reason=PG_MISSING)  # for runs of this file alone
def test_the_scratch_database_exists_inside_and_is_dropped_even_on_error():
    import psycopg

    admin = os.environ[PG_ENV]

    def exists(name: str) -> bool:
        with psycopg.connect(admin, autocommit=True) as conn:
            return conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                                (name,)).fetchone() is not None

    with pytest.raises(RuntimeError, match="inside"):
        with scratch_database(admin, "tm_test_") as dsn:
            name = dsn.rsplit("/", 1)[1]
            assert name.startswith("tm_test_") and exists(name)
            held = psycopg.connect(dsn)  # an open connection does not stop the drop (FORCE)
            raise RuntimeError("failed inside")
    held.close()
    assert not exists(name)
