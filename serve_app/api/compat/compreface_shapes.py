"""CompreFace's answer shapes and errors from faceserve's values.

- box: ``{"probability", "x_min", "y_min", "x_max", "y_max"}`` in whole pixels;
- similarity 0..1: the Rekognition map (aws.similarity_to_percent) / 100, so
  the service's decision threshold reads 0.8 and 1.0 is identical faces;
- errors: ``{"message", "code"}`` with CompreFace's statuses (400 for the
  caller's errors, 404 for unknown subjects/images, 401 for a bad key).
"""
from __future__ import annotations

from typing import Any

from models.images import ImageError
from serve_app import errors as e
from serve_app.api.compat.aws import similarity_to_percent
from serve_app.api.errors import outage, status_for

# CompreFace's error codes where it has one for the same condition; 0 = any other.
_CODES: tuple[tuple[type[BaseException], int, int], ...] = (
    (e.NoFaceFound, 400, 28),  # "No face is found in the given image"
    (e.Unauthorized, 401, 0),
    (e.Forbidden, 403, 0),
    (e.NotFound, 404, 0),
    (e.RateLimited, 429, 0),
)


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, {"message", "code"}) for an error raised while serving a CompreFace call."""
    if not isinstance(exc, (e.ServiceError, ImageError)):
        exc = outage(exc) or exc
    for cls, status, code in _CODES:
        if isinstance(exc, cls):
            return status, {"message": _msg(exc), "code": code}
    status = status_for(exc)
    if status >= 500:
        return status, {"message": _msg(exc) if isinstance(exc, e.ServiceError) else "Something went wrong",
                        "code": 0}
    return 400, {"message": _msg(exc), "code": 0}


def _msg(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or exc) or type(exc).__name__


def box(face: Any) -> dict[str, Any]:
    x1, y1, x2, y2 = face.box
    return {"probability": round(float(face.score), 5), "x_min": int(round(x1)), "y_min": int(round(y1)),
            "x_max": int(round(x2)), "y_max": int(round(y2))}


def similarity(cosine: float, threshold: float) -> float:
    return round(similarity_to_percent(cosine, threshold) / 100.0, 5)


def face_result(face: Any, plugins: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"box": box(face)}
    if "landmarks" in plugins:
        out["landmarks"] = [[int(round(float(x))), int(round(float(y)))] for x, y in face.landmarks]
    return out


def plugins_of(value: Any) -> set[str]:
    return {p.strip() for p in str(value or "").split(",") if p.strip()}


PLUGINS_VERSIONS = {"detector": "faceserve", "calculator": "faceserve"}
