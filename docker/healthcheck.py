#!/usr/bin/env python3
"""HEALTHCHECK of the image: probes what the entrypoint's mode started, nothing else.

The entrypoint writes its mode to $TOKENMETER_RUN_DIR/mode; `dev` needs Jupyter (and sshd
when it was started), `serve` the endpoint's /healthz. Python 3.8 syntax, stdlib only.
"""

import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Mapping

TIMEOUT_S = 4.0
SSH_PORT = 2222  # docker/sshd_config


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:  # noqa: S310 (loopback)
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError):
        return False


def tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S):
            return True
    except OSError:
        return False


def problems(mode: str, env: Mapping[str, str]) -> List[str]:
    """What is unhealthy for `mode` (empty list: healthy)."""
    found = []
    if mode == "dev":
        # /api answers without a token: it only says the server is up (its version).
        port = int(env.get("JUPYTER_PORT", "8888"))
        if not http_ok("http://127.0.0.1:%d/api" % port):
            found.append("jupyter not answering on port %d" % port)
        if env.get("TOKENMETER_SSH", "1") != "0" and not tcp_open(SSH_PORT):
            found.append("sshd not listening on port %d" % SSH_PORT)
    elif mode == "serve":
        port = int(env.get("TOKENMETER_PORT", "8000"))
        if not http_ok("http://127.0.0.1:%d/healthz" % port):
            found.append("endpoint /healthz not answering on port %d" % port)
    return found


def main() -> int:
    run_dir = Path(os.environ.get("TOKENMETER_RUN_DIR", "/tmp/tokenmeter"))
    try:
        mode = (run_dir / "mode").read_text().strip()
    except OSError:
        mode = ""  # a plain command: healthy while it runs
    found = problems(mode, os.environ)
    for p in found:
        print("unhealthy: " + p)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
