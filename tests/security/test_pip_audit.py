"""pip-audit: a lock whose dependencies were all skipped is "not run", never clean; partial
skips are named; a vulnerability (no severity from pip-audit) ranks by the policy; the image
locks (one per base) make one check that is only "ran" when every lock was audited.

The real pip-audit runs against a stand-in for PyPI's vulnerability API (`FakePyPI`: an HTTPS
proxy on loopback that answers for pypi.org with a test certificate authority), so what it is
told, and so what it must report, is the same on every machine, online or not."""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import threading
from pathlib import Path
from typing import Dict, Optional, Set

import pytest

from security import policy, scan_pip_audit
from security.findings import ERROR, NOT_RUN, PARTIAL, RAN, UNKNOWN, combine, error
from tests.security.scan_trees import make_policy, need, write_tree

# The JSON pip-audit writes on machines where its service cannot be reached: exit 0,
# "No known vulnerabilities found" on the terminal, and every dependency skipped.
ALL_SKIPPED = {"dependencies": [
    {"name": "pyyaml", "skip_reason":
        "Dependency not found on PyPI and could not be audited: pyyaml (6.0.1)"},
    {"name": "requests", "skip_reason":
        "Dependency not found on PyPI and could not be audited: requests (2.19.0)"}],
    "fixes": []}

SOME_AUDITED = {"dependencies": [
    {"name": "requests", "version": "2.19.0", "vulns": [
        {"id": "PYSEC-2018-28", "fix_versions": ["2.20.0"], "aliases": ["CVE-2018-18074"],
         "description": "The Requests package sends an HTTP Authorization header to an "
                        "http URI upon receiving a same-hostname https-to-http redirect."}]},
    {"name": "pyyaml", "skip_reason":
        "Dependency not found on PyPI and could not be audited: pyyaml (6.0.1)"}],
    "fixes": []}

# --- a stand-in for https://pypi.org/pypi/<name>/<version>/json ------------------------------
def _test_ca_and_server_cert(folder: Path):
    """A throw-away CA (its certificate is what the client trusts) and a pypi.org certificate
    it signed; returns (ca.pem, server cert, server key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tokenmeter test CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                       False), critical=True)
          .add_extension(ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pypi.org")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("pypi.org")]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(leaf.public_bytes(pem))
    (folder / "server.key").write_bytes(key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return folder / "ca.pem", folder / "server.pem", folder / "server.key"


class FakePyPI:
    """An HTTPS proxy on 127.0.0.1 that answers every CONNECT to pypi.org:443 itself: JSON for
    the (name, version) pairs in `answers` (a dict: 200 with it; None: 404, which is what PyPI
    says of a release it does not know). Records the paths asked for."""

    def __init__(self, folder: Path, answers: Dict[str, Optional[dict]]):
        self.answers = answers
        self.seen: Set[str] = set()
        self.ca, cert, key = _test_ca_and_server_cert(folder)
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def env(self, monkeypatch, cache: Path) -> None:
        for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "CURL_CA_BUNDLE"):
            monkeypatch.delenv(name, raising=False)
        for name in ("HTTPS_PROXY", "https_proxy"):
            monkeypatch.setenv(name, f"http://127.0.0.1:{self.port}")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(self.ca))
        # A fresh HTTP cache, so no answer of an earlier (real) run is reused.
        monkeypatch.setenv("PIP_CACHE_DIR", str(cache))
        monkeypatch.setenv("XDG_CACHE_HOME", str(cache))

    def __enter__(self) -> "FakePyPI":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            if not head.startswith(b"CONNECT pypi.org:443 "):
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            conn.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            with self.tls.wrap_socket(conn, server_side=True) as tls:
                request = b""
                while b"\r\n\r\n" not in request:
                    chunk = tls.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                path = request.split(b" ", 2)[1].decode()
                self.seen.add(path)
                found = self.answers.get(path)
                status = "200 OK" if found is not None else "404 Not Found"
                body = json.dumps(found if found is not None else {"message": "Not Found"})
                tls.sendall(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                            f"{body}".encode())


def release(name: str, version: str, *vulns: dict) -> Dict[str, dict]:
    """PyPI's JSON for one release; no `vulnerabilities` key means none known."""
    doc: dict = {"info": {"name": name, "version": version}, "urls": []}
    if vulns:
        doc["vulnerabilities"] = list(vulns)
    return {f"/pypi/{name}/{version}/json": doc}


FAKE_VULN = {"id": "PYSEC-0000-1", "aliases": ["CVE-0000-0001"], "fixed_in": ["6.0.2"],
             "summary": "A made-up hole, for the test", "details": "made up", "withdrawn": None,
             "published": "2024-01-02T03:04:05Z"}


@pytest.fixture
def fake_pypi(tmp_path, monkeypatch):
    """Start a FakePyPI with `answers` and point pip-audit (run by our code, which inherits
    this environment) at it."""
    servers = []

    def start(answers: Dict[str, Optional[dict]]) -> FakePyPI:
        folder = tmp_path / f"fake-pypi-{len(servers)}"
        folder.mkdir()
        fake = FakePyPI(folder, answers).__enter__()
        fake.env(monkeypatch, folder / "cache")
        servers.append(fake)
        return fake

    yield start
    for fake in servers:
        fake.__exit__(None, None, None)


def test_all_skipped_is_not_run():
    result = scan_pip_audit.interpret(ALL_SKIPPED, "pip-audit-host", "requirements.lock")

    assert result.status == NOT_RUN
    assert "skipped all 2 dependencies" in result.reason
    assert "nothing was audited" in result.reason


def test_partial_audit_names_skips_and_vulnerability_fails():
    result = scan_pip_audit.interpret(SOME_AUDITED, "pip-audit-host", "requirements.lock")

    assert result.status == PARTIAL
    assert result.checked == "requirements.lock: 1 of 2 dependencies audited"
    assert "pyyaml" in result.reason
    [vuln] = result.findings
    assert (vuln.rule_id, vuln.severity, vuln.path) == ("PYSEC-2018-28", UNKNOWN,
                                                        "requests 2.19.0")
    assert vuln.fix == "upgrade requests to 2.20.0"
    verdict = policy.evaluate([result], make_policy())  # UNKNOWN ranks as HIGH by default
    assert verdict.exit_code == 1
    assert "only partly checked: pip-audit-host" in verdict.summary()


@pytest.mark.scanners("pip-audit")
def test_real_pip_audit_never_reports_an_unaudited_lock_as_clean(tmp_path, fake_pypi):
    need("pip-audit")
    targets = write_tree(tmp_path, {"requirements.lock": "pyyaml==6.0.1\nidna==3.7\n"})
    # The service knows neither release: pip-audit exits 0 saying "No known vulnerabilities
    # found", having audited nothing.
    fake = fake_pypi({})

    result = scan_pip_audit.host(targets)

    assert fake.seen == {"/pypi/pyyaml/6.0.1/json", "/pypi/idna/3.7/json"}  # it did ask
    assert result.status == NOT_RUN, (result.status, result.reason)
    assert "skipped all 2 dependencies of requirements.lock" in result.reason
    assert "nothing was audited" in result.reason and not result.findings
    verdict = policy.evaluate([result], make_policy())
    assert verdict.exit_code == 2 and verdict.status == "NOTHING CHECKED"


@pytest.mark.scanners("pip-audit")
def test_real_pip_audit_reports_what_the_service_knows(tmp_path, fake_pypi):
    need("pip-audit")
    targets = write_tree(tmp_path, {"requirements.lock": "pyyaml==6.0.1\nidna==3.7\n"})
    fake_pypi({**release("pyyaml", "6.0.1", FAKE_VULN), **release("idna", "3.7")})

    result = scan_pip_audit.host(targets)

    assert result.status == RAN, (result.status, result.reason)
    assert result.checked == "requirements.lock: 2 of 2 dependencies audited"
    [vuln] = result.findings
    assert (vuln.rule_id, vuln.severity, vuln.path, vuln.target) == \
        ("PYSEC-0000-1", UNKNOWN, "pyyaml 6.0.1", "requirements.lock")
    assert vuln.fix == "upgrade pyyaml to 6.0.2"
    assert vuln.message == "A made-up hole, for the test (aliases: CVE-0000-0001)"
    assert policy.evaluate([result], make_policy()).exit_code == 1


@pytest.mark.scanners("pip-audit")
def test_an_unreachable_service_is_an_error_never_clean(tmp_path, monkeypatch):
    need("pip-audit")
    targets = write_tree(tmp_path, {"requirements.lock": "idna==3.7\n"})
    with socket.socket() as s:  # a loopback port nobody listens on, as the proxy
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    result = scan_pip_audit.host(targets)

    assert result.status == ERROR, (result.status, result.reason)
    assert "without a report" in result.reason
    assert policy.evaluate([result], make_policy()).exit_code == 2


ALL_AUDITED = {"dependencies": [
    {"name": "requests", "version": "2.19.0", "vulns": SOME_AUDITED["dependencies"][0]["vulns"]},
    {"name": "idna", "version": "3.7", "vulns": []}], "fixes": []}


def test_image_locks_make_one_check_no_better_than_its_worst_lock():
    check = "pip-audit-image"
    debian = scan_pip_audit.interpret(ALL_AUDITED, check, "docker/locks/debian.lock")
    official = scan_pip_audit.interpret(ALL_SKIPPED, check, "docker/locks/official.lock")
    assert (debian.status, official.status) == (RAN, NOT_RUN)

    both = combine(check, "pip-audit", [debian, official])

    # One lock audited, the other not: partial, naming the lock that was not checked.
    assert both.status == PARTIAL
    assert both.checked == "docker/locks/debian.lock: 2 of 2 dependencies audited"
    assert "docker/locks/official.lock" in both.reason and "nothing was audited" in both.reason
    [vuln] = both.findings
    assert (vuln.target, vuln.rule_id) == ("docker/locks/debian.lock", "PYSEC-2018-28")
    verdict = policy.evaluate([both], make_policy())
    assert verdict.exit_code == 1 and "only partly checked: pip-audit-image" in verdict.summary()
    # A lock that broke makes the check an error; none audited is "not run", never clean.
    broke = error(check, "pip-audit", "pip-audit exited 2 without a report: boom",
                  checked="docker/locks/official.lock")
    assert combine(check, "pip-audit", [debian, broke]).status == ERROR
    assert combine(check, "pip-audit", [official, official]).status == NOT_RUN
    assert combine(check, "pip-audit", [debian, debian]).status == RAN


@pytest.mark.scanners("pip-audit")
def test_real_pip_audit_audits_every_image_lock(tmp_path, fake_pypi):
    need("pip-audit")
    targets = write_tree(tmp_path, {"docker/locks/official.lock": "idna==3.7\n",
                                    "docker/locks/debian.lock": "pyyaml==6.0.1\n",
                                    "docker/requirements.lock": "requests==2.19.0\n"})
    # The service knows pyyaml 6.0.1 (no vulnerability), not idna 3.7.
    fake = fake_pypi(release("pyyaml", "6.0.1"))

    result = scan_pip_audit.image(targets)

    # Both locks were given to pip-audit; the pre-split docker/requirements.lock is not read.
    assert fake.seen == {"/pypi/pyyaml/6.0.1/json", "/pypi/idna/3.7/json"}
    assert result.status == PARTIAL, (result.status, result.reason)
    assert result.checked == "docker/locks/debian.lock: 1 of 1 dependencies audited"
    assert "docker/locks/official.lock" in result.reason
    assert "nothing was audited" in result.reason and not result.findings


@pytest.mark.scanners("pip-audit")
def test_missing_locks_are_not_run(tmp_path):
    need("pip-audit")
    targets = write_tree(tmp_path, {"requirements.lock": "idna==3.7\n",
                                    "docker/locks/README.md": "no lock yet\n"})

    result = scan_pip_audit.image(targets)

    assert result.status == NOT_RUN
    assert result.reason == "docker/locks/*.lock does not exist yet"
