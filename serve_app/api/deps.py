"""FastAPI dependencies: the edge's state, the caller, the collection, the body.

Everything a route needs arrives through these, so the routes stay a few
lines each and tests can build the app around fakes (api/app.py create_app).
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable

from fastapi import Depends, Query, Request

from serve_app.api.body import ParsedRequest, parse_request
from serve_app.deployment_config import IngressConfig
from serve_app.errors import RateLimited, Unauthorized
from serve_app.gallery.repository import Collection
from serve_app.services.gallery import GalleryService
from serve_app.services.liveness_policy import LivenessPolicy
from serve_app.services.recognition import RecognitionService
from serve_app.timing import StageTimer


class QuotaPort:
    async def check(self, client: str, limit: int) -> Any: ...


@dataclass
class Edge:
    """What the routes share, built once per ingress replica."""

    recognition: RecognitionService
    gallery: GalleryService
    config: Callable[[], IngressConfig]
    api_key: bytes | None = None
    quota: QuotaPort | None = None
    ready: Callable[[], Any] | None = None
    observe_stages: Callable[[dict[str, float]], None] | None = None  # stage-latency metric
    extras: dict[str, Any] = field(default_factory=dict)

    def policy(self, value: Any, *, enrol: bool = False) -> LivenessPolicy:
        cfg = self.config()
        default = cfg.enrol_liveness_policy_default if enrol else cfg.liveness_policy_default
        return LivenessPolicy.parse(value, LivenessPolicy(default))


def get_edge(request: Request) -> Edge:
    return request.app.state.edge


EdgeDep = Annotated[Edge, Depends(get_edge)]


async def caller(request: Request, edge: EdgeDep) -> str:
    """The API key, then the caller's per-minute quota; returns who calls."""
    who = _authenticate(request, edge.api_key)
    limit = edge.config().requests_per_minute
    if limit > 0 and edge.quota is not None:
        decision = await edge.quota.check(who, limit)
        if not decision.allowed:
            raise RateLimited(
                f"more than {limit} requests a minute from this client; retry later",
                limit=limit, retry_after_s=decision.retry_after_s,
            )
    return who


def _authenticate(request: Request, api_key: bytes | None) -> str:
    if api_key is None:
        host = request.client.host if request.client else "unknown"
        return f"ip:{host}"
    supplied = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if not supplied and auth.lower().startswith("bearer "):
        supplied = auth[7:]
    if not hmac.compare_digest(supplied.encode(), api_key):
        raise Unauthorized("missing or wrong API key (X-API-Key header or Bearer token)")
    return "key:" + hashlib.sha256(supplied.encode()).hexdigest()[:16]


Caller = Annotated[str, Depends(caller)]


async def collection(edge: EdgeDep, _: Caller,
                     collection: Annotated[str | None, Query(max_length=128)] = None) -> Collection:
    return await edge.gallery.collection(collection)


CollectionDep = Annotated[Collection, Depends(collection)]


@dataclass
class ImageRequest:
    """An admitted image request: its clock (started after admission) and body."""

    timer: StageTimer
    body: ParsedRequest


async def image_request(request: Request, edge: EdgeDep, _: Caller) -> ImageRequest:
    timer = StageTimer()
    with timer.stage("read"):  # a slow upload shows here, not in the models' stages
        body = await parse_request(request, max_bytes=edge.config().max_image_bytes)
    if edge.observe_stages is not None:
        edge.observe_stages({"read": timer.timings_ms["read"]})
    return ImageRequest(timer, body)


ImageReq = Annotated[ImageRequest, Depends(image_request)]
