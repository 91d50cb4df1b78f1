"""Alert rules and Prometheus config: promtool checks plus structure checks.

* ``promtool check rules`` / ``promtool test rules`` / ``promtool check config``
  (Debian package ``prometheus``; skipped when missing, a failure with CI=true);
* every alert has severity, summary, description and a runbook_url whose
  anchor exists in docs/RUNBOOK.md;
* every metric and label name in the rules and in the promtool test inputs is
  in monitoring/metrics_catalog.yml;
* every alert has a promtool case where it fires and one where it stays
  silent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from .promtool_util import (
    CATALOG_PATH,
    PROMETHEUS_CONFIG,
    REPO,
    RULE_TESTS_DIR,
    RULES_PATH,
    RUNBOOK_PATH,
    catalog_metrics,
    catalog_sample_index,
    allowed_labels,
    check_expr_against_catalog,
    label_names,
    metric_names,
    require_binary,
    run_tool,
    runbook_anchors,
)

EXPECTED_ALERTS = {
    "APIDown": "critical",
    "HighErrorRate": "critical",
    "HighLatency": "warning",
    "LivenessFailure": "warning",
    "VerificationFailure": "critical",
    "DBPoolExhausted": "warning",
    "RedisMemoryHigh": "warning",
    "MatcherStale": "critical",
    "ErasureBacklog": "warning",
}


def _rules() -> list[dict]:
    doc = yaml.safe_load(RULES_PATH.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _alerts() -> dict[str, dict]:
    return {r["alert"]: r for r in _rules() if "alert" in r}


def _rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS_DIR.glob("*.yml"))


# --------------------------------------------------------------------------
# promtool
# --------------------------------------------------------------------------


def test_promtool_check_rules():
    promtool = require_binary("promtool")
    proc = run_tool([promtool, "check", "rules", str(RULES_PATH.relative_to(REPO))])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in proc.stdout


def test_promtool_test_rules():
    promtool = require_binary("promtool")
    files = [str(p.relative_to(REPO)) for p in _rule_test_files()]
    assert files, "no promtool test files in monitoring/rules/tests"
    proc = run_tool([promtool, "test", "rules", *files])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("SUCCESS") == len(files), proc.stdout


def test_promtool_check_config():
    promtool = require_binary("promtool")
    proc = run_tool([promtool, "check", "config", str(PROMETHEUS_CONFIG.relative_to(REPO))])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is valid prometheus config file syntax" in proc.stdout


def test_ray_service_discovery_file_is_understood(tmp_path):
    """The cluster job reads a file in the format Ray's head node writes."""
    promtool = require_binary("promtool")
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    sd_path = jobs["ray"]["file_sd_configs"][0]["files"][0]
    assert sd_path.endswith("prom_metrics_service_discovery.json")
    # What ray._private.metrics_agent.PrometheusServiceDiscoveryWriter writes.
    sd_file = tmp_path / "prom_metrics_service_discovery.json"
    sd_file.write_text(json.dumps(
        [{"labels": {"job": "ray"}, "targets": ["10.0.0.5:8080", "10.0.0.6:8080", "10.0.0.5:44217"]}]
    ))
    text = PROMETHEUS_CONFIG.read_text().replace(sd_path, str(sd_file))
    text = text.replace("rules/face-recognition-rules.yml", str(RULES_PATH))
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(text)
    proc = run_tool([promtool, "check", "service-discovery", "--timeout=1s", str(cfg), "ray"],
                    cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    targets = json.loads(proc.stdout[proc.stdout.index("["): proc.stdout.rindex("]") + 1])
    got = sorted(t["labels"]["instance"] for t in targets)
    assert got == ["10.0.0.5:44217", "10.0.0.5:8080", "10.0.0.6:8080"]
    assert {t["labels"]["job"] for t in targets} == {"ray"}


# --------------------------------------------------------------------------
# structure, no promtool needed
# --------------------------------------------------------------------------


def test_exactly_the_expected_alerts():
    alerts = _alerts()
    assert sorted(alerts) == sorted(EXPECTED_ALERTS)
    assert len([r for r in _rules() if "alert" in r]) == len(EXPECTED_ALERTS)


@pytest.mark.parametrize("name", sorted(EXPECTED_ALERTS))
def test_alert_has_labels_and_annotations(name):
    rule = _alerts()[name]
    assert rule["labels"]["severity"] == EXPECTED_ALERTS[name]
    ann = rule["annotations"]
    for key in ("summary", "description", "runbook_url"):
        assert ann.get(key, "").strip(), f"{name}: annotation {key} missing"
    m = re.fullmatch(r"docs/RUNBOOK\.md#([\w-]+)", ann["runbook_url"])
    assert m, f"{name}: runbook_url must be docs/RUNBOOK.md#<anchor>, got {ann['runbook_url']}"
    assert m.group(1) in runbook_anchors(), f"{name}: no heading for #{m.group(1)} in {RUNBOOK_PATH}"


def test_api_down_waits_two_minutes():
    assert _alerts()["APIDown"]["for"] == "2m"


@pytest.mark.parametrize("name", sorted(EXPECTED_ALERTS))
def test_rule_metrics_and_labels_are_in_catalog(name):
    expr = _alerts()[name]["expr"]
    problems = check_expr_against_catalog(expr, name)
    assert not problems, "\n".join(problems)


def test_every_catalog_entry_is_well_formed():
    catalog = catalog_metrics()
    assert catalog, CATALOG_PATH
    for name, entry in catalog.items():
        assert entry["type"] in {"counter", "gauge", "histogram"}, name
        assert entry["source"] in {"faceserve", "ray_serve", "prometheus"}, name
        if entry["type"] == "counter":
            assert name.endswith("_total"), f"{name}: Ray exposes counters as <name>_total"
        if entry["source"] == "faceserve":
            assert name.startswith("ray_faceserve_"), name
            assert {"application", "deployment", "replica"} <= set(entry["labels"]), name
        if entry["source"] == "ray_serve":
            assert name.startswith("ray_serve_"), name
        if entry["source"] != "prometheus":
            assert entry.get("exported_when") in {
                "always", "after_request", "after_error", "after_exception", "after_batch", "after_use",
            }, name


def _parse_series(series: str) -> tuple[str, set[str]]:
    m = re.fullmatch(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{.*\})?\s*", series)
    assert m, series
    labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*=", m.group(2) or ""))
    return m.group(1), labels


def test_rule_test_inputs_use_catalog_names():
    index = catalog_sample_index()
    problems = []
    for path in _rule_test_files():
        doc = yaml.safe_load(path.read_text())
        for case in doc["tests"]:
            for s in case.get("input_series", []):
                name, labels = _parse_series(s["series"])
                if name not in index:
                    problems.append(f"{path.name}: {name} not in catalog")
                    continue
                bad = labels - allowed_labels(name, index)
                if bad:
                    problems.append(f"{path.name}: {name} has no label(s) {sorted(bad)} in the catalog")
    assert not problems, "\n".join(problems)


def test_every_alert_has_a_firing_and_a_silent_case():
    fired: set[str] = set()
    silent: set[str] = set()
    for path in _rule_test_files():
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../face-recognition-rules.yml"], path
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    assert fired >= set(EXPECTED_ALERTS), f"no firing case for {set(EXPECTED_ALERTS) - fired}"
    assert silent >= set(EXPECTED_ALERTS), f"no silent case for {set(EXPECTED_ALERTS) - silent}"


def test_promql_name_scanner():
    expr = (
        'histogram_quantile(0.95, sum by (application, le) (rate(a_bucket{route!~"/-/.*", x="sum(b)"}[5m])))'
        ' > 2e3 and on (application) sum without (y) (increase(c_total[5m] offset 1m)) >= 20'
        " or label_replace(vector(0), \"r\", \"v\", \"\", \"\") or count(d == 2) / e:rec"
    )
    assert metric_names(expr) == {"a_bucket", "c_total", "d", "e:rec"}
    assert label_names(expr) == {"application", "le", "route", "x", "y"}


def test_erasure_backlog_reads_the_sweepers_gauge():
    """Without promtool too: the rule reads the gauge the sweeper sets
    (serve_app/metrics.py, named with Ray's ray_ prefix), aggregated over
    the Ingress replicas that all report the same table."""
    from serve_app.metrics import ServiceMetrics

    expr = _alerts()["ErasureBacklog"]["expr"]
    assert metric_names(expr) == {"ray_faceserve_erasure_outbox_oldest_seconds"}
    assert "max by (application)" in expr and re.search(r">\s*900\b", expr)
    src = (REPO / "serve_app" / "metrics.py").read_text()
    assert '"faceserve_erasure_outbox_oldest_seconds"' in src and '"faceserve_erasure_outbox_due"' in src
    assert {"erasure_outbox_due", "erasure_outbox_oldest"} <= set(vars(ServiceMetrics))
    catalog = catalog_metrics()
    for name in ("ray_faceserve_erasure_outbox_due", "ray_faceserve_erasure_outbox_oldest_seconds"):
        assert catalog[name]["type"] == "gauge" and catalog[name]["labels"]["deployment"] == ["Ingress"]
