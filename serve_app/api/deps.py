"""FastAPI dependencies: the edge's state, the caller, the collection, the body.

Everything a route needs arrives through these, so the routes stay a few
lines each and tests can build the app around fakes (api/app.py create_app).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Any, Callable

from fastapi import Depends, Query, Request

from serve_app.api.body import ParsedRequest, parse_request
from serve_app.deployment_config import IngressConfig
from serve_app.errors import RateLimited
from serve_app.gallery.repository import Collection
from serve_app.services.access import Authenticator, Principal, quota_subject, stronger_policy
from serve_app.services.gallery import GalleryService
from serve_app.services.liveness_policy import LivenessPolicy
from serve_app.services.recognition import RecognitionService
from serve_app.telemetry import current_trace_id
from serve_app.timing import StageTimer

log = logging.getLogger("ray.serve")


class QuotaPort:
    async def check(self, client: str, limit: int) -> Any: ...


@dataclass
class Edge:
    """What the routes share, built once per ingress replica."""

    recognition: RecognitionService
    gallery: GalleryService
    config: Callable[[], IngressConfig]
    auth: Authenticator
    quota: QuotaPort | None = None
    access: Any = None  # AccessRepository: keys, tenants, audit (admin routes)
    calibration: Any = None  # models.calibration.Calibration of the running embedder, if there is one
    feedback: Any = None  # services.feedback.FeedbackService
    ready: Callable[[], Any] | None = None
    observe_stages: Callable[[dict[str, float]], None] | None = None  # stage-latency metric
    idempotency: Any = None  # idempotency.Idempotency (Redis); None: Idempotency-Key is not enforced
    subject_keys: Any = None  # embedding_cache.SubjectKeys: Redis keys tied to a subject, for erasure

    def policy(self, value: Any) -> LivenessPolicy:
        return LivenessPolicy.parse(value, LivenessPolicy(self.config().liveness_policy_default))

    async def enrol_policy(self, value: Any, principal: Principal) -> LivenessPolicy:
        """The caller's choice (or the default), never weaker than the tenant's minimum."""
        asked = LivenessPolicy.parse(value, LivenessPolicy(self.config().enrol_liveness_policy_default))
        minimum = (await self.auth.tenant(principal.tenant)).min_enrol_liveness
        return LivenessPolicy(stronger_policy(asked.value, minimum))

    async def audit(self, principal: Principal, action: str, target: str = "", **details: Any) -> None:
        """Record a write; a failure to record is logged, the write has happened."""
        if self.access is None:
            return
        try:
            await self.access.audit(principal.tenant, principal.actor, action, target,
                                    trace_id=current_trace_id(), details=details or None)
        except Exception:
            log.exception("audit record failed: %s %s by %s", action, target, principal.actor)


def get_edge(request: Request) -> Edge:
    return request.app.state.edge


EdgeDep = Annotated[Edge, Depends(get_edge)]


async def principal(request: Request, edge: EdgeDep,
                    tenant: Annotated[str | None, Query(max_length=64)] = None) -> Principal:
    """The caller (key, tenant, scopes), then its quotas: per key and per tenant."""
    host = request.client.host if request.client else "unknown"
    who = (await edge.auth.authenticate(request.headers, host)).acting_for(tenant)
    await charge_quota(edge, who)
    return who


async def charge_quota(edge: Edge, who: Principal) -> None:
    """Per key, then per tenant (429 + Retry-After); every API surface calls this."""
    if edge.quota is None:
        return
    key_limit = who.requests_per_minute or edge.config().requests_per_minute
    tenant_limit = (await edge.auth.tenant(who.tenant)).requests_per_minute
    for subject, limit, what in ((quota_subject(who), key_limit, "this key"),
                                 (f"tenant:{who.tenant}", tenant_limit, "this tenant")):
        if limit > 0:
            decision = await edge.quota.check(subject, limit)
            if not decision.allowed:
                raise RateLimited(f"more than {limit} requests a minute from {what}; retry later",
                                  limit=limit, retry_after_s=decision.retry_after_s)


def require(scope: str) -> Callable[..., Any]:
    async def dep(who: Annotated[Principal, Depends(principal)]) -> Principal:
        who.require(scope)
        return who

    return dep


Reader = Annotated[Principal, Depends(require("read"))]
Enroller = Annotated[Principal, Depends(require("enrol"))]
Admin = Annotated[Principal, Depends(require("admin"))]


async def read_collection(edge: EdgeDep, who: Reader,
                          collection: Annotated[str | None, Query(max_length=128)] = None) -> Collection:
    return await edge.gallery.collection(collection, tenant=who.tenant)


async def enrol_collection(edge: EdgeDep, who: Enroller,
                           collection: Annotated[str | None, Query(max_length=128)] = None) -> Collection:
    return await edge.gallery.collection(collection, tenant=who.tenant)


ReadCollection = Annotated[Collection, Depends(read_collection)]
EnrolCollection = Annotated[Collection, Depends(enrol_collection)]


@dataclass
class ImageRequest:
    """An admitted image request: its clock (started after admission) and body."""

    timer: StageTimer
    body: ParsedRequest


async def image_request(request: Request, edge: EdgeDep) -> ImageRequest:
    timer = StageTimer()
    with timer.stage("read"):  # a slow upload shows here, not in the models' stages
        body = await parse_request(request, max_bytes=edge.config().max_image_bytes)
    if edge.observe_stages is not None:
        edge.observe_stages({"read": timer.timings_ms["read"]})
    return ImageRequest(timer, body)


ImageReq = Annotated[ImageRequest, Depends(image_request)]
