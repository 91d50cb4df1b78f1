"""Offline validation of everything k8s/ renders.

* core objects: Kubernetes' own schemas, strict (unknown fields fail), from
  kubernetes-validate, for the oldest and the newest Kubernetes we target;
* custom resources: our minimal schemas in k8s/schemas/ (every kind must have
  one: nothing goes unchecked);
* Pod templates inside RayService/RayJob: Kubernetes' PodTemplate schema;
* serveConfigV2: Ray's ray.serve.schema.ServeDeploySchema, plus a check that
  every key is a field Ray knows (the schema itself ignores unknown keys).
"""
from __future__ import annotations

import functools
from pathlib import Path

import jsonschema
import pytest

from tests.unit.k8s_support import manifests
import yaml

# CI installs it (tests/unit/test_k8s_lint.py fails loudly when it is missing).
kubernetes_validate = pytest.importorskip("kubernetes_validate")


@pytest.fixture(scope="module", autouse=True)
def _cache_k8s_schemas():
    """kubernetes-validate re-reads its 1 MB definitions file on every call;
    read each schema file once per test module (they are only read)."""
    utils = kubernetes_validate.utils
    original = utils.schema_contents
    utils.schema_contents = functools.lru_cache(maxsize=None)(original)
    yield
    utils.schema_contents = original

K8S = Path(__file__).resolve().parents[2] / "k8s"




M = manifests()

# Oldest Kubernetes we support (KubeRay and CNPG releases of 2025 need >= 1.30)
# and the newest one kubernetes-validate knows.
K8S_VERSIONS = ["1.30", kubernetes_validate.latest_version()]


def _cases():
    for target in sorted(M.TARGETS):
        for obj in M.rendered(target):
            yield pytest.param(target, obj, id=f"{target}:{obj['kind']}/{obj['metadata']['name']}")


def _is_custom(obj) -> bool:
    return (M.group_of(obj), obj["kind"]) in M.SCHEMAS


@pytest.mark.parametrize("target,obj", list(_cases()))
def test_object_is_valid(target, obj):
    if _is_custom(obj):
        schema = M.schema((M.group_of(obj), obj["kind"]))
        jsonschema.Draft202012Validator.check_schema(schema)
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj), key=str)
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{obj['apiVersion']} {obj['kind']}: no Kubernetes schema and no "
                        f"schema of ours in k8s/schemas/ (add one to manifests.SCHEMAS)")
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"k8s {version}: {'.'.join(map(str, e.path))}: {e.message}")


def _ray_pod_templates():
    for target in sorted(M.TARGETS):
        for obj in M.rendered(target):
            if obj["kind"] in ("RayService", "RayJob"):
                for where, tmpl in M.pod_templates(obj):
                    yield pytest.param(tmpl, id=f"{target}:{where}")


@pytest.mark.parametrize("template", list(_ray_pod_templates()))
def test_ray_pod_templates_are_valid_pod_templates(template):
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
               "metadata": {"name": "ray-pod"}, "template": template}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(wrapped, version, strict=True)


def test_custom_schemas_reject_typos():
    """The own schemas are strict where we write fields."""
    rs = M.one(M.rendered("ha"), "RayService", "faceserve")
    schema = M.schema(("ray.io", "RayService"))
    v = jsonschema.Draft202012Validator(schema)
    assert v.is_valid(rs)
    bad = yaml.safe_load(yaml.safe_dump(rs))
    bad["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAdress"] = "x:1"
    assert not v.is_valid(bad)
    bad = yaml.safe_load(yaml.safe_dump(rs))
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert not v.is_valid(bad), "rayStartParams values must be strings"


# ---------------------------------------------------------------- serve config
def _serve_configs():
    for target in ("base", "dev", "ha"):
        rs = M.one(M.rendered(target), "RayService", "faceserve")
        yield pytest.param(rs["spec"]["serveConfigV2"], id=target)


def _fields(model) -> set[str]:
    fields = getattr(model, "model_fields", None) or getattr(model, "__fields__")
    return set(fields)


@pytest.mark.parametrize("text", list(_serve_configs()))
def test_serve_config_v2_is_a_valid_serve_deploy_config(text):
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (DeploymentSchema, RayActorOptionsSchema,
                                  ServeApplicationSchema, ServeDeploySchema)

    config = yaml.safe_load(text)
    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    parsed = validate(config)
    assert [a.name for a in parsed.applications] == ["faceserve"]

    assert set(config) <= _fields(ServeDeploySchema)
    for app in config["applications"]:
        assert set(app) <= _fields(ServeApplicationSchema), set(app) - _fields(ServeApplicationSchema)
        for dep in app["deployments"]:
            assert set(dep) <= _fields(DeploymentSchema), set(dep) - _fields(DeploymentSchema)
            assert set(dep.get("ray_actor_options", {})) <= _fields(RayActorOptionsSchema)
            assert set(dep.get("autoscaling_config", {})) <= _fields(AutoscalingConfig)
