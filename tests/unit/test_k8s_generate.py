"""Generated parts of k8s/ must match their sources (one source of truth each).

If one of these fails, run `python k8s/generate.py` and commit the result.
"""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

from tests.unit.k8s_support import manifests
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"




M = manifests()
gen = M.load_module("generate")

RULES = ROOT / "monitoring" / "rules" / "face-recognition-rules.yml"
DASHBOARDS = ROOT / "monitoring" / "grafana" / "dashboards"


def _serve_config() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())


def _rayservice(target: str) -> dict:
    return M.one(M.rendered(target), "RayService", "faceserve")


def test_validation_tools_are_installed():
    """test_k8s_validate/test_k8s_lint skip themselves without these; this
    test (which needs neither) fails instead, so CI cannot lose them quietly."""

    missing = [m for m in ("kubernetes_validate", "yamllint", "jsonschema")
               if importlib.util.find_spec(m) is None]
    assert not missing, f"pip install kubernetes-validate yamllint (missing: {missing})"


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in gen.outputs()))
def test_generated_file_is_up_to_date(path):
    expected = gen.outputs()[ROOT / path]
    actual = (ROOT / path).read_text() if (ROOT / path).exists() else None
    assert actual == expected, f"{path} is stale: run `python k8s/generate.py`"


def test_check_mode_reports_nothing_stale(capsys):
    assert gen.main(["--check"]) == 0


def test_base_serve_config_is_serve_config_yaml():
    """The dev/base RayService serves exactly what `serve deploy` would."""
    for target in ("base", "dev"):
        assert yaml.safe_load(_rayservice(target)["spec"]["serveConfigV2"]) == _serve_config()


def test_ha_serve_config_only_overrides_scaling_and_health():
    """Everything in serve_config.yaml reaches the ha cluster; the ha values
    change only replica counts, CPU/custom resources and health-check timing."""
    src = _serve_config()
    ha = yaml.safe_load(_rayservice("ha")["spec"]["serveConfigV2"])
    allowed = {"autoscaling_config", "ray_actor_options", "health_check_period_s",
               "health_check_timeout_s"}
    assert {k: v for k, v in ha.items() if k != "applications"} == \
        {k: v for k, v in src.items() if k != "applications"}
    for app_src, app_ha in zip(src["applications"], ha["applications"], strict=True):
        assert {k: v for k, v in app_ha.items() if k != "deployments"} == \
            {k: v for k, v in app_src.items() if k != "deployments"}
        for d_src, d_ha in zip(app_src["deployments"], app_ha["deployments"], strict=True):
            assert d_src["name"] == d_ha["name"]
            for key in set(d_src) | set(d_ha):
                if key not in allowed:
                    assert d_ha.get(key) == d_src.get(key), (d_src["name"], key)
            # autoscaling policy other than the bounds is kept
            for k, v in d_src.get("autoscaling_config", {}).items():
                if k not in ("min_replicas", "max_replicas"):
                    assert d_ha["autoscaling_config"][k] == v


def test_a_change_in_serve_config_changes_both_rayservices(monkeypatch):
    """Drift is caught: edit the source in memory and the expected files move."""
    changed = _serve_config()
    changed["applications"][0]["deployments"][1]["user_config"]["score_threshold"] = 0.9
    monkeypatch.setattr(gen, "load_serve_config", lambda: copy.deepcopy(changed))
    out = gen.outputs()
    base = yaml.safe_load(out[gen.BASE_RAYSERVICE])
    assert yaml.safe_load(base["spec"]["serveConfigV2"]) == changed
    assert out[gen.BASE_RAYSERVICE] != gen.BASE_RAYSERVICE.read_text()
    assert out[gen.HA_PATCH] != gen.HA_PATCH.read_text()


def test_api_replicas_are_configurable_in_ha_values(monkeypatch):
    values = yaml.safe_load(gen.HA_VALUES.read_text())
    api = next(g for g in values["groups"] if g["deployment"] == "Ingress")
    api["min_replicas"], api["max_replicas"] = 5, 9
    base_rs = yaml.safe_load(gen.BASE_RAYSERVICE.read_text())
    ops = gen.ha_patch(_serve_config(), values, base_rs)
    serve = yaml.safe_load(ops[0]["value"])
    ingress = next(d for d in serve["applications"][0]["deployments"] if d["name"] == "Ingress")
    assert ingress["autoscaling_config"]["min_replicas"] == 5
    group = next(g for g in ops[1]["value"] if g["groupName"] == "api")
    assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) == (5, 9, 5)


def test_ha_values_must_cover_every_deployment():
    values = yaml.safe_load(gen.HA_VALUES.read_text())
    values["groups"] = [g for g in values["groups"] if g["deployment"] != "Matcher"]
    with pytest.raises(ValueError, match="Matcher"):
        gen.ha_serve_config(_serve_config(), values)


def test_matcher_shards_become_one_deployment_each_on_the_matcher_pods():
    values = yaml.safe_load(gen.HA_VALUES.read_text())
    assert values["matcher_shards"] == 1  # the committed ha overlay: one Matcher
    values["matcher_shards"] = 3
    base_rs = yaml.safe_load(gen.BASE_RAYSERVICE.read_text())
    ops = gen.ha_patch(_serve_config(), values, base_rs)
    from ray.serve.schema import ServeDeploySchema

    serve = yaml.safe_load(ops[0]["value"])
    ServeDeploySchema.model_validate(serve)
    app = serve["applications"][0]
    assert app["args"]["matcher_shards"] == 3
    deps = {d["name"]: d for d in app["deployments"]}
    assert "Matcher" not in deps and {"Matcher-0", "Matcher-1", "Matcher-2"} <= set(deps)
    group = next(g for g in values["groups"] if g["deployment"] == "Matcher")
    for s in range(3):
        d = deps[f"Matcher-{s}"]
        assert d["ray_actor_options"]["resources"] == {"faceserve_matcher": 1}
        assert d["autoscaling_config"]["min_replicas"] == group["min_replicas"]
        assert d["health_check_period_s"] == values["all_deployments"]["health_check_period_s"]
    pods = next(g for g in ops[1]["value"] if g["groupName"] == "matcher")
    assert (pods["minReplicas"], pods["maxReplicas"]) == (3 * group["min_replicas"], 3 * group["max_replicas"])
    api = next(g for g in ops[1]["value"] if g["groupName"] == "api")
    assert api["minReplicas"] == next(g for g in values["groups"] if g["deployment"] == "Ingress")["min_replicas"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_matcher_shards_must_be_a_positive_integer(bad):
    values = yaml.safe_load(gen.HA_VALUES.read_text())
    values["matcher_shards"] = bad
    with pytest.raises(ValueError, match="matcher_shards"):
        gen.ha_serve_config(_serve_config(), values)


@pytest.mark.skipif(not RULES.is_file(), reason="monitoring/rules/face-recognition-rules.yml not written yet")
def test_prometheusrule_is_the_rules_file():
    rule = M.one(M.rendered("ha"), "PrometheusRule", "faceserve-rules")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    assert rule["metadata"]["labels"]["app.kubernetes.io/part-of"] == "faceserve"


def test_rules_file_is_wired_into_the_base():
    kust = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    assert ("monitoring/prometheusrule.yaml" in kust["resources"]) == RULES.is_file()


@pytest.mark.skipif(not DASHBOARDS.is_dir(), reason="monitoring/grafana/dashboards not written yet")
def test_grafana_dashboards_are_the_monitoring_dashboards():
    cm = M.one(M.rendered("ha"), "ConfigMap", "faceserve-grafana-dashboards")
    files = sorted(DASHBOARDS.glob("*.json"))
    assert sorted(cm["data"]) == [f.name for f in files]
    for f in files:
        assert json.loads(cm["data"][f.name]) == json.loads(f.read_text())


def test_grafana_datasources_keep_uids_and_point_in_cluster():
    cm = M.one(M.rendered("ha"), "ConfigMap", "faceserve-grafana-datasources")
    sources = [ds for text in cm["data"].values()
               for ds in (yaml.safe_load(text) or {}).get("datasources", [])]
    by_type = {ds["type"]: ds for ds in sources}
    assert by_type["prometheus"]["url"] == "http://prometheus-operated:9090"
    assert by_type["jaeger"]["url"].startswith("http://faceserve-jaeger-query:")
    src_dir = ROOT / "monitoring" / "grafana" / "provisioning" / "datasources"
    for f in sorted(src_dir.glob("*.y*ml")) if src_dir.is_dir() else []:
        for ds in yaml.safe_load(f.read_text()).get("datasources", []):
            assert any(s.get("uid") == ds.get("uid") and s["name"] == ds["name"] for s in sources)
    # every datasource uid a dashboard panel names is provisioned
    uids = {ds.get("uid") for ds in sources}
    dash = M.one(M.rendered("ha"), "ConfigMap", "faceserve-grafana-dashboards")

    def walk(node):
        if isinstance(node, dict):
            ds = node.get("datasource")
            if isinstance(ds, dict) and ds.get("type") not in (None, "grafana", "datasource") \
                    and not str(ds.get("uid", "")).startswith("$"):
                yield ds["uid"]
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    for text in dash["data"].values():
        assert set(walk(json.loads(text))) <= uids
