"""Errors -> HTTP answers. The only place that knows about both.

Every answer that is not a success, 404 and 405 and unexpected failures
included, is ``{"error": {"code", "message", "details"?, "trace_id"}}``.
Dependency outages (Postgres, object storage, Redis) are 503 with
Retry-After, because retrying later helps; a bug is a 500 with the trace id
to find it by, never a stack trace.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.images import ImageError, ImageTooLarge, ImageUnreadable, ImageUnsupported
from serve_app import errors as e
from serve_app.telemetry import current_trace_id

log = logging.getLogger("ray.serve")

STATUS: dict[type[BaseException], int] = {
    e.InvalidRequest: 400,
    e.ImageUnreadable: 400,
    e.Unauthorized: 401,
    e.Forbidden: 403,
    e.NotFound: 404,
    e.Conflict: 409,
    e.PayloadTooLarge: 413,
    e.UnsupportedMediaType: 415,
    e.NoFaceFound: 422,
    e.MultipleFaces: 422,
    e.SpoofDetected: 422,
    e.LowQuality: 422,
    e.IdempotencyKeyReused: 422,
    e.RateLimited: 429,
    e.CallerError: 400,
    e.ServiceUnavailable: 503,
    e.ModelUnavailable: 503,
    e.IndexCorrupt: 503,
    e.InternalFault: 500,
    ImageUnreadable: 400,
    ImageUnsupported: 415,
    ImageTooLarge: 413,
}


def status_for(err: BaseException) -> int:
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if details:
        body["error"]["details"] = details
    trace_id = current_trace_id()
    if trace_id:
        body["error"]["trace_id"] = trace_id
    return body


def error_response(status: int, code: str, message: str, details: dict[str, Any] | None = None,
                   retry_after_s: int | None = None) -> JSONResponse:
    headers = {"retry-after": str(retry_after_s)} if retry_after_s else None
    return JSONResponse(error_body(code, message, details), status_code=status, headers=headers)


def outage(exc: BaseException) -> e.ServiceUnavailable | None:
    """A dependency failure that should be a 503, or None (serve_app.errors)."""
    return e.dependency_outage(exc)


def _jsonable(v: object) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))


def _domain_response(exc: e.ServiceError | ImageError) -> JSONResponse:
    details = {k: v for k, v in exc.details.items() if _jsonable(v)}
    retry = details.pop("retry_after_s", None)
    status = status_for(exc)
    return error_response(status, exc.code, exc.message, details,
                          retry_after_s=int(retry) if retry is not None and (status in (409, 429, 503)) else None)


def install(app: FastAPI) -> None:
    @app.exception_handler(e.ServiceError)
    async def _service(_: Request, exc: e.ServiceError) -> JSONResponse:
        return _domain_response(exc)

    @app.exception_handler(ImageError)
    async def _image(_: Request, exc: ImageError) -> JSONResponse:
        return _domain_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"loc": [str(p) for p in err.get("loc", [])], "msg": str(err.get("msg", ""))}
                    for err in exc.errors()]
        return error_response(400, "invalid_request", "request does not match the API", {"problems": problems})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed",
                413: "payload_too_large", 415: "unsupported_media_type"}.get(exc.status_code, "http_error")
        message = {404: "no such route", 405: "method not allowed on this route"}.get(
            exc.status_code, str(exc.detail))
        resp = error_response(exc.status_code, code, message)
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp



def unexpected_response(exc: BaseException) -> JSONResponse:
    """For what no handler took (called by the edge middleware): an outage is
    a 503, anything else a 500 in the envelope, logged with its traceback."""
    down = outage(exc)
    if down is not None:
        log.warning("dependency outage: %s: %s", type(exc).__name__, exc)
        return _domain_response(down)
    log.error("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "the service failed to answer; report the trace id")
