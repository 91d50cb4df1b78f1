"""The environment `ray start` gets: HAProxy in front of direct-ingress
replicas, with per-cluster ports so clusters on one host do not collide."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve_app import cluster

ROOT = Path(__file__).resolve().parents[2]

_HAPROXY_KEYS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", *_HAPROXY_KEYS):
        monkeypatch.delenv(key, raising=False)


def test_haproxy_is_on_by_default_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    env = cluster.ray_env()
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) < 30
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    assert cluster.ray_env()["RAY_SERVE_ENABLE_HA_PROXY"] == "0"


def test_default_ports_are_rays_and_others_keep_the_offsets() -> None:
    default = cluster.ray_env(cluster.ClusterPorts())
    assert (default["RAY_SERVE_HAPROXY_STATS_PORT"], default["RAY_SERVE_HAPROXY_METRICS_PORT"]) == ("8404", "9101")
    env = cluster.ray_env(cluster.ClusterPorts(http=18000))
    assert (env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]) == ("18404", "19101")
    explicit = cluster.ClusterPorts(http=18000, haproxy_stats=1, haproxy_metrics=2)
    assert cluster.ray_env(explicit)["RAY_SERVE_HAPROXY_STATS_PORT"] == "1"
    # Without a cluster's ports (ray stop, serve deploy) nothing port-bound is set.
    assert not set(_HAPROXY_KEYS) & set(cluster.ray_env())


def test_the_repos_clusters_use_distinct_ports() -> None:
    from benchmarks import bulk_enroll, live_app
    from tests.integration import conftest

    sets = [conftest.PORTS, live_app.PORTS, bulk_enroll.PORTS, cluster.ClusterPorts()]
    used: list[int] = []
    for p in sets:
        used += [p.gcs, p.dashboard, p.metrics, p.http, p.haproxy_stats_port, p.haproxy_metrics_port]
    assert len(used) == len(set(used))


def test_k8s_runs_haproxy_too() -> None:
    config = yaml.safe_load((ROOT / "k8s" / "base" / "config.yaml").read_text())
    assert config["data"]["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
