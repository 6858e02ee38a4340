"""The built image doing its work, tested from the host: `repro` runs the smoke pipeline on
TF 2.9 into named volumes that outlive the container; `serve` bills a request from the host
into the ledger volume and drains on SIGTERM with exit status 0.

The tests run in file order and share the volumes (module scope): repro, then what survives
it, then serving what it exported.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.error
import urllib.request

import pytest

from pipeline.benchmark.process import free_port
from tests.container.conftest import ROOT
from tests.container.live import Container

pytestmark = [pytest.mark.container, pytest.mark.slow]

STATE = ("models", "mlruns", "data", "logs", "ledger")
MODEL_DIR = "/workspace/models/sentiment/1"


def mounts(containers, *names: str):
    out = []
    for name in names or STATE:
        out += ["-v", f"{containers.volume(name)}:/workspace/{name}"]
    return out


def in_volumes(containers, script: str) -> str:
    """Run a Python snippet in a fresh container over the state volumes; its stdout."""
    out = containers.once(*mounts(containers), containers.image, "python3", "-c", script,
                          timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def repro(containers):
    """`repro validate` on the smoke profile, in a container removed when it ends."""
    out = containers.once("-e", "TOKENMETER_PROFILE=smoke", *mounts(containers),
                          containers.image, "repro", "validate", timeout=1200)
    return out


def test_repro_trains_exports_with_tf_2_9_and_validates(repro):
    log = repro.stdout + repro.stderr
    assert repro.returncode == 0, log[-4000:]
    assert "params.yaml: profile smoke applied" in log
    for stage in ("prepare", "tokenizer", "baseline", "train", "export", "validate"):
        assert f"Running stage '{stage}'" in log, stage
    assert "validate: test accuracy" in log


def test_the_outputs_outlive_the_container(repro, containers):
    # A new container over the same volumes: the model TF 2.9 exported, the MLflow run,
    # the repro log.
    assert repro.returncode == 0
    found = json.loads(in_volumes(containers, f"""
import glob, json, sqlite3
card = json.load(open("{MODEL_DIR}/model_card.json"))
db = sqlite3.connect("/workspace/mlruns/mlflow.db")
runs = db.execute("select count(*) from runs where status = 'FINISHED'").fetchone()[0]
logs = glob.glob("/workspace/logs/repro-*.log")
print(json.dumps({{"tf": card["exported_with"]["tensorflow"], "runs": runs,
                  "saved_model": len(glob.glob("{MODEL_DIR}/saved_model.pb")),
                  "log": open(logs[0]).read() if len(logs) == 1 else ""}}))
"""))
    assert found["tf"] == "2.9.3"
    assert found["saved_model"] == 1
    assert found["runs"] >= 1
    assert "Running stage 'validate'" in found["log"]


@pytest.fixture(scope="module")
def served(repro, containers):
    assert repro.returncode == 0, "repro failed: nothing to serve"
    made = containers.once(*mounts(containers, "ledger"), containers.image, "python3", "-m",
                           "serving", "keys", "create", "--user", "container-test", "--json",
                           timeout=120)
    assert made.returncode == 0, made.stderr[-2000:]
    key = json.loads(made.stdout)["key"]
    port = free_port()
    box = containers.start("-p", f"127.0.0.1:{port}:8000", *mounts(containers, "models",
                                                                    "ledger"),
                           containers.image, "serve", name="serve")
    box.wait_http(f"http://127.0.0.1:{port}/readyz", deadline_s=180)
    box.url, box.key = f"http://127.0.0.1:{port}", key
    return box


def analyze(box, text: str):
    req = urllib.request.Request(
        box.url + "/v1/analyze", data=json.dumps({"text": text}).encode(), method="POST",
        headers={"Authorization": f"Bearer {box.key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (loopback)
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def test_a_billed_request_from_the_host_lands_in_the_ledger_volume(served, containers):
    status, body = analyze(served, "这本书写得很好，值得一读")
    assert status == 200, body
    assert body["results"][0]["label"] in ("positive", "negative")
    assert body["usage"]["input_tokens"] > 0
    # A bad key is refused and not billed.
    bad = Container(served.engine, served.name)
    bad.url, bad.key = served.url, "tm_not_a_real_key"
    assert analyze(bad, "好")[0] == 401
    rows = json.loads(in_volumes(containers, """
import json, sqlite3
db = sqlite3.connect("/workspace/ledger/ledger.sqlite3")
print(json.dumps(db.execute(
    "select user_id, input_tokens, model_version from billing_events").fetchall()))
"""))
    assert rows == [["container-test", body["usage"]["input_tokens"], "1"]]


def test_sigterm_drains_and_the_container_exits_0(served):
    assert served.stop(timeout_s=30) == 0, served.logs()[-3000:]
    assert "Shutting down" in served.logs() or "Finished server process" in served.logs()


def test_compose_starts_dev_and_serve(served, containers, engine, tmp_path):
    """docker/compose.yaml as a user runs it (podman-compose here): dev answers SSH, serve
    bills a request. Its volumes are seeded with the model exported above."""
    project = f"{containers.prefix}-compose"
    image = containers.image
    for name in ("models", "ledger", "mlruns", "data", "logs", "ssh-host-keys"):
        containers.volumes.append(f"{project}_{name}")  # removed at teardown, whatever happens
    seeded = containers.once("-v", f"{containers.volume('models')}:/src:ro",
                             "-v", f"{project}_models:/workspace/models", image,
                             "cp", "-a", "/src/.", "/workspace/models/", timeout=120)
    assert seeded.returncode == 0, seeded.stderr
    made = containers.once("-v", f"{project}_ledger:/workspace/ledger", image, "python3", "-m",
                           "serving", "keys", "create", "--user", "compose-test", "--json",
                           timeout=120)
    assert made.returncode == 0, made.stderr
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                    str(tmp_path / "id")], check=True, timeout=30)
    ports = {"SSH_PORT": free_port(), "JUPYTER_PORT": free_port(),
             "TOKENMETER_PORT": free_port()}
    env = {**os.environ, "TOKENMETER_IMAGE": image, "JUPYTER_TOKEN": "compose-token-0123456789",
           "SSH_PUBLIC_KEY_FILE": str(tmp_path / "id.pub"), "TOKENMETER_PROJECT_DIR": str(ROOT),
           **{k: str(v) for k, v in ports.items()}}
    compose = engine.compose_cmd("-f", str(ROOT / "docker" / "compose.yaml"), "-p", project)
    try:
        up = subprocess.run([*compose, "up", "-d", "dev", "serve"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
        assert up.returncode == 0, (up.stdout + up.stderr)[-3000:]
        serve = Container(engine, compose_container(engine, project, "serve"))
        serve.wait_http(f"http://127.0.0.1:{ports['TOKENMETER_PORT']}/readyz", deadline_s=180)
        serve.url = f"http://127.0.0.1:{ports['TOKENMETER_PORT']}"
        serve.key = json.loads(made.stdout)["key"]
        status, body = analyze(serve, "质量很差，不推荐")
        assert status == 200 and body["usage"]["input_tokens"] > 0, body
        login = subprocess.run(
            ["ssh", "-F", "/dev/null", "-p", str(ports["SSH_PORT"]), "-i", str(tmp_path / "id"),
             "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20",
             "-o", "StrictHostKeyChecking=no", "-o", f"UserKnownHostsFile={tmp_path}/kh",
             "tokenmeter@127.0.0.1", "id -u && test -f /workspace/dvc.yaml && echo project"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert login.stdout.split() == ["1000", "project"], login.stderr
    finally:
        down = subprocess.run([*compose, "down"], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
    assert down.returncode == 0, down.stderr[-2000:]
    left = subprocess.run(engine.cmd("ps", "-a", "--format", "{{.Names}}"),
                          capture_output=True, text=True).stdout.split()
    assert [n for n in left if n.startswith(project)] == []


def compose_container(engine, project: str, service: str) -> str:
    """The name compose gave `service` (podman-compose: project_service_1; Docker:
    project-service-1), from the labels both set."""
    out = subprocess.run(engine.cmd("ps", "--filter", f"label=com.docker.compose.project={project}",
                                    "--filter", f"label=com.docker.compose.service={service}",
                                    "--format", "{{.Names}}"),
                         capture_output=True, text=True, check=True).stdout.split()
    assert len(out) == 1, out
    return out[0]
