"""Grafana provisioning and dashboards.

Every panel query must
  * name only metrics (and labels) listed in monitoring/metrics_catalog.yml,
  * parse: it is sent to a real ``prometheus`` (Debian package) started on
    127.0.0.1 with a temporary storage directory; a parse error is a 400,
  * return data on a synthetic data set built from the catalog (backfilled
    with ``promtool tsdb create-blocks-from openmetrics``), so a query that
    filters on a label value the app never emits shows up as empty.

The same server loads the alert rules and must evaluate all of them without
error on that data. Without the binaries the server tests skip, except with
CI=true, where they fail.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import yaml

from .promtool_util import (
    DASHBOARDS_DIR,
    PROVISIONING_DIR,
    RULES_PATH,
    allowed_labels,
    backfill,
    catalog_sample_index,
    check_expr_against_catalog,
    iter_panels,
    metric_names,
    prometheus_server,
    require_binary,
    substitute_grafana_variables,
    synthetic_openmetrics,
)

DASHBOARD_FILES = sorted(DASHBOARDS_DIR.glob("*.json"))
DATASOURCES_FILE = PROVISIONING_DIR / "datasources" / "prometheus.yml"
PROVIDERS_DIR = PROVISIONING_DIR / "dashboards"

# Values for the dashboards' template variables during the tests.
VARIABLES = {"application": "faceserve", "datasource": "prometheus"}


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _targets() -> list[tuple[str, dict, dict]]:
    """(test id, panel, target) for every query target of every dashboard."""
    out = []
    for path in DASHBOARD_FILES:
        for panel in iter_panels(_load(path).get("panels", [])):
            for target in panel.get("targets") or []:
                out.append((f"{path.stem}:{panel['id']}:{target.get('refId')}", panel, target))
    return out


TARGETS = _targets()


def _expr(target: dict) -> str:
    return substitute_grafana_variables(target["expr"], VARIABLES)


# --------------------------------------------------------------------------
# provisioning and dashboard structure
# --------------------------------------------------------------------------


def _datasource() -> dict:
    doc = yaml.safe_load(DATASOURCES_FILE.read_text(encoding="utf-8"))
    assert doc["apiVersion"] == 1
    sources = [d for d in doc["datasources"] if d["type"] == "prometheus"]
    assert len(sources) == 1, sources
    return sources[0]


def test_datasource_provisioning():
    ds = _datasource()
    assert ds["uid"] and ds["url"].startswith("http")
    assert ds["access"] == "proxy"
    assert ds.get("isDefault") is True


def test_dashboard_provider_provisioning():
    providers = []
    for path in sorted(PROVIDERS_DIR.glob("*.y*ml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert doc["apiVersion"] == 1, path
        providers += doc["providers"]
    assert providers, f"no dashboard provider yaml in {PROVIDERS_DIR}"
    for provider in providers:
        assert provider["type"] == "file"
        assert provider["options"]["path"].startswith("/"), provider


def test_there_is_a_dashboard():
    assert DASHBOARD_FILES, f"no dashboard JSON in {DASHBOARDS_DIR}"
    assert TARGETS


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_structure(path):
    dash = _load(path)
    assert dash["uid"] and dash["title"]
    assert isinstance(dash.get("schemaVersion"), int)
    panels = list(iter_panels(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    uid = _datasource()["uid"]
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            ds = target.get("datasource") or panel.get("datasource")
            assert ds and ds["uid"] in {uid, "${datasource}"}, (panel["title"], ds)
            assert target.get("expr", "").strip(), panel["title"]
    for var in dash.get("templating", {}).get("list", []):
        assert var["name"] in VARIABLES, f"add a test value for ${var['name']} to VARIABLES"


def test_dashboard_covers_what_operators_need():
    """The panels the observability issue asks for, by the metrics they use."""
    exprs = [_expr(t) for _, _, t in TARGETS]

    def used(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    required = {
        "request rate": r"rate\(ray_serve_num_http_requests_total",
        "request rate per deployment": r"by \(deployment\) \(rate\(ray_serve_deployment_request_counter_total",
        "5xx error rate": r'status_code=~"5\.\."',
        "error counts per deployment": r"ray_serve_num_deployment_http_error_requests_total",
        "proxy latency": r"ray_serve_http_request_latency_ms_bucket",
        "replicas per deployment": r"by \(deployment\) \(ray_serve_deployment_replica_healthy",
        "queue length per deployment": r"ray_serve_deployment_queued_queries",
        "batch queue length": r"ray_serve_batch_queue_length",
        "batch sizes": r"ray_serve_actual_batch_size_(bucket|sum|count)",
        "liveness outcomes": r"by \(outcome\) \(rate\(ray_faceserve_liveness_checks_total",
        "verification outcomes": r"by \(outcome\) \(rate\(ray_faceserve_verifications_total",
        "DB pool": r"ray_faceserve_db_pool_in_use.*ray_faceserve_db_pool_size",
        "Redis memory": r"ray_faceserve_redis_used_memory_bytes.*ray_faceserve_redis_maxmemory_bytes",
    }
    missing = [what for what, pattern in required.items() if not used(pattern)]
    assert not missing, f"no panel for: {missing}"
    for q in ("0.5", "0.95", "0.99"):
        assert used(rf"histogram_quantile\({q}, sum by \(deployment, le\) \(rate\(ray_serve_deployment_processing_latency_ms_bucket"), q
        assert used(rf"histogram_quantile\({q}, sum by \(stage, le\) \(rate\(ray_faceserve_stage_latency_ms_bucket"), q


@pytest.mark.parametrize("tid,panel,target", TARGETS, ids=[t[0] for t in TARGETS])
def test_query_names_catalog_metrics(tid, panel, target):
    expr = _expr(target)
    problems = check_expr_against_catalog(expr, f"{tid} ({panel['title']})")
    names = metric_names(expr)
    index = catalog_sample_index()
    pool = set().union(*(allowed_labels(n, index) for n in names if n in index))
    for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
        if label not in pool:
            problems.append(f"{tid}: legend uses label {label!r} that the query cannot have")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_template_variable_queries_use_catalog(path):
    index = catalog_sample_index()
    for var in _load(path).get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)\s*,\s*(\w+)\s*\)\s*", query)
        assert m, f"${var['name']}: expected label_values(metric, label), got {query!r}"
        metric, label = m.groups()
        assert metric in index, metric
        assert label in allowed_labels(metric, index), (metric, label)


# --------------------------------------------------------------------------
# against a real Prometheus
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prom(tmp_path_factory):
    require_binary("promtool")
    require_binary("prometheus")
    work = tmp_path_factory.mktemp("prom")
    # Data up to a minute ago; queries are evaluated at `end`.
    end = float(int(time.time() // 60 * 60 - 60))
    backfill(synthetic_openmetrics(end - 30 * 60, end), work / "data", work)
    config = {
        "global": {"scrape_interval": "1h", "evaluation_interval": "1s"},
        "rule_files": ["rules.yml"],
    }
    with prometheus_server(
        config, storage=work / "data",
        extra_files={"rules.yml": RULES_PATH.read_text(encoding="utf-8")},
    ) as server:
        server.end = end
        yield server


def test_synthetic_data_is_loaded(prom):
    status, body = prom.query("count(ray_serve_deployment_replica_healthy)", prom.end)
    assert status == 200 and body["data"]["result"], body


def test_a_parse_error_is_reported(prom):
    """Guards the test below: a broken query must come back as a 400."""
    status, body = prom.query("sum(rate(ray_serve_num_http_requests_total[5m])", prom.end)
    assert status == 400 and body["errorType"] == "bad_data", body


@pytest.mark.parametrize("tid,panel,target", TARGETS, ids=[t[0] for t in TARGETS])
def test_query_parses_and_returns_data(prom, tid, panel, target):
    expr = _expr(target)
    status, body = prom.query(expr, prom.end)
    assert status == 200, f"{panel['title']}: {body.get('error')}\n{expr}"
    assert body["status"] == "success", body
    assert body["data"]["result"], f"{panel['title']}: no data on the catalog's series\n{expr}"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_template_variable_queries_return_values(prom, path):
    for var in _load(path).get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        metric, label = re.fullmatch(r"\s*label_values\(\s*([\w:]+)\s*,\s*(\w+)\s*\)\s*", query).groups()
        status, body = prom.get(f"/api/v1/label/{label}/values", {
            "match[]": metric, "start": f"{prom.end - 3600}", "end": f"{prom.end}",
        })
        assert status == 200, body
        assert VARIABLES[var["name"]] in body["data"], body


def test_alert_rules_evaluate_without_errors(prom):
    deadline = time.monotonic() + 30
    rules = []
    while time.monotonic() < deadline:
        status, body = prom.get("/api/v1/rules")
        assert status == 200, body
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        if rules and all(r.get("health") != "unknown" for r in rules):  # all evaluated
            break
        time.sleep(0.2)
    assert len(rules) == 9, rules
    bad = {r["name"]: r.get("lastError") for r in rules if r.get("health") != "ok"}
    assert not bad, bad
