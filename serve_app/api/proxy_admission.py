"""Admission in Ray Serve's HTTP proxy: shed excess image requests before the Ray hop.

The ingress's AdmissionGate answers the excess at once, but only after the
proxy has parsed the request and handed it to an ingress replica over Ray:
under 12x overload that hop, made for requests that are then refused, took
most of a core and slowed the refusals themselves (benchmarks/overload.py).
Serve lets a deployment add Starlette middleware to its proxies through
RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (set by serve_app.cluster.ray_env
and k8s/base/config.yaml), so the same gate runs here too, counting the
image requests this proxy has in flight. The ingress gate stays as the
second line (several proxies may feed one replica).
"""
from __future__ import annotations

import logging
import os

from starlette.middleware import Middleware

from serve_app.api.admission import AdmissionGate

ENV_LIMIT = "FACESERVE_PROXY_MAX_INFLIGHT_IMAGES"
# The ingress's default max_inflight_images on one node with one ingress
# replica (the embedded default); k8s sets its own. 0 turns the proxy gate off.
DEFAULT_LIMIT = 4
RETRY_AFTER_S = 1

log = logging.getLogger("ray.serve")


def proxy_limit() -> int:
    raw = os.environ.get(ENV_LIMIT, "").strip()
    try:
        return max(0, int(raw)) if raw else DEFAULT_LIMIT
    except ValueError:
        log.warning("%s=%r is not a whole number; using %d", ENV_LIMIT, raw, DEFAULT_LIMIT)
        return DEFAULT_LIMIT


def middlewares() -> list[Middleware]:
    """The proxy callback: Ray Serve calls this once per proxy at start."""
    limit = proxy_limit()
    if limit == 0:
        return []
    log.info("faceserve proxy admission: at most %d image requests in flight", limit)
    return [Middleware(AdmissionGate, limit=lambda: limit, retry_after_s=lambda: RETRY_AFTER_S)]
