"""One billed request to the metered endpoint on TF 2.9: run by docker/tf29_check.sh inside
the bullseye root, on the model that root's TF 2.9 exported. Stdlib only (Python 3.8/3.9).

Usage: python tf29_serving_smoke.py MODEL_DIR LEDGER_PATH  (cwd: the smoke workspace)
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Tuple

READY_S = 300  # model load + warm-up of every length bucket on a 2-core CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, key: str) -> Tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": "Bearer " + key,
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:  # noqa: S310 (loopback)
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def main(model_dir: str, ledger: str) -> int:
    cli = [sys.executable, "-m", "serving", "--ledger", ledger]
    created = subprocess.run(cli + ["keys", "create", "--user", "tf29-parity", "--json"],
                             check=True, capture_output=True, text=True)
    key = json.loads(created.stdout)["key"]
    port = free_port()
    server = subprocess.Popen(cli + ["serve", "--host", "127.0.0.1", "--port", str(port),
                                     "--model-dir", model_dir], start_new_session=True)
    base = "http://127.0.0.1:%d" % port
    try:
        deadline = time.monotonic() + READY_S
        while True:
            if server.poll() is not None:
                print("error: the endpoint exited %d while loading" % server.returncode)
                return 1
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=5) as r:  # noqa: S310
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                print("error: the endpoint was not ready after %d s" % READY_S)
                return 1
            time.sleep(1)
        status, body = post(base + "/v1/analyze", {"text": "这本书写得很好，值得一读"}, key)
        if status != 200 or body.get("usage", {}).get("input_tokens", 0) <= 0:
            print("error: /v1/analyze answered %d: %s" % (status, body))
            return 1
        report = subprocess.run(cli + ["report", "--format", "json"], check=True,
                                capture_output=True, text=True).stdout
        if "tf29-parity" not in report:
            print("error: the billed request is not in the ledger report: " + report)
            return 1
        print("tf29 serving: 200, %s, usage %s, cost %s; in the ledger report"
              % (body["results"][0]["label"], json.dumps(body["usage"]),
                 body["cost"]["total"]))
        return 0
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
