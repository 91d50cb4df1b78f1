"""k8s/render.py, the kustomize subset the other k8s tests render with.

Where `kubectl` is on PATH (it carries kustomize), every overlay is also
rendered by `kubectl kustomize` and the two results must be identical, so the
subset renderer cannot quietly diverge from the real tool.
"""
from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.unit.k8s_support import manifests
import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"




M = manifests()
render = M.load_module("render")


def _write(tmp: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return tmp


DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec:
  replicas: 1
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers:
        - name: c
          image: faceserve:0.1.0
          args: [a, b]
          env: [{name: A, value: "1"}, {name: B, value: "2"}]
        - name: side
          image: redis:7.4
"""

RAYSERVICE = """
apiVersion: ray.io/v1
kind: RayService
metadata: {name: rs}
spec:
  serveConfigV2: "a: 1\\n"
  rayClusterConfig:
    headGroupSpec:
      rayStartParams: {}
      template: {spec: {containers: [{name: h, image: "faceserve:0.1.0"}]}}
    workerGroupSpecs:
      - groupName: g1
        template: {spec: {containers: [{name: w, image: "faceserve:0.1.0"}]}}
"""


def test_strategic_merge_on_builtin_kind_merges_keyed_lists(tmp_path):
    d = _write(tmp_path, {
        "r.yaml": DEPLOYMENT,
        "p.yaml": """
            apiVersion: apps/v1
            kind: Deployment
            metadata: {name: d}
            spec:
              replicas: 3
              template:
                spec:
                  containers:
                    - name: c
                      args: [z]
                      env: [{name: B, value: "3"}, {name: C, value: "4"}]
            """,
        "kustomization.yaml": "resources: [r.yaml]\npatches: [{path: p.yaml}]\n",
    })
    (dep,) = render.render(d)
    assert dep["spec"]["replicas"] == 3
    c, side = dep["spec"]["template"]["spec"]["containers"]
    assert c["args"] == ["z"]  # primitive lists are replaced
    assert c["env"] == [{"name": "B", "value": "3"}, {"name": "C", "value": "4"},
                        {"name": "A", "value": "1"}]
    assert side["name"] == "side"


def test_json6902_namespace_and_images(tmp_path):
    d = _write(tmp_path, {
        "r.yaml": RAYSERVICE,
        "kustomization.yaml": """
            namespace: ns1
            resources: [r.yaml]
            images: [{name: faceserve, newName: reg.example/faceserve, newTag: "0.2.0"}]
            patches:
              - target: {group: ray.io, kind: RayService, name: rs}
                patch: |-
                  - op: replace
                    path: /spec/serveConfigV2
                    value: "b: 2\\n"
                  - op: add
                    path: /spec/rayClusterConfig/workerGroupSpecs/-
                    value: {groupName: g2, template: {spec: {containers: [{name: w, image: "faceserve:0.1.0"}]}}}
            """,
    })
    (rs,) = render.render(d)
    assert rs["metadata"]["namespace"] == "ns1"
    assert rs["spec"]["serveConfigV2"] == "b: 2\n"
    groups = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["g1", "g2"]
    images = [g["template"]["spec"]["containers"][0]["image"] for g in groups]
    assert images == ["reg.example/faceserve:0.2.0"] * 2


def test_strategic_merge_replaces_lists_of_custom_resources(tmp_path):
    d = _write(tmp_path, {
        "r.yaml": RAYSERVICE,
        "p.yaml": """
            apiVersion: ray.io/v1
            kind: RayService
            metadata: {name: rs}
            spec:
              rayClusterConfig:
                workerGroupSpecs: [{groupName: only}]
            """,
        "kustomization.yaml": "resources: [r.yaml]\npatches: [{path: p.yaml}]\n",
    })
    (rs,) = render.render(d)
    assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"] == [{"groupName": "only"}]


@pytest.mark.parametrize("kustomization", [
    "resources: [r.yaml]\ncommonLabels: {a: b}\n",
    "resources: [r.yaml]\nconfigMapGenerator: [{name: x, literals: [a=b]}]\n",
    "resources: [r.yaml]\npatches: [{path: p.yaml}]\n",
])
def test_unsupported_features_fail_loudly(tmp_path, kustomization):
    base = yaml.safe_load(DEPLOYMENT)
    base["spec"]["template"]["spec"]["tolerations"] = [{"key": "x", "operator": "Exists"}]
    d = _write(tmp_path, {
        "r.yaml": yaml.safe_dump(base),
        # Merging two lists of maps that have no merge key we know of would
        # need kustomize's OpenAPI schema: this renderer refuses.
        "p.yaml": """
            apiVersion: apps/v1
            kind: Deployment
            metadata: {name: d}
            spec:
              template:
                spec:
                  tolerations: [{key: a, operator: Exists}]
            """,
        "kustomization.yaml": kustomization,
    })
    with pytest.raises(render.Unsupported):
        render.render(d)


def test_patch_that_matches_nothing_is_an_error(tmp_path):
    d = _write(tmp_path, {
        "r.yaml": DEPLOYMENT,
        "kustomization.yaml": """
            resources: [r.yaml]
            patches:
              - target: {kind: Deployment, name: nope}
                patch: '[{"op": "replace", "path": "/spec/replicas", "value": 2}]'
            """,
    })
    with pytest.raises(ValueError, match="matched nothing"):
        render.render(d)


@pytest.mark.parametrize("target", sorted(M.TARGETS))
def test_every_target_renders(target):
    objs = M.rendered(target)
    assert objs
    ids = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs]
    assert len(ids) == len(set(ids))


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl (with built-in kustomize) not installed")
@pytest.mark.parametrize("target", sorted(M.TARGETS))
def test_renderer_agrees_with_kubectl_kustomize(target):
    out = subprocess.run([KUBECTL, "kustomize", str(M.TARGETS[target])],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    theirs = [d for d in yaml.safe_load_all(out) if d]

    def key(o):
        return (o["kind"], o["metadata"].get("namespace") or "", o["metadata"]["name"])

    ours = {key(o): o for o in M.rendered(target)}
    theirs = {key(o): o for o in theirs}
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        assert ours[k] == theirs[k], f"{target}: {k} differs from kubectl kustomize"
