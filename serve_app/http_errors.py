"""Domain errors -> HTTP statuses. The only place that knows about both.

Errors raised inside another deployment reach the ingress wrapped in Ray's
RayTaskError; `unwrap` digs the domain error back out so a bad request
that was only discovered downstream is still a 4xx with its reason.
"""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from models import errors as e

STATUS: dict[type[e.FaceServeError], int] = {
    e.InvalidRequest: 400,
    e.ImageDecodeError: 400,
    e.Unauthorized: 401,
    e.SubjectNotFound: 404,
    e.FaceNotFound: 404,
    e.CollectionNotFound: 404,
    e.Conflict: 409,
    e.ModelMismatch: 409,
    e.ImageTooLarge: 413,
    e.RateLimited: 429,
    e.UnsupportedImageType: 415,
    e.NoFaceFound: 422,
    e.MultipleFaces: 422,
    e.SpoofDetected: 422,
    e.ServiceUnavailable: 503,
    e.IndexCorrupt: 503,
    e.WeightsError: 503,
}


def status_for(err: e.FaceServeError) -> int:
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if details:
        body["error"]["details"] = details
    return body


def unwrap(exc: BaseException) -> BaseException:
    """Return the domain error inside a RayTaskError chain, if there is one."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 5:
        if isinstance(cur, e.FaceServeError):
            return cur
        cur = getattr(cur, "cause", None) or cur.__cause__
        seen += 1
    return exc


def install(app: FastAPI) -> None:
    @app.exception_handler(e.FaceServeError)
    async def _domain(_: Request, exc: e.FaceServeError) -> JSONResponse:
        details = {k: v for k, v in exc.details.items() if _jsonable(v)}
        headers = {}
        if isinstance(exc, e.RateLimited) and "retry_after_s" in details:
            headers["retry-after"] = str(details["retry_after_s"])
        return JSONResponse(
            error_body(exc.code, exc.message, details), status_code=status_for(exc), headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {"loc": list(err.get("loc", [])), "msg": err.get("msg", "")} for err in exc.errors()
        ]
        return JSONResponse(
            error_body("invalid_request", "request does not match the API", {"problems": problems}),
            status_code=400,
        )


def _jsonable(v: object) -> bool:
    return isinstance(v, (str, int, float, bool, type(None), list, dict))
