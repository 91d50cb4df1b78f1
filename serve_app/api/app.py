"""The app factory: one FastAPI app per ingress replica, built around an Edge.

serve.ingress() calls Ingress.__serve_build_asgi_app__ at replica start,
which calls create_app(edge); unit tests call it with fakes inside the Edge.
"""
from __future__ import annotations

import time
import uuid
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from opentelemetry.trace import SpanKind, Status, StatusCode

from serve_app import console
from serve_app.api import errors
from serve_app.api.admission import AdmissionGate
from serve_app.api.body_guard import BodyGuard
from serve_app.api.deps import Edge
from serve_app.api.routers import admin, compreface, feedback, gallery, health, jobs, recognition, rekognition
from serve_app.api.routers import crops
from serve_app.api.schemas import REQUEST_BODY_MODELS, ErrorResponse
from serve_app.metrics import ServiceMetrics
from serve_app.telemetry import access_logger, current_trace_id, mark_error, span_from

API_DESCRIPTION = """Self-hosted face recognition: detect, liveness, enrol, verify (1:1), identify (1:N).

Images go as multipart uploads (`image`, or `image1`/`image2` for verify), as JSON with
base64 strings under the same names, or as raw `image/*` bytes. Every answer carries
per-stage `timings_ms`; every error `{"error": {"code", "message", "trace_id"}}` with a
status that says what was wrong (4xx: the request; 503 + Retry-After: try again later)."""

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503)
}


def create_app(edge: Edge, metrics: ServiceMetrics | None = None, *, version: str = "0.1.0") -> FastAPI:
    app = FastAPI(title="faceserve", version=version, description=API_DESCRIPTION)
    app.state.edge = edge
    errors.install(app)
    for r in (health.router, recognition.router, gallery.router, feedback.router, jobs.router, admin.router,
              rekognition.router, compreface.router):
        app.include_router(r, responses=_ERROR_RESPONSES if r is not health.router else None)
    app.include_router(crops.router, responses=_ERROR_RESPONSES)
    console.mount(app)  # static files at /console/
    _install_observe(app, metrics)
    app.add_middleware(BodyGuard)  # nothing reads an unbounded body
    # Outermost: excess image work is refused before anything else is spent on it.
    shed = (lambda: metrics.http_responses.inc(tags={"code": "503", "route": "admission"})) if metrics else None
    app.add_middleware(AdmissionGate, limit=lambda: edge.config().max_inflight_images,
                       retry_after_s=lambda: edge.config().retry_after_s, on_shed=shed)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in REQUEST_BODY_MODELS:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        app.openapi_schema = doc
    return app.openapi_schema


def _serve_request_id() -> str | None:
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # outside a replica (unit tests) there is no context
        return None


def _install_observe(app: FastAPI, metrics: ServiceMetrics | None) -> None:
    app.add_middleware(Observe, metrics=metrics)


class Observe:
    """Root span, trace id header, Server-Timing, access log, status counter,
    and the last word on failures nothing else handled (500/503 in the
    envelope). Plain ASGI rather than BaseHTTPMiddleware: no extra task and
    stream per request on the hot path."""

    def __init__(self, app: Any, metrics: ServiceMetrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        method, path = scope.get("method", ""), scope.get("path", "")
        request_id = headers.get("x-request-id") or _serve_request_id() or uuid.uuid4().hex
        t0 = time.perf_counter()
        state: dict[str, Any] = {"status": 500, "started": False}
        with span_from(headers, f"{method} {path}", kind=SpanKind.SERVER,
                       attributes={"http.method": method, "http.target": path,
                                   "faceserve.request_id": request_id}) as sp:
            trace_id = current_trace_id()

            async def send_wrapped(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    state["status"], state["started"] = message["status"], True
                    extra = [(b"server-timing", f"total;dur={(time.perf_counter() - t0) * 1000.0:.1f}".encode())]
                    if trace_id:
                        extra.append((b"x-trace-id", trace_id.encode()))
                    message = {**message, "headers": list(message.get("headers", [])) + extra}
                await send(message)

            try:
                await self.app(scope, receive, send_wrapped)
            except Exception as exc:
                mark_error(sp, exc)
                if state["started"]:
                    raise
                response = errors.unexpected_response(exc)
                await response(scope, receive, send_wrapped)
            route = getattr(scope.get("route"), "path", "unmatched")
            sp.update_name(f"{method} {route}")
            sp.set_attribute("http.route", route)
            sp.set_attribute("http.status_code", state["status"])
            if state["status"] >= 500:
                sp.set_status(Status(StatusCode.ERROR))
        if self.metrics is not None:
            self.metrics.http_responses.inc(tags={"code": str(state["status"]), "route": route})
        if route not in ("/healthz", "/readyz"):
            access_logger().info(
                "%s %s %s", method, route, state["status"],
                extra={"request_id": request_id, "trace_id": trace_id, "route": route,
                       "method": method, "status": state["status"],
                       "duration_ms": round((time.perf_counter() - t0) * 1000.0, 2)},
            )
