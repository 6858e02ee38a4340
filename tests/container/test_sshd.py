"""A real OpenSSH server started with docker/sshd_config, driven by the real `ssh` client.

The test runs sshd from a derived copy of the config that changes only what must differ
outside a container: `Port` (a free port), `ListenAddress` (127.0.0.1) and the state folder
/var/lib/tokenmeter/ssh (host key, pid file) -> a temporary folder. Users come from
nss_wrapper (Debian `libnss-wrapper`), so `tokenmeter` and root get temporary home folders
and the machine's real accounts and ~/.ssh are never touched. Every test runs against two
servers: sshd as root (so the root-login refusal is the config's doing, not a side effect of
an unprivileged daemon) and sshd as the login user itself, as the image runs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List

import pytest

from pipeline.benchmark.process import free_port, start_group, stop_group
from tests.container.conftest import DOCKER, need_binary, port_open, wait_until

CONFIG = DOCKER / "sshd_config"
STATE_DIR = "/var/lib/tokenmeter/ssh"
NSS_WRAPPER = "/usr/lib/x86_64-linux-gnu/libnss_wrapper.so"
USER_UID = 54321
PRIVSEP_DIR = Path("/run/sshd")

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: sshd must run as root "
                                                           "to switch to the login user"),
              pytest.mark.skipif(not Path(NSS_WRAPPER).is_file(),
                                 reason=f"{NSS_WRAPPER} missing (Debian package "
                                        "`libnss-wrapper`)"),
              pytest.mark.binary("sshd", "openssh-server", "/usr/sbin/sshd"),
              pytest.mark.binary("ssh", "openssh-client"),
              pytest.mark.binary("ssh-keygen", "openssh-client")]


def derived_config(port: int, state: Path) -> str:
    """docker/sshd_config with only the port, bind address and state folder replaced."""
    text = CONFIG.read_text()
    for old, new in (("Port 2222", f"Port {port}"),
                     ("ListenAddress 0.0.0.0", "ListenAddress 127.0.0.1"),
                     (STATE_DIR, str(state))):
        assert old in text, f"{old!r} is no longer in {CONFIG}; update this test"
        text = text.replace(old, new)
    return text


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                   check=True, timeout=30)
    return path


def authorize(home: Path, pub: Path, uid: int) -> None:
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700)
    (ssh / "authorized_keys").write_text(pub.read_text())
    (ssh / "authorized_keys").chmod(0o600)
    for p in (home, ssh, ssh / "authorized_keys"):
        os.chown(p, uid, uid)


class Server:
    def __init__(self, port: int, base: Path, env: Dict[str, str], config: Path):
        self.port, self.base, self.env, self.config = port, base, env, config
        self.known_hosts = base / "known_hosts"
        self.user_key = base / "client" / "id_user"
        self.other_key = base / "client" / "id_other"

    def ssh(self, user: str, key: Path, *extra: str, command: str = "id -u",
            env: Dict[str, str] = None) -> subprocess.CompletedProcess:
        argv: List[str] = [
            "ssh", "-F", "/dev/null", "-p", str(self.port), "-i", str(key),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
            "-o", "ConnectTimeout=20", *extra, f"{user}@127.0.0.1", command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL, env=env)


@pytest.fixture(scope="module", params=["sshd-as-root", "sshd-as-user"])
def sshd_server(request):
    sshd = need_binary("sshd", "openssh-server", "/usr/sbin/sshd")
    need_binary("ssh", "openssh-client")
    need_binary("ssh-keygen", "openssh-client")
    # Homes must be reachable by the login user: not under pytest's 0700 temp folder.
    base = Path(tempfile.mkdtemp(prefix="tm-sshd-"))
    base.chmod(0o755)
    made_privsep = False
    proc = None
    try:
        state, client = base / "state", base / "client"
        state.mkdir(mode=0o700)
        client.mkdir(mode=0o700)
        home_user, home_root = base / "home-tokenmeter", base / "home-root"
        home_user.mkdir(mode=0o755)
        home_root.mkdir(mode=0o700)
        # As the entrypoint does at first start: a fresh ed25519 host key in the state folder.
        host_key = keygen(state / "ssh_host_ed25519_key")
        user_key = keygen(client / "id_user")
        keygen(client / "id_other")
        authorize(home_user, user_key.with_suffix(".pub"), USER_UID)
        # root gets the same key: only the config can stop that login.
        authorize(home_root, user_key.with_suffix(".pub"), 0)
        port = free_port()
        (base / "known_hosts").write_text(
            f"[127.0.0.1]:{port} {host_key.with_suffix('.pub').read_text()}")
        config = base / "sshd_config"
        config.write_text(derived_config(port, state))
        try:
            privsep_uid = int(subprocess.run(["id", "-u", "sshd"], capture_output=True,
                                             text=True).stdout.strip())
        except ValueError:
            privsep_uid = 65534
        # '*' as password field, as the image sets (`usermod --password '*'`).
        (base / "passwd").write_text(
            f"root:*:0:0:root:{home_root}:/bin/sh\n"
            f"tokenmeter:*:{USER_UID}:{USER_UID}:tokenmeter:{home_user}:/bin/sh\n"
            f"sshd:*:{privsep_uid}:65534::/run/sshd:/usr/sbin/nologin\n")
        (base / "group").write_text(f"root:x:0:\ntokenmeter:x:{USER_UID}:\nnogroup:x:65534:\n")
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LD_PRELOAD": NSS_WRAPPER,
               "NSS_WRAPPER_PASSWD": str(base / "passwd"),
               "NSS_WRAPPER_GROUP": str(base / "group")}
        if not PRIVSEP_DIR.is_dir():
            # What Debian's service unit creates before starting sshd.
            PRIVSEP_DIR.mkdir(mode=0o755)
            made_privsep = True
        check = subprocess.run([sshd, "-t", "-f", str(config)], env=env, capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        as_user = {}
        if request.param == "sshd-as-user":
            # As in the image: the daemon runs as the one user it lets in, and owns its state.
            for p in (state, host_key, host_key.with_suffix(".pub")):
                os.chown(p, USER_UID, USER_UID)
            as_user = {"user": USER_UID, "group": USER_UID, "extra_groups": []}
        proc = start_group([sshd, "-D", "-e", "-f", str(config)], base / "sshd.log", env,
                           stdin=subprocess.DEVNULL, **as_user)
        proc.log_path = base / "sshd.log"
        wait_until(lambda: port_open(port), proc, "sshd", deadline_s=30)
        server = Server(port, base, env, config)
        yield server
    finally:
        if proc is not None:
            stop_group(proc, grace_s=10)
        if made_privsep:
            shutil.rmtree(PRIVSEP_DIR, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def passwd_ids(server: Server, user: str) -> List[str]:
    """uid and gid of `user` in the user database sshd was given (nss_wrapper's passwd)."""
    for line in Path(server.env["NSS_WRAPPER_PASSWD"]).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return fields[2:4]
    raise AssertionError(f"{user} is not in {server.env['NSS_WRAPPER_PASSWD']}")


def test_authorized_key_logs_in_as_the_user(sshd_server):
    # The uid and gid the session runs with are the server's doing: it looked `tokenmeter` up
    # in its user database and switched to that account (as root), or refused to let anyone
    # else in (as the user itself); either way never root's.
    result = sshd_server.ssh("tokenmeter", sshd_server.user_key, command="id -u; id -g")
    assert result.returncode == 0, result.stderr
    session = result.stdout.split()
    assert session == passwd_ids(sshd_server, "tokenmeter")
    assert session[0] != passwd_ids(sshd_server, "root")[0] and session[0] != "0"


def test_unknown_key_is_refused(sshd_server):
    result = sshd_server.ssh("tokenmeter", sshd_server.other_key)
    assert result.returncode == 255
    assert "Permission denied" in result.stderr


def test_root_login_is_refused_even_with_an_authorized_key(sshd_server):
    result = sshd_server.ssh("root", sshd_server.user_key)
    assert result.returncode == 255
    assert "Permission denied" in result.stderr
    assert result.stdout == ""


def test_password_login_is_never_offered(sshd_server, tmp_path):
    # A client that would type a password if asked: SSH_ASKPASS records that it was called.
    marker = tmp_path / "asked"
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\ntouch {marker}\necho not-the-password\n")
    askpass.chmod(0o755)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SSH_ASKPASS": str(askpass),
           "SSH_ASKPASS_REQUIRE": "force", "DISPLAY": ":0"}
    result = sshd_server.ssh("tokenmeter", sshd_server.other_key,
                             "-o", "BatchMode=no", "-o", "PubkeyAuthentication=no",
                             "-o", "PreferredAuthentications=password,keyboard-interactive",
                             "-o", "NumberOfPasswordPrompts=1", env=env)
    assert result.returncode == 255
    # The server lists what it accepts: public keys only.
    assert "Permission denied (publickey)." in result.stderr, result.stderr
    assert not marker.exists(), "the client was asked for a password"


@pytest.mark.parametrize("user", ["root", "tokenmeter"])
def test_effective_settings_are_key_only(sshd_server, user):
    # sshd -T prints the settings sshd would apply to this connection, from the same file.
    result = subprocess.run(["/usr/sbin/sshd", "-T", "-f", str(sshd_server.config),
                             "-C", f"user={user},host=localhost,addr=127.0.0.1"],
                            env=sshd_server.env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    settings = set(result.stdout.splitlines())
    for line in ("permitrootlogin no", "passwordauthentication no",
                 "kbdinteractiveauthentication no", "pubkeyauthentication yes",
                 "authenticationmethods publickey", "permitemptypasswords no",
                 "hostbasedauthentication no", "usepam no", "allowusers tokenmeter",
                 "x11forwarding no", "permituserenvironment no"):
        assert line in settings, f"{line!r} not in sshd -T output"
