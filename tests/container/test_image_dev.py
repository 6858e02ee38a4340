"""The built image in `dev` mode, tested from the host as a user meets it: SSH with a generated
key, Jupyter behind its token, who runs what, tini as PID 1, the HEALTHCHECK.

Builds the debian-based CPU image from nothing once per session (see `image_ref`).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List

import pytest

from pipeline.benchmark.process import free_port
from tests.container.live import image_labels

pytestmark = [pytest.mark.container, pytest.mark.slow]

TOKEN = "tm-test-token-0123456789abcdef"


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, timeout=30)
    return path


@pytest.fixture(scope="module")
def dev(containers, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys")
    user_key, other_key = keygen(keys / "id_user"), keygen(keys / "id_other")
    ssh_port, jupyter_port = free_port(), free_port()
    box = containers.start(
        "-p", f"127.0.0.1:{ssh_port}:2222", "-p", f"127.0.0.1:{jupyter_port}:8888",
        "-e", f"JUPYTER_TOKEN={TOKEN}",
        "-e", f"SSH_AUTHORIZED_KEYS={user_key.with_suffix('.pub').read_text()}",
        "-v", f"{containers.volume('ssh-host-keys')}:/var/lib/tokenmeter/ssh",
        containers.image, "dev", name="dev")
    box.wait_http(f"http://127.0.0.1:{jupyter_port}/api", deadline_s=120)
    box.ssh_port, box.jupyter_port = ssh_port, jupyter_port
    box.user_key, box.other_key = user_key, other_key
    box.known_hosts = keys / "known_hosts"
    yield box


def ssh(box, user: str, key: Path, *options: str, command: str = "id -u"):
    argv: List[str] = [
        "ssh", "-F", "/dev/null", "-p", str(box.ssh_port), "-i", str(key),
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20",
        "-o", "StrictHostKeyChecking=accept-new",
        "-o", f"UserKnownHostsFile={box.known_hosts}", *options, f"{user}@127.0.0.1", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def http_status(url: str, token: str = "") -> int:
    headers = {"Authorization": f"token {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers),  # noqa: S310
                                    timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_build_check_ran_tf_2_9_in_the_image(containers):
    out = containers.once(containers.image, "python3", "/etc/tokenmeter/check_image.py")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "debian-cpu base, tensorflow 2.9.3 (CPU build)" in out.stdout
    labels = image_labels(containers.engine, containers.image)
    assert labels["org.opencontainers.image.base.name"] == "localhost/tokenmeter-base:debian-cpu"


def test_ssh_as_tokenmeter_with_the_authorised_key(dev):
    result = ssh(dev, "tokenmeter", dev.user_key, command="id -u; id -un; pwd")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1000", "tokenmeter", "/home/tokenmeter"]


def test_ssh_refuses_an_unknown_key_root_and_passwords(dev):
    unknown = ssh(dev, "tokenmeter", dev.other_key)
    assert unknown.returncode == 255 and "Permission denied" in unknown.stderr
    root = ssh(dev, "root", dev.user_key)
    assert root.returncode == 255 and "Permission denied" in root.stderr
    # Offered nothing but a password, the server has no method left to try.
    password = ssh(dev, "tokenmeter", dev.user_key, "-o", "PubkeyAuthentication=no",
                   "-o", "PreferredAuthentications=password,keyboard-interactive")
    assert password.returncode == 255
    assert "Permission denied (publickey)" in password.stderr, password.stderr


def test_jupyter_answers_403_without_the_token_and_200_with_it(dev):
    url = f"http://127.0.0.1:{dev.jupyter_port}/api/contents"
    assert http_status(url) == 403
    assert http_status(url, "wrong-token-0123456789") == 403
    assert http_status(url, TOKEN) == 200


def test_every_process_runs_as_uid_1000_under_tini(dev):
    script = ("import os, json\n"
              "procs = {}\n"
              "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
              "    try:\n"
              "        status = open('/proc/%s/status' % pid).read().splitlines()\n"
              "    except OSError:\n"
              "        continue\n"
              "    fields = dict(line.split(':', 1) for line in status if ':' in line)\n"
              "    procs[pid] = [fields['Name'].strip(), fields['Uid'].split()]\n"
              "print(json.dumps(procs))\n")
    out = dev.exec("python3", "-c", script)
    assert out.returncode == 0, out.stderr
    procs = json.loads(out.stdout)
    assert procs["1"][0] == "tini"
    names = {name for name, _ in procs.values()}
    assert {"sshd", "jupyter-lab"} <= names, procs
    # Real, effective, saved and filesystem uid of every process: never root.
    assert {uid for _, uids in procs.values() for uid in uids} == {"1000"}, procs


def test_the_healthcheck_turns_healthy(dev, engine):
    deadline = time.monotonic() + 120
    status = ""
    while time.monotonic() < deadline:
        if engine.name == "podman":
            # podman schedules HEALTHCHECK through systemd timers, absent in a CI sandbox: run
            # the image's own check as the timer would, which records the status.
            subprocess.run(engine.cmd("healthcheck", "run", dev.name), capture_output=True,
                           timeout=60)
        status = dev.inspect("{{.State.Health.Status}}")
        if status == "healthy":
            break
        time.sleep(2)
    assert status == "healthy", dev.logs()[-2000:]


def test_an_empty_jupyter_token_stops_the_container_with_a_clear_message(containers):
    out = containers.once("-e", "JUPYTER_TOKEN=", "-e", "TOKENMETER_SSH=0",
                          containers.image, "dev", timeout=120)
    assert out.returncode == 2
    assert "JUPYTER_TOKEN is empty or shorter than 16 characters" in out.stderr


def test_sigterm_stops_dev_cleanly(dev):
    # Last in this module: it stops the shared container.
    assert dev.stop(timeout_s=20) == 0, dev.logs()[-2000:]
