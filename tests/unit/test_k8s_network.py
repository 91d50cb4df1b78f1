"""NetworkPolicies: only the ingress reaches Serve, only operators the dashboard and job API."""
from __future__ import annotations

import pytest

from tests.unit.k8s_support import manifests

M = manifests()


def _allowed(policies: list[dict], pod_labels: dict, port: int) -> list[dict]:
    """The `from` peers that may reach a pod with these labels on this port."""
    peers = []
    for p in policies:
        if not M.selector_matches(p["spec"]["podSelector"], pod_labels):
            continue
        for rule in p["spec"].get("ingress", []):
            ports = {pp["port"] for pp in rule.get("ports", [])}
            if not ports or port in ports:
                peers += rule.get("from", [])
    return peers


@pytest.mark.parametrize("target", ["dev", "ha"])
def test_serve_and_dashboard_are_fenced(target: str) -> None:
    objs = M.rendered(target)
    policies = M.find(objs, "NetworkPolicy")
    head = {"app.kubernetes.io/component": "ray-head"}
    worker = {"app.kubernetes.io/component": "ray-worker"}
    traefik = {"app.kubernetes.io/name": "traefik"}
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    operator = {"faceserve.io/operator": "true"}
    stranger = {"app.kubernetes.io/name": "grafana"}

    def reaches(src: dict, dst: dict, port: int) -> bool:
        return any("podSelector" in peer and M.selector_matches(peer["podSelector"], src)
                   for peer in _allowed(policies, dst, port))

    for pod in (head, worker):
        assert _allowed(policies, pod, 8000), "ray pods must be selected (isolated) by a policy"
        assert reaches(traefik, pod, 8000) and not reaches(stranger, pod, 8000)
        assert reaches(prometheus, pod, 8080) and not reaches(traefik, pod, 8080)
        assert reaches(head, pod, 6379) and reaches(worker, pod, 6379)  # Ray's own traffic
    for port in (8265, 10001):
        assert reaches(operator, head, port)
        assert not reaches(traefik, head, port) and not reaches(stranger, head, port)
        assert not reaches(prometheus, head, port)
