"""Helpers to load and inspect the rendered manifests of k8s/ (used by the
tests in tests/unit/test_k8s_*.py; no cluster, no network, no Ray)."""
from __future__ import annotations

import functools
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

K8S = Path(__file__).resolve().parent
ROOT = K8S.parent

# Everything that can be applied, by name.
TARGETS = {
    "base": K8S / "base",
    "dev": K8S / "overlays" / "dev",
    "ha": K8S / "overlays" / "ha",
    "cluster": K8S / "cluster",
    "enroll-folder": K8S / "jobs" / "enroll-folder",
    "reembed": K8S / "jobs" / "reembed",
}

# Our own schemas for the custom resources, by (API group, kind).
SCHEMAS = {
    ("ray.io", "RayService"): "rayservice.schema.json",
    ("ray.io", "RayJob"): "rayjob.schema.json",
    ("postgresql.cnpg.io", "Cluster"): "cnpg-cluster.schema.json",
    ("postgresql.cnpg.io", "ScheduledBackup"): "cnpg-scheduledbackup.schema.json",
    ("barmancloud.cnpg.io", "ObjectStore"): "barman-objectstore.schema.json",
    ("cert-manager.io", "Certificate"): "certificate.schema.json",
    ("cert-manager.io", "ClusterIssuer"): "clusterissuer.schema.json",
    ("monitoring.coreos.com", "PodMonitor"): "podmonitor.schema.json",
    ("monitoring.coreos.com", "PrometheusRule"): "prometheusrule.schema.json",
    ("monitoring.coreos.com", "Prometheus"): "prometheus.schema.json",
}

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def load_module(name: str):
    """Import k8s/<name>.py under a unique module name."""
    modname = f"faceserve_k8s_{name}"
    if modname in sys.modules:
        return sys.modules[modname]
    spec = importlib.util.spec_from_file_location(modname, K8S / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod
    spec.loader.exec_module(mod)
    return mod


@functools.lru_cache(maxsize=None)
def _rendered(target: str) -> str:
    render = load_module("render")
    return json.dumps(render.render(TARGETS[target]))


def rendered(target: str) -> list[dict]:
    """A fresh copy of the rendered objects of a target (cached render)."""
    return json.loads(_rendered(target))


def schema(kind_key: tuple[str, str]) -> dict:
    return json.loads((K8S / "schemas" / SCHEMAS[kind_key]).read_text())


def group_of(obj: dict) -> str:
    api = obj["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict], kind: str, name: str) -> dict:
    hits = find(objs, kind, name)
    assert len(hits) == 1, f"expected one {kind}/{name}, found {len(hits)}"
    return hits[0]


def pod_templates(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod template) for every Pod template an object carries."""
    kind = obj["kind"]
    name = obj["metadata"]["name"]
    if kind in WORKLOAD_KINDS:
        yield f"{kind}/{name}", obj["spec"]["template"]
    elif kind in ("RayService", "RayJob"):
        key = "rayClusterConfig" if kind == "RayService" else "rayClusterSpec"
        cluster = obj["spec"][key]
        yield f"{kind}/{name}/head", cluster["headGroupSpec"]["template"]
        for wg in cluster.get("workerGroupSpecs", []):
            yield f"{kind}/{name}/{wg['groupName']}", wg["template"]
        if kind == "RayJob" and "submitterPodTemplate" in obj["spec"]:
            yield f"{kind}/{name}/submitter", obj["spec"]["submitterPodTemplate"]


def all_pod_templates(objs: list[dict]) -> Iterator[tuple[str, dict]]:
    for o in objs:
        yield from pod_templates(o)


def selector_matches(selector: dict, labels: dict) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        op, key, vals = expr["operator"], expr["key"], expr.get("values", [])
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and labels.get(key) in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return bool(selector.get("matchLabels") or selector.get("matchExpressions"))


_CPU = re.compile(r"^([0-9.]+)(m?)$")
_MEM = re.compile(r"^([0-9.]+)(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_MEM_UNITS = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
              "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def cpu(q: Any) -> float:
    """Kubernetes CPU quantity -> cores."""
    m = _CPU.match(str(q))
    assert m, f"bad CPU quantity {q!r}"
    return float(m.group(1)) / (1000 if m.group(2) else 1)


def mem(q: Any) -> int:
    """Kubernetes memory quantity -> bytes."""
    m = _MEM.match(str(q))
    assert m, f"bad memory quantity {q!r}"
    return int(float(m.group(1)) * _MEM_UNITS[m.group(2)])


def secret_refs(node: Any) -> set[str]:
    """Names of every Secret referenced anywhere in an object."""
    found: set[str] = set()
    if isinstance(node, dict):
        if "secretKeyRef" in node and isinstance(node["secretKeyRef"], dict):
            found.add(node["secretKeyRef"]["name"])
        if "secretRef" in node and isinstance(node["secretRef"], dict):
            found.add(node["secretRef"]["name"])
        if "secret" in node and isinstance(node["secret"], dict) and "secretName" in node["secret"]:
            found.add(node["secret"]["secretName"])
        for k, v in node.items():
            if k in ("accessKeyId", "secretAccessKey") and isinstance(v, dict) and "name" in v:
                found.add(v["name"])
            found |= secret_refs(v)
    elif isinstance(node, list):
        for item in node:
            found |= secret_refs(item)
    return found


def configmap_refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for key in ("configMapRef", "configMapKeyRef", "configMap"):
            if isinstance(node.get(key), dict) and "name" in node[key]:
                found.add(node[key]["name"])
        for v in node.values():
            found |= configmap_refs(v)
    elif isinstance(node, list):
        for item in node:
            found |= configmap_refs(item)
    return found
