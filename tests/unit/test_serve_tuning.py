"""Serve settings on the request path."""
from __future__ import annotations

from pathlib import Path

import yaml


ROOT = Path(__file__).resolve().parents[2]


def test_internal_hops_do_not_write_access_logs() -> None:
    cfg = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    deps = {d["name"]: d for d in cfg["applications"][0]["deployments"]}
    for name in ("Detector", "Embedder", "Liveness", "Matcher"):
        assert deps[name]["logging_config"]["enable_access_log"] is False, name
    assert "logging_config" not in deps["Ingress"]  # the edge keeps its access log
