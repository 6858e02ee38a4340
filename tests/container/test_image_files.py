"""The image's build files checked with the real scanners and read for what the issue asks.

Three Dockerfiles make the image: a base (docker/base/official.Dockerfile: the TF 2.9.3 GPU
image pinned by digest; or docker/base/debian.Dockerfile: made from a Debian root filesystem)
and the one project layer on top of either (docker/Dockerfile, `FROM ${BASE}`).

hadolint and `trivy config` run through the project's own scanner (security/), exactly as
`invoke scan` runs them, and hadolint also directly on each base (the scanner lints only
docker/Dockerfile); deliberately broken copies show the scans would catch a regression. The
rest reads Dockerfiles, compose, Prometheus and ignore files as data, and checks them
against each other and against the `image` package that builds them.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from tests.container.conftest import DOCKER, ROOT
from tests.security.scan_trees import need

LAYER = DOCKER / "Dockerfile"
OFFICIAL = DOCKER / "base" / "official.Dockerfile"
DEBIAN = DOCKER / "base" / "debian.Dockerfile"
DOCKERFILES = [LAYER, OFFICIAL, DEBIAN]
DOCKERFILE_IDS = ["layer", "official", "debian"]
# The values `python -m image build` passes as VARIANT to debian.Dockerfile (image/build.py).
DEBIAN_VARIANTS = ("cpu", "gpu")
SCANS = ["trivy-config", "hadolint"]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


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


def steps_of(path: Path) -> List[str]:
    return instructions(path.read_text())


def module_constant(path: Path, name: str):
    """A module-level string constant, read without importing the module."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{rel(path)} defines no {name}")


def run_scans(root: Path, reports: Path):
    need("trivy")  # the callers are marked scanners("trivy", "hadolint")
    need("hadolint")
    from security import checks, policy
    from security.targets import POLICY_FILE, Targets

    results = checks.run_all(Targets.for_root(root), reports, only=SCANS,
                             progress=lambda _msg: None)
    return results, policy.evaluate(results, policy.load(POLICY_FILE))


def hadolint_json(dockerfile: Path, tmp_path: Path) -> list:
    """hadolint's findings on one file, run as security/scan_hadolint.py runs it: an empty
    config (no .hadolint.yaml can hide a rule) and inline ignore pragmas disabled; the
    callers are marked scanners("hadolint")."""
    hadolint = need("hadolint")
    cfg = tmp_path / "empty-hadolint.yaml"
    cfg.write_text("{}\n")
    result = subprocess.run([hadolint, "--config", str(cfg), "--format", "json", "--no-fail",
                             "--no-color", "--disable-ignore-pragma", str(dockerfile)],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout or "[]")


# --- Scanners -----------------------------------------------------------------------------

@pytest.mark.scanners("trivy", "hadolint")
def test_hadolint_and_trivy_config_pass_the_project_policy(tmp_path):
    results, verdict = run_scans(ROOT, tmp_path)
    by_check: Dict[str, object] = {r.check: r for r in results}
    for name in SCANS:
        assert by_check[name].status == "ran", f"{name}: {by_check[name].reason}"
    # trivy found and read all three Dockerfiles, the bases included.
    for dockerfile in DOCKERFILES:
        assert rel(dockerfile) in by_check["trivy-config"].checked
    # The layer is what runs: nothing HIGH on it, whatever the policy accepts.
    high = [f for r in results for f in r.findings
            if f.path == rel(LAYER) and f.severity in ("HIGH", "CRITICAL")]
    assert high == []
    # hadolint (through security/) is held to every level on the layer: nothing at all.
    assert by_check["hadolint"].findings == []
    violations = [f"{j.finding.rule_id} {j.finding.location}: {j.finding.message}"
                  for j in verdict.violations]
    assert (violations, verdict.exit_code) == ([], 0), verdict.summary()


@pytest.mark.scanners("hadolint")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=DOCKERFILE_IDS)
def test_hadolint_finds_nothing_on_each_dockerfile(dockerfile, tmp_path):
    assert hadolint_json(dockerfile, tmp_path) == []
    # The committed config (trusted registries; no ignored rule) passes at every level too.
    hadolint = need("hadolint")
    cfg = yaml.safe_load((DOCKER / ".hadolint.yaml").read_text())
    assert cfg.get("ignored") == [], "an ignored rule needs its reason in .hadolint.yaml"
    result = subprocess.run([hadolint, "--config", str(DOCKER / ".hadolint.yaml"),
                             str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.scanners("trivy", "hadolint")
def test_the_scans_catch_a_root_user_and_a_missing_healthcheck_in_the_layer(tmp_path):
    # Negative control: the same scans on a copy of docker/ with the layer's hardening
    # removed. Only the layer's findings count: the bases have no USER of their own.
    broken = tmp_path / "tree"
    shutil.copytree(DOCKER, broken / "docker")
    text = (broken / "docker" / "Dockerfile").read_text()
    assert "USER 1000:1000" in text and "HEALTHCHECK " in text
    text = text.replace("USER 1000:1000", "USER root")
    text = re.sub(r"HEALTHCHECK [^\n]*\\\n[^\n]*\n", "", text)
    (broken / "docker" / "Dockerfile").write_text(text)
    results, verdict = run_scans(broken, tmp_path / "reports")
    ids = {f.rule_id for r in results for f in r.findings if f.path == rel(LAYER)}
    assert {"DS-0002", "DS-0026", "DL3002"} <= ids, ids
    assert {j.finding.rule_id for j in verdict.violations if j.finding.path == rel(LAYER)}
    assert verdict.exit_code == 1


@pytest.mark.scanners("hadolint")
@pytest.mark.parametrize("dockerfile, old, new, rule", [
    # An apt package without its version pin.
    (OFFICIAL, '"tini=0.18.0-1"', "tini", "DL3008"),
    # pip keeping its download cache in a layer.
    (DEBIAN, "pip install --no-cache-dir", "pip install", "DL3042"),
], ids=["official-unpinned-apt", "debian-pip-cache"])
def test_hadolint_on_a_base_catches_a_regression(dockerfile, old, new, rule, tmp_path):
    # Negative control for the direct hadolint run on the bases.
    text = dockerfile.read_text()
    assert old in text
    broken = tmp_path / dockerfile.name
    broken.write_text(text.replace(old, new))
    assert rule in {f["code"] for f in hadolint_json(broken, tmp_path)}


# --- How the three files fit together ---------------------------------------------------

def test_official_base_is_tf_2_9_gpu_jupyter_pinned_by_tag_and_digest():
    text = OFFICIAL.read_text()
    steps = instructions(text)
    assert [s for s in steps if s.startswith("FROM ")] == [
        "FROM docker.io/tensorflow/tensorflow:${TF_TAG}@${TF_DIGEST}"]
    before_from = steps[:next(i for i, s in enumerate(steps) if s.startswith("FROM "))]
    # No default digest: an unpinned build must fail rather than float.
    assert "ARG TF_DIGEST" in before_from
    assert not re.search(r"^ARG TF_DIGEST=", text, re.M)
    tag = next(s for s in before_from if s.startswith("ARG TF_TAG="))
    assert re.fullmatch(r"ARG TF_TAG=2\.9\.\d+-gpu-jupyter", tag)
    # `invoke pin-base` pulls and pins the tag the Dockerfile builds from.
    assert tag.split("=", 1)[1] == module_constant(ROOT / "tasks.py", "BASE_TAG")
    lines = [ln.strip() for ln in (DOCKER / "base-image.digest").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert len(lines) <= 1 and all(re.fullmatch(r"sha256:[0-9a-f]{64}", ln) for ln in lines)


def test_project_layer_builds_on_the_base_it_is_given():
    from image.build import variant

    steps = steps_of(LAYER)
    assert [s for s in steps if s.startswith("FROM ")] == ["FROM ${BASE}"]
    first = next(i for i, s in enumerate(steps) if s.startswith("FROM "))
    [arg] = [s for s in steps[:first] if s.startswith("ARG BASE")]
    # The default is the base `python -m image build` makes by default (debian, CPU).
    assert arg == f"ARG BASE={variant('debian', False).base_ref}"
    # One layer for every base: no package manager of one distribution in it.
    assert not [s for s in steps if re.search(r"\b(apt-get|apt|dpkg|apk|yum|dnf)\b", s)]


def test_debian_base_builds_on_the_imported_root_filesystem():
    text = DEBIAN.read_text()
    steps = instructions(text)
    assert [s for s in steps if s.startswith("FROM ")] == ["FROM ${ROOTFS}"]
    first = next(i for i, s in enumerate(steps) if s.startswith("FROM "))
    # No default root filesystem: only `python -m image` knows which one it imported.
    assert steps[:first] == ["ARG ROOTFS"]
    assert "ARG VARIANT=cpu" in steps[first:]
    for v in DEBIAN_VARIANTS:
        assert (DOCKER / "base" / f"debian-{v}.lock").is_file()


def test_the_debian_gpu_library_path_holds_every_cuda_wheel_and_nothing_else():
    # TF 2.9 finds the CUDA wheels' libraries only through LD_LIBRARY_PATH: each pinned
    # nvidia-*-cu11 wheel's lib folder must be on it, and each folder on it must be a wheel's.
    dockerfile = DEBIAN.read_text()
    folders = set(re.findall(r"site-packages/nvidia/([a-z_]+)/lib", dockerfile))
    lock = (DOCKER / "base" / "debian-gpu.lock").read_text()
    wheels = set(re.findall(r"^nvidia-([a-z-]+)-cu11==", lock, re.M))
    assert folders and folders == {w.replace("-", "_") for w in wheels}


def base_names() -> Dict[str, str]:
    """What each base (and debian variant) writes to /etc/tokenmeter/base."""
    names = {}
    for path in (OFFICIAL, DEBIAN):
        [written] = re.findall(r'echo "?([^"\s>]+)"?\s*>\s*/etc/tokenmeter/base', path.read_text())
        for v in (DEBIAN_VARIANTS if "${VARIANT}" in written else ("",)):
            name = written.replace("${VARIANT}", v)
            names[name] = rel(path)
    return names


def test_the_layer_finds_a_lock_for_every_base(tmp_path):
    # The layer picks its lock with a shell expression on /etc/tokenmeter/base; run that
    # expression for each name a base writes and check the lock it names is in docker/locks/.
    assert set(base_names()) == {"official", "debian-cpu", "debian-gpu"}
    layer_run = next(s for s in steps_of(LAYER) if "/etc/tokenmeter/base" in s)
    m = re.search(r'lock="([^"]+)"', layer_run)
    assert m, layer_run
    chosen = set()
    for name in base_names():
        base_file = tmp_path / "base"
        base_file.write_text(name + "\n")
        expr = m.group(1).replace("/etc/tokenmeter/base", str(base_file))
        out = subprocess.run(["bash", "-c", f'echo "{expr}"'], capture_output=True, text=True,
                             check=True).stdout.strip()
        assert out.startswith("/tmp/locks/"), out
        lock = DOCKER / "locks" / out[len("/tmp/locks/"):]
        assert lock.is_file(), f"base {name}: the layer would install {out}: no such lock"
        chosen.add(lock.name)
    assert chosen == {p.name for p in (DOCKER / "locks").iterdir()}, "a lock no base uses"


def test_both_bases_provide_what_the_layer_runs():
    # tini (ENTRYPOINT), sshd (dev mode) and git (dvc), from each base's own package source.
    needed = {"tini", "openssh-server", "git"}
    apt = next(s for s in steps_of(OFFICIAL) if "apt-get install" in s)
    official = set(re.findall(r'"([a-z0-9.+-]+)=[^"]+"', apt))
    assert needed <= official, needed - official
    debian = {ln.split("=", 1)[0] for ln in
              (DOCKER / "base" / "debian-packages.lock").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")}
    assert needed <= debian, needed - debian


def test_dockerfile_hardening():
    steps = steps_of(LAYER)
    users = [s for s in steps if s.startswith("USER ")]
    assert users and users[-1] == "USER 1000:1000"
    assert any(s.startswith("HEALTHCHECK ") for s in steps)
    assert [s for s in steps if s.startswith("ENTRYPOINT ")] == [
        'ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/tokenmeter-entrypoint"]']
    labels = " ".join(s for s in steps if s.startswith("LABEL "))
    for key in ("title", "source", "revision", "created", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels
    volume = next(s for s in steps if s.startswith("VOLUME "))
    for path in ("/workspace/data", "/workspace/models", "/workspace/logs",
                 "/workspace/mlruns", "/workspace/ledger", "/var/lib/tokenmeter/ssh"):
        assert f'"{path}"' in volume
    assert "RUN python3 /etc/tokenmeter/check_image.py" in steps
    # Python packages only by hash and without a resolver, in the layer and the debian base.
    for path in (LAYER, DEBIAN):
        pips = [s for s in steps_of(path) if "pip install" in s]
        assert pips, rel(path)
        for s in pips:
            assert "--require-hashes" in s and "--no-deps" in s, (rel(path), s)
    # The official base: the CUDA/NVIDIA apt sources with the rotated key go before
    # `apt-get update`, no recommends, no apt lists and no SSH host keys left in the layer.
    apt = next(s for s in steps_of(OFFICIAL) if "apt-get update" in s)
    assert apt.index("cuda.list") < apt.index("apt-get update")
    assert apt.index("nvidia-ml.list") < apt.index("apt-get update")
    assert "--no-install-recommends" in apt
    assert apt.index("rm -rf /var/lib/apt/lists/*") > apt.index("apt-get install")
    assert "rm -f /etc/ssh/ssh_host_*" in apt
    # No secret-looking build argument or environment variable in any of the three.
    for path in DOCKERFILES:
        names = [n for s in steps_of(path) if s.startswith(("ARG ", "ENV "))
                 for n in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)(?==|\s|$)", s[4:])]
        assert names, rel(path)
        assert [n for n in names if re.search(r"TOKEN|KEY|SECRET|PASSWORD", n, re.I)] == [], \
            rel(path)


def copy_sources(path: Path) -> List[str]:
    """What a Dockerfile's COPY steps read from the build context, variables expanded."""
    sources = []
    for step in steps_of(path):
        if step.startswith("COPY "):
            parts = [p for p in step.split()[1:] if not p.startswith("--")]
            for src in parts[:-1]:
                expanded = ([src.replace("${VARIANT}", v) for v in DEBIAN_VARIANTS]
                            if "${VARIANT}" in src else [src])
                sources += [s.rstrip("/") for s in expanded]
    assert not [s for s in sources if "$" in s], sources
    return sources


def test_dockerignore_lets_in_only_what_the_dockerfiles_copy():
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*", "an allow-list must start by excluding everything"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    sources = {src for path in DOCKERFILES for src in copy_sources(path)}
    assert sources == allowed, (sources ^ allowed)
    for src in sources:
        assert (ROOT / src).exists(), f"a Dockerfile copies {src}, which does not exist"


def test_compose_services_ports_gpu_and_prometheus():
    from image.build import LATEST

    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    gpu_file = yaml.safe_load((DOCKER / "compose.gpu.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"dev", "serve", "mlflow", "prometheus", "grafana"}
    for name in ("dev", "serve", "mlflow"):
        # `python -m image build` tags its image tokenmeter:latest; compose runs that.
        assert services[name]["image"] == f"${{TOKENMETER_IMAGE:-{LATEST}}}"
        # Built by `invoke build`, never by compose; and no GPU asked for on a host without.
        assert "build" not in services[name] and "deploy" not in services[name], name
    # The GPU override reserves NVIDIA GPUs for the TF services, and only adds that.
    assert set(gpu_file["services"]) == {"dev", "serve"}
    for name, svc in gpu_file["services"].items():
        assert svc == {"deploy": {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]}}}}, name
    for doc in (compose, gpu_file):
        for name, svc in doc["services"].items():
            for port in svc.get("ports", []):
                assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} widely"
    assert services["dev"]["command"] == ["dev"] and services["serve"]["command"] == ["serve"]
    assert "${JUPYTER_TOKEN:?" in services["dev"]["environment"]["JUPYTER_TOKEN"]
    assert "ssh-host-keys:/var/lib/tokenmeter/ssh" in services["dev"]["volumes"]
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    [job] = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == ["serve:8000"]
    # Both files together are valid for the Compose CLI, where one is installed (no engine
    # needed).
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=30).returncode == 0:
        env = {"PATH": "/usr/bin:/bin", "JUPYTER_TOKEN": "x" * 32, "HOME": "/tmp"}
        result = subprocess.run([docker, "compose", "-f", str(DOCKER / "compose.yaml"),
                                 "-f", str(DOCKER / "compose.gpu.yaml"), "config", "--quiet"],
                                capture_output=True, text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", sorted(p.name for p in DOCKER.glob("*.py")))
def test_image_python_files_parse_as_python_3_8(script):
    # The official base's interpreter is 3.8 (the debian base's 3.9): no newer syntax (match,
    # except*, parenthesised context managers) and no runtime-evaluated list[int] / X | None
    # annotations.
    source = (DOCKER / script).read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AnnAssign, ast.arg)):
            ann = getattr(node, "returns", None) or getattr(node, "annotation", None)
            text = ast.unparse(ann) if ann is not None else ""
            assert "|" not in text and not re.match(r"^(list|dict|tuple|set)\[", text), \
                f"{script}: annotation {text!r} fails at runtime on Python 3.8"
