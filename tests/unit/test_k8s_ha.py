"""The rendered ha overlay keeps every promise of the HA table (docs/DEPLOY.md),
row by row, and the resource limits; the dev overlay is one node without
replication. Offline: these read manifests, they do not run a cluster."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.unit.k8s_support import manifests
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"




M = manifests()
cpu, mem = M.cpu, M.mem
GiB, MiB = 2**30, 2**20
MODELS = ("Detector", "Embedder", "Liveness", "Matcher")


@pytest.fixture(scope="module")
def ha():
    return M.rendered("ha")


@pytest.fixture(scope="module")
def dev():
    return M.rendered("dev")


def rayservice(objs):
    return M.one(objs, "RayService", "faceserve")


def serve_config(objs):
    return yaml.safe_load(rayservice(objs)["spec"]["serveConfigV2"])


def deployments(objs):
    return {d["name"]: d for a in serve_config(objs)["applications"] for d in a["deployments"]}


def worker_groups(objs):
    return {g["groupName"]: g for g in rayservice(objs)["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def group_of_deployment(objs, name):
    """The worker group whose Pods hold the deployment's replicas (custom resource)."""
    wanted = deployments(objs)[name]["ray_actor_options"]["resources"]
    (res,) = wanted
    hits = [g for g in worker_groups(objs).values()
            if res in g["rayStartParams"].get("resources", "")]
    assert len(hits) == 1, f"{name}: expected one worker group advertising {res}"
    return hits[0]


def ray_start_resources(group) -> dict:
    raw = group["rayStartParams"]["resources"]
    # KubeRay's format: a quoted JSON map with escaped quotes.
    assert raw.startswith('"') and raw.endswith('"')
    return yaml.safe_load(raw[1:-1].replace('\\"', '"'))


def container(template, index=0):
    return template["spec"]["containers"][index]


# ------------------------------------------------------- horizontal scaling
def test_api_has_three_replicas_by_default(ha):
    ingress = deployments(ha)["Ingress"]
    assert ingress["autoscaling_config"]["min_replicas"] == 3
    api = group_of_deployment(ha, "Ingress")
    assert api["groupName"] == "api"
    assert api["minReplicas"] == api["replicas"] == 3
    # one Ingress replica (and so one proxy behind Traefik) per API Pod
    assert ray_start_resources(api) == {"faceserve_api": 1}
    assert ingress["ray_actor_options"]["resources"] == {"faceserve_api": 1}


def test_api_replica_count_is_configurable():
    values = yaml.safe_load((K8S / "overlays" / "ha" / "ha-values.yaml").read_text())
    assert any(g["deployment"] == "Ingress" and g["min_replicas"] == 3 for g in values["groups"])
    # (tests/unit/test_k8s_generate.py changes it and checks the outcome)


@pytest.mark.parametrize("name", MODELS)
def test_each_model_deployment_autoscales_on_its_own(ha, name):
    dep = deployments(ha)[name]
    ac = dep["autoscaling_config"]
    assert "num_replicas" not in dep
    assert 1 <= ac["min_replicas"] < ac["max_replicas"]
    assert ac["target_ongoing_requests"] > 0
    group = group_of_deployment(ha, name)
    assert group["groupName"] == name.lower()
    # the Ray autoscaler can give every replica its own Pod, and no more
    assert group["minReplicas"] == ac["min_replicas"]
    assert group["maxReplicas"] == ac["max_replicas"]
    assert ray_start_resources(group) == dep["ray_actor_options"]["resources"]
    # the replica fits on its Pod
    assert float(group["rayStartParams"]["num-cpus"]) >= dep["ray_actor_options"]["num_cpus"]
    assert float(group["rayStartParams"]["num-cpus"]) <= cpu(container(group["template"])["resources"]["limits"]["cpu"])


def test_ray_autoscaler_is_on_and_head_hosts_no_replicas(ha, dev):
    for objs in (ha, dev):
        spec = rayservice(objs)["spec"]
        cluster = spec["rayClusterConfig"]
        assert cluster["enableInTreeAutoscaling"] is True
        assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        assert spec["excludeHeadPodFromServeSvc"] is True
        for g in cluster["workerGroupSpecs"]:
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
            assert g["minReplicas"] < g["maxReplicas"], f"{g['groupName']} cannot scale"


def test_one_worker_group_per_deployment(ha):
    groups = worker_groups(ha)
    assert set(groups) == {"api", "detector", "embedder", "liveness", "matcher"}
    for name, g in groups.items():
        tsc = g["template"]["spec"]["topologySpreadConstraints"]
        assert tsc[0]["topologyKey"] == "kubernetes.io/hostname"
        assert tsc[0]["labelSelector"]["matchLabels"] == {"faceserve/ray-group": name}


# ----------------------------------------------------------- load balancing
def test_ingress_fronts_the_serve_proxies_on_every_node(ha):
    config = serve_config(ha)
    assert config["proxy_location"] == "EveryNode"
    assert config["http_options"]["port"] == 8000
    ing = M.one(ha, "Ingress", "faceserve")
    assert ing["spec"]["ingressClassName"] == "traefik"
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    # KubeRay's Serve Service: <RayService name>-serve-svc, the Ray Pods with a
    # healthy proxy; it follows the active cluster through upgrades.
    assert backend == {"name": "faceserve-serve-svc", "port": {"number": 8000}}
    for name, g in worker_groups(ha).items():
        ports = {p["name"]: p["containerPort"] for p in container(g["template"])["ports"]}
        assert ports["serve"] == 8000, name


def test_traefik_is_the_ingress_controller_and_is_replicated(ha):
    cls = M.one(ha, "IngressClass", "traefik")
    assert cls["spec"]["controller"] == "traefik.io/ingress-controller"
    dep = M.one(ha, "Deployment", "faceserve-traefik")
    assert dep["spec"]["replicas"] >= 2
    args = container(dep["spec"]["template"])["args"]
    assert "--providers.kubernetesingress.ingressClass=traefik" in args


# ------------------------------------------------------------ health checks
def _long_running_templates(objs):
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet", "RayService"):
            yield from M.pod_templates(o)


def test_every_long_running_container_has_30s_probes_with_3_retries(ha):
    seen = 0
    for where, tmpl in _long_running_templates(ha):
        for c in tmpl["spec"]["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                p = c.get(probe)
                assert p, f"{where}/{c['name']}: no {probe}"
                assert p["periodSeconds"] == 30, f"{where}/{c['name']} {probe}"
                assert p["failureThreshold"] == 3, f"{where}/{c['name']} {probe}"
                seen += 1
    assert seen >= 20


def test_serve_replicas_health_checked_every_30s_3_retries(ha):
    for name, dep in deployments(ha).items():
        assert dep["health_check_period_s"] == 30, name
    try:
        from ray.serve._private.constants import REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD
    except ImportError:  # pragma: no cover - private constant moved
        pytest.skip("Ray Serve's replica health-check threshold constant moved")
    assert REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD == 3


def test_worker_readiness_is_the_local_proxy_not_the_app(ha):
    """A database outage must not make Kubernetes restart every Ray Pod."""
    for name, g in worker_groups(ha).items():
        c = container(g["template"])
        assert c["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": 8000}
        assert c["livenessProbe"]["httpGet"]["path"] == "/api/local_raylet_healthz"


# ------------------------------------------------------------- auto-restart
def test_long_running_pods_restart_on_failure(ha):
    for where, tmpl in _long_running_templates(ha):
        assert tmpl["spec"].get("restartPolicy", "Always") == "Always", where


def test_batch_work_has_bounded_retries(ha):
    for job in M.find(ha, "Job"):
        assert 0 < job["spec"]["backoffLimit"] <= 10
    (rayjob,) = M.find(M.rendered("enroll-folder"), "RayJob")
    spec = rayjob["spec"]
    assert spec["backoffLimit"] == 2
    assert spec["submitterConfig"]["backoffLimit"] == 2
    assert spec["activeDeadlineSeconds"] > 0
    assert spec["shutdownAfterJobFinishes"] is True


def test_rayjob_runs_the_bulk_enrolment_job_from_the_s3_inbox():
    objs = M.rendered("enroll-folder")
    (rayjob,) = M.find(objs, "RayJob")
    assert rayjob["spec"]["entrypoint"].startswith(
        "python -m serve_app.jobs.enroll --source s3://faceserve/inbox/people/ ")
    spec = rayjob["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    for pod in pods:  # the driver and the actors write to Postgres and MinIO directly
        names = {e["name"] for e in container(pod)["env"]}
        assert {"DATABASE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= names


def test_upgrades_start_a_new_cluster(ha):
    assert rayservice(ha)["spec"]["upgradeStrategy"]["type"] == "NewCluster"


# ------------------------------------------------------ database replication
def test_postgres_primary_and_replica(ha):
    pg = M.one(ha, "Cluster", "faceserve-pg")
    assert pg["spec"]["instances"] == 2
    assert pg["spec"]["enablePDB"] is True
    assert pg["spec"]["affinity"]["enablePodAntiAffinity"] is True
    (plugin,) = pg["spec"]["plugins"]
    assert plugin["isWALArchiver"] is True
    store = M.one(ha, "ObjectStore", plugin["parameters"]["barmanObjectName"])
    assert store["spec"]["configuration"]["destinationPath"].startswith("s3://")
    backup = M.one(ha, "ScheduledBackup", "faceserve-pg-nightly")
    assert backup["spec"]["cluster"]["name"] == "faceserve-pg"
    assert backup["spec"]["method"] == "plugin"


def test_app_reaches_the_primary_through_cnpg_app_secret(ha):
    for where, tmpl in M.pod_templates(rayservice(ha)):
        env = {e["name"]: e for e in container(tmpl)["env"]}
        ref = env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "faceserve-pg-app", "key": "uri"}, where


# --------------------------------------------------------- redis replication
def test_redis_master_replica_and_sentinels(ha):
    redis = M.one(ha, "StatefulSet", "faceserve-redis")
    assert redis["spec"]["replicas"] == 2
    sentinel = M.one(ha, "StatefulSet", "faceserve-redis-sentinel")
    assert sentinel["spec"]["replicas"] == 3
    scripts = M.one(ha, "ConfigMap", "faceserve-redis-scripts")["data"]
    assert re.search(r"sentinel monitor faceserve \$\{MASTER\} 6379 2", scripts["start-sentinel.sh"])
    env = {e["name"]: e for e in container(redis["spec"]["template"])["env"]}
    assert env["SENTINEL_HOST"]["value"] == "faceserve-redis-sentinel"
    assert "replicaof" in scripts["start-redis.sh"]


def test_clients_follow_the_master_through_haproxy(ha):
    svc = M.one(ha, "Service", "faceserve-redis-master")
    proxy = M.one(ha, "Deployment", "faceserve-redis-proxy")
    assert proxy["spec"]["replicas"] >= 2
    assert M.selector_matches({"matchLabels": svc["spec"]["selector"]},
                              proxy["spec"]["template"]["metadata"]["labels"])
    cfg = M.one(ha, "ConfigMap", "faceserve-redis-proxy")["data"]["haproxy.cfg"]
    assert "tcp-check expect string role:master" in cfg
    servers = re.findall(r"server (redis-\d+) ", cfg)
    redis = M.one(ha, "StatefulSet", "faceserve-redis")
    assert servers == [f"redis-{i}" for i in range(redis["spec"]["replicas"])]


def test_ray_gcs_fault_tolerance_on_redis(ha, dev):
    for objs in (ha, dev):
        cluster = rayservice(objs)["spec"]["rayClusterConfig"]
        ft = cluster["gcsFaultToleranceOptions"]
        assert ft["redisAddress"] == "faceserve-redis-master:6379"
        assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == \
            {"name": "faceserve-redis", "key": "password"}
        # KubeRay refuses a Redis password in rayStartParams as well
        assert "redis-password" not in cluster["headGroupSpec"]["rayStartParams"]
        assert M.find(objs, "Service", "faceserve-redis-master")


# ------------------------------------------------------------------ SSL/TLS
def test_lets_encrypt_certificate_at_the_ingress(ha):
    ing = M.one(ha, "Ingress", "faceserve")
    cert = M.one(ha, "Certificate", "faceserve-tls")
    (tls,) = ing["spec"]["tls"]
    assert tls["secretName"] == cert["spec"]["secretName"]
    assert tls["hosts"] == cert["spec"]["dnsNames"] == [ing["spec"]["rules"][0]["host"]]
    assert cert["spec"]["issuerRef"] == {"group": "cert-manager.io", "kind": "ClusterIssuer",
                                         "name": "letsencrypt-prod"}
    issuer = M.one(M.rendered("cluster"), "ClusterIssuer", "letsencrypt-prod")
    acme = issuer["spec"]["acme"]
    assert acme["server"] == "https://acme-v02.api.letsencrypt.org/directory"
    assert acme["solvers"][0]["http01"]["ingress"]["ingressClassName"] == ing["spec"]["ingressClassName"]
    assert ing["metadata"]["annotations"]["traefik.ingress.kubernetes.io/router.tls"] == "true"
    args = container(M.one(ha, "Deployment", "faceserve-traefik")["spec"]["template"])["args"]
    assert "--entryPoints.web.http.redirections.entryPoint.to=websecure" in args


# --------------------------------------------------------------- monitoring
def test_prometheus_picks_up_our_monitors_and_rules(ha):
    prom = M.one(ha, "Prometheus", "faceserve")
    for kind, sel in (("PodMonitor", "podMonitorSelector"), ("PrometheusRule", "ruleSelector")):
        objs = M.find(ha, kind)
        assert objs, kind
        for o in objs:
            assert M.selector_matches(prom["spec"][sel], o["metadata"]["labels"]), o["metadata"]["name"]


def _scraped(ha, monitor):
    """Containers a PodMonitor selects that expose its port."""
    sel = monitor["spec"]["selector"]
    ports = {ep["port"] for ep in monitor["spec"]["podMetricsEndpoints"]}
    hits = []
    for where, tmpl in M.all_pod_templates(ha):
        if M.selector_matches(sel, tmpl["metadata"]["labels"]):
            for c in tmpl["spec"]["containers"]:
                if ports & {p.get("name") for p in c.get("ports", [])}:
                    hits.append(f"{where}/{c['name']}")
    return hits


def test_ray_metrics_are_scraped_on_every_ray_pod(ha):
    hits = _scraped(ha, M.one(ha, "PodMonitor", "faceserve-ray"))
    rs = rayservice(ha)
    assert len(hits) == len(list(M.pod_templates(rs)))
    cluster = rs["spec"]["rayClusterConfig"]
    for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert g["rayStartParams"]["metrics-export-port"] == "8080"
        ports = {p["name"]: p["containerPort"] for p in container(g["template"])["ports"]}
        assert ports["metrics"] == 8080


@pytest.mark.parametrize("name", ["faceserve-redis", "faceserve-minio", "faceserve-traefik"])
def test_exporters_are_scraped(ha, name):
    assert _scraped(ha, M.one(ha, "PodMonitor", name))


def test_postgres_exporter_is_scraped(ha):
    mon = M.one(ha, "PodMonitor", "faceserve-postgres")
    # CNPG labels its instance Pods cnpg.io/cluster=<name> and names the port "metrics"
    assert mon["spec"]["selector"]["matchLabels"] == {"cnpg.io/cluster": "faceserve-pg"}
    assert mon["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_grafana_and_jaeger(ha):
    grafana = M.one(ha, "Deployment", "faceserve-grafana")
    volumes = {v["name"]: v for v in grafana["spec"]["template"]["spec"]["volumes"]}
    assert volumes["dashboards"]["configMap"]["name"] == "faceserve-grafana-dashboards"
    assert volumes["datasources"]["configMap"]["name"] == "faceserve-grafana-datasources"
    endpoint = M.one(ha, "ConfigMap", "faceserve-config")["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    host, port = re.match(r"^http://([^:/]+):(\d+)$", endpoint).groups()
    svc = M.one(ha, "Service", host)
    assert int(port) in [p["port"] for p in svc["spec"]["ports"]]


# ----------------------------------------------------------- resource limits
def _resources(c):
    r = c["resources"]
    return (cpu(r["requests"]["cpu"]), mem(r["requests"]["memory"]),
            cpu(r["limits"]["cpu"]), mem(r["limits"]["memory"]))


def test_resource_limits_of_the_table(ha):
    api = worker_groups(ha)["api"]
    assert _resources(container(api["template"])) == (0.5, 512 * MiB, 2, 2 * GiB)  # face-api
    pg = M.one(ha, "Cluster", "faceserve-pg")["spec"]
    assert _resources(pg) == (2, 2 * GiB, 2, 2 * GiB)  # postgres
    redis = M.one(ha, "StatefulSet", "faceserve-redis")["spec"]["template"]
    assert _resources(container(redis)) == (1, GiB, 1, GiB)  # redis
    traefik = M.one(ha, "Deployment", "faceserve-traefik")["spec"]["template"]
    assert _resources(container(traefik)) == (0.5, 256 * MiB, 0.5, 256 * MiB)  # ingress
    prom = M.one(ha, "Prometheus", "faceserve")["spec"]
    assert _resources(prom) == (1, GiB, 1, GiB)  # prometheus
    grafana = M.one(ha, "Deployment", "faceserve-grafana")["spec"]["template"]
    assert _resources(container(grafana)) == (0.5, 512 * MiB, 0.5, 512 * MiB)  # grafana


@pytest.mark.parametrize("name,cores", [("Detector", 0.5), ("Embedder", 1), ("Liveness", 0.5),
                                        ("Matcher", 0.5)])
def test_model_deployments_have_their_own_requests_and_limits(ha, name, cores):
    dep = deployments(ha)[name]
    assert dep["ray_actor_options"]["num_cpus"] == cores
    req_cpu, req_mem, lim_cpu, lim_mem = _resources(container(group_of_deployment(ha, name)["template"]))
    assert req_cpu == cores and lim_cpu >= cores
    assert GiB <= req_mem <= lim_mem <= 2 * GiB


def test_every_container_has_requests_and_limits(ha):
    for where, tmpl in M.all_pod_templates(ha):
        for c in tmpl["spec"]["containers"]:
            r = c.get("resources", {})
            assert {"cpu", "memory"} <= set(r.get("requests", {})), f"{where}/{c['name']}"
            assert {"cpu", "memory"} <= set(r.get("limits", {})), f"{where}/{c['name']}"
            assert cpu(r["requests"]["cpu"]) <= cpu(r["limits"]["cpu"])
            assert mem(r["requests"]["memory"]) <= mem(r["limits"]["memory"])


# --------------------------------------------------------------------- PDBs
def test_every_replicated_workload_has_a_pdb(ha):
    pdbs = M.find(ha, "PodDisruptionBudget")
    for o in ha:
        if o["kind"] in ("Deployment", "StatefulSet") and o["spec"].get("replicas", 1) > 1:
            labels = o["spec"]["template"]["metadata"]["labels"]
            assert any(M.selector_matches(p["spec"]["selector"], labels) for p in pdbs), \
                o["metadata"]["name"]
    for name, g in worker_groups(ha).items():
        labels = g["template"]["metadata"]["labels"]
        assert any(M.selector_matches(p["spec"]["selector"], labels) for p in pdbs), name
    for p in pdbs:
        assert p["spec"].get("maxUnavailable") == 1 or p["spec"].get("minAvailable")


# ------------------------------------------------------------ wiring/secrets
REQUIRED_ENV = {"DATABASE_URL", "REDIS_URL", "FACESERVE_API_KEY", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY"}
REQUIRED_CONFIG = {"FACESERVE_OBJECT_STORE_URL", "AWS_ENDPOINT_URL", "OTEL_EXPORTER_OTLP_ENDPOINT"}
GENERATED_SECRETS = {"faceserve-pg-app",  # CloudNativePG
                     "faceserve-tls"}  # cert-manager


@pytest.mark.parametrize("target", ["dev", "ha"])
def test_ray_pods_get_the_app_settings(target):
    objs = M.rendered(target)
    config = M.one(objs, "ConfigMap", "faceserve-config")["data"]
    assert REQUIRED_CONFIG <= set(config)
    assert config["FACESERVE_OBJECT_STORE_URL"] == "s3://faceserve/"
    for where, tmpl in M.pod_templates(rayservice(objs)):
        c = container(tmpl)
        assert c["image"] == f"faceserve:{M.load_module('generate').package_version()}"
        names = [e["name"] for e in c["env"]]
        assert REQUIRED_ENV <= set(names), where
        # $(REDIS_PASSWORD) in REDIS_URL only expands if defined earlier
        assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")
        assert {"configMapRef": {"name": "faceserve-config"}} in c["envFrom"]


@pytest.mark.parametrize("target", ["dev", "ha", "enroll-folder"])
def test_referenced_configmaps_exist(target):
    objs = M.rendered(target) + (M.rendered("ha") if target == "enroll-folder" else [])
    have = {o["metadata"]["name"] for o in M.find(objs, "ConfigMap")}
    for o in M.rendered(target):
        assert M.configmap_refs(o) <= have, o["metadata"]["name"]


def test_ha_commits_no_secrets_and_documents_every_one_it_needs(ha):
    assert not M.find(ha, "Secret")
    needed = set()
    for o in ha + M.rendered("enroll-folder"):
        needed |= M.secret_refs(o)
    to_create = needed - GENERATED_SECRETS
    assert to_create == {"faceserve-secrets", "faceserve-redis", "faceserve-s3",
                         "faceserve-minio-root", "faceserve-grafana-admin"}
    deploy = (ROOT / "docs" / "DEPLOY.md").read_text()
    for name in sorted(to_create):
        assert f"kubectl -n faceserve create secret generic {name}" in deploy, name


def test_dev_brings_its_own_secrets(dev):
    have = {s["metadata"]["name"]: s for s in M.find(dev, "Secret")}
    needed = set()
    for o in dev:
        needed |= M.secret_refs(o)
    assert needed - GENERATED_SECRETS <= set(have)


# --------------------------------------------------------------- dev shape
def test_dev_is_one_node_without_replication(dev):
    assert M.one(dev, "Cluster", "faceserve-pg")["spec"]["instances"] == 1
    for o in dev:
        if o["kind"] in ("Deployment", "StatefulSet"):
            assert o["spec"]["replicas"] == 1, o["metadata"]["name"]
            aff = o["spec"]["template"]["spec"].get("affinity", {})
            assert "requiredDuringSchedulingIgnoredDuringExecution" not in str(aff)
    assert not M.find(dev, "StatefulSet", "faceserve-redis-sentinel")
    assert list(worker_groups(dev)) == ["workers"]
    assert serve_config(dev) == yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    cert = M.one(dev, "Certificate", "faceserve-tls")
    assert cert["spec"]["issuerRef"]["name"] == "selfsigned"
