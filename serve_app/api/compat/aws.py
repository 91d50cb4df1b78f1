"""Rekognition's shapes and errors from faceserve's values (botocore's service model is the reference).

Similarity and confidence, 0-100:
- Detection confidence = detector score x 100.
- Similarity: faceserve compares faces by cosine similarity s of unit
  embeddings (SFace: -1..1). Rekognition's default FaceMatchThreshold is 80,
  so the map puts the service's own decision threshold t (ingress
  identify_threshold for searches, verify_threshold for CompareFaces) at 80:
  s <= 0 -> 0; 0 < s < t -> 80 s / t; s >= t -> 80 + 20 (s - t) / (1 - t).
  It is monotonic and invertible, so a FaceMatchThreshold T asks for
  s >= percent_to_similarity(T, t): T = 80 is exactly the service's threshold,
  whose false-match rate is the one measured for it (docs/COMPATIBILITY.md).
"""
from __future__ import annotations

import asyncio
import uuid
from typing import Any

from models.images import ImageError, ImageTooLarge, ImageUnsupported
from serve_app import errors as e
from serve_app.api.errors import outage

DEFAULT_MATCH_PERCENT = 80.0

# Our 5 landmarks in ArcFace order (image-left eye first), as Rekognition names them
# (its eyeLeft is the eye on the left of the image).
LANDMARK_TYPES = ("eyeLeft", "eyeRight", "nose", "mouthLeft", "mouthRight")


class AwsError(Exception):
    """An answer in AWS JSON 1.1 error form: ``{"__type": kind, "message": ...}``."""

    def __init__(self, kind: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status

    def body(self) -> dict[str, str]:
        return {"__type": self.kind, "message": self.message}


def invalid(message: str) -> AwsError:
    return AwsError("InvalidParameterException", message)


def not_found(message: str) -> AwsError:
    return AwsError("ResourceNotFoundException", message)


def aws_error(exc: BaseException) -> AwsError:
    """Any error raised while serving a Rekognition call, as the AWS error a client expects.
    Rekognition answers 400 for the caller's errors and 500 for its own."""
    if isinstance(exc, AwsError):
        return exc
    dep = outage(exc) if not isinstance(exc, (e.ServiceError, ImageError)) else None
    if dep is not None:
        exc = dep
    if isinstance(exc, (ImageTooLarge, e.PayloadTooLarge)):
        return AwsError("ImageTooLargeException", _msg(exc))
    if isinstance(exc, (ImageUnsupported, e.UnsupportedMediaType, e.ImageUnreadable, ImageError)):
        return AwsError("InvalidImageFormatException", "Request has invalid image format: " + _msg(exc))
    if isinstance(exc, e.NotFound):
        return not_found(_msg(exc))
    if isinstance(exc, e.ModelMismatch):
        return invalid(_msg(exc))
    if isinstance(exc, e.Conflict):
        return AwsError("ConflictException", _msg(exc))
    if isinstance(exc, e.Unauthorized):
        return AwsError("UnrecognizedClientException", "The security token included in the request is invalid.")
    if isinstance(exc, e.Forbidden):
        return AwsError("AccessDeniedException", _msg(exc))
    if isinstance(exc, e.RateLimited):
        return AwsError("ProvisionedThroughputExceededException", _msg(exc))
    if isinstance(exc, (e.NoFaceFound, e.MultipleFaces, e.SpoofDetected, e.CallerError)):
        return invalid(_msg(exc))
    if isinstance(exc, (e.ServiceUnavailable, e.ModelUnavailable, asyncio.TimeoutError)):
        return AwsError("ThrottlingException", "faceserve is temporarily unable to process the request: "
                        + _msg(exc), 500)
    return AwsError("InternalServerError", "Internal server error", 500)


def _msg(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or exc) or type(exc).__name__


# --- ids ----------------------------------------------------------------------
def face_uuid(face_id: int) -> str:
    """Rekognition FaceIds are UUIDs; ours are positive integers: the integer in UUID form."""
    return str(uuid.UUID(int=face_id))


def face_id_of(text: Any) -> int | None:
    """The face id behind a FaceId we issued, or None for anything else."""
    try:
        n = uuid.UUID(str(text)).int
    except (ValueError, TypeError, AttributeError):
        return None
    return n if 0 < n < 2**63 else None


def image_uuid(image_sha256: str) -> str:
    """ImageId: the same image indexed twice gets the same id, as in Rekognition."""
    return str(uuid.UUID(hex=image_sha256[:32])) if len(image_sha256) >= 32 else str(uuid.UUID(int=0))


# --- similarity ---------------------------------------------------------------
def similarity_to_percent(s: float, threshold: float) -> float:
    t = min(max(threshold, 1e-6), 1 - 1e-6)
    if s <= 0:
        return 0.0
    if s < t:
        return 80.0 * s / t
    return min(100.0, 80.0 + 20.0 * (s - t) / (1.0 - t))


def percent_to_similarity(p: float, threshold: float) -> float:
    """Inverse of similarity_to_percent on 0 < p <= 100 (p <= 0 accepts everything)."""
    t = min(max(threshold, 1e-6), 1 - 1e-6)
    if p <= 0:
        return -1.0
    if p < 80.0:
        return p * t / 80.0
    return t + (min(p, 100.0) - 80.0) * (1.0 - t) / 20.0


def match_threshold(body: dict[str, Any], name: str, service_threshold: float) -> tuple[float, float]:
    """(percent, cosine) for FaceMatchThreshold-like fields (0-100, default 80)."""
    raw = body.get(name, DEFAULT_MATCH_PERCENT)
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not 0 <= raw <= 100:
        raise invalid(f"{name} must be a number between 0 and 100")
    return float(raw), percent_to_similarity(float(raw), service_threshold)


# --- geometry -----------------------------------------------------------------
def bounding_box(box: tuple[float, float, float, float], width: int, height: int) -> dict[str, float]:
    """Pixels (x1, y1, x2, y2) -> Rekognition's ratios of the image. Like AWS,
    values may fall slightly outside 0..1 for a face cut by the image edge."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    x1, y1, x2, y2 = box
    return {"Width": (x2 - x1) / width, "Height": (y2 - y1) / height, "Left": x1 / width, "Top": y1 / height}


def landmarks(points: Any, width: int, height: int) -> list[dict[str, Any]]:
    return [{"Type": name, "X": float(x) / width, "Y": float(y) / height}
            for name, (x, y) in zip(LANDMARK_TYPES, points)]


def quality(signals: dict[str, object] | None) -> dict[str, float] | None:
    """Brightness: mean grey of the face 0..255 -> 0..100. Sharpness: our
    Laplacian measure against 1.2 (twice the default 'blurred' bar = the point
    we call fully sharp) -> 0..100. None when the detector gave no measures."""
    measures = (signals or {}).get("measures") if signals else None
    if not isinstance(measures, dict):
        return None
    out: dict[str, float] = {}
    if isinstance(measures.get("brightness"), (int, float)):
        out["Brightness"] = max(0.0, min(100.0, float(measures["brightness"]) * 100.0 / 255.0))
    if isinstance(measures.get("sharpness"), (int, float)):
        out["Sharpness"] = max(0.0, min(100.0, float(measures["sharpness"]) * 100.0 / 1.2))
    return out or None


# Our quality reasons (models/quality.py REASONS) as Rekognition's UnindexedFaces reasons.
QUALITY_REASONS = {"too_small": "SMALL_BOUNDING_BOX", "blurred": "LOW_SHARPNESS", "too_dark": "LOW_BRIGHTNESS",
                   "too_bright": "LOW_BRIGHTNESS", "strong_pose": "EXTREME_POSE",
                   "partly_outside": "LOW_FACE_QUALITY", "low_detection_score": "LOW_CONFIDENCE"}


def unindexed_reasons(reasons: Any) -> list[str]:
    """Rekognition reasons for a face refused on quality, in our order, without repeats."""
    out = [QUALITY_REASONS.get(str(r), "LOW_FACE_QUALITY") for r in (reasons or [])]
    return list(dict.fromkeys(out)) or ["LOW_FACE_QUALITY"]


def face_detail(face: Any, width: int, height: int) -> dict[str, Any]:
    """A FaceDetail (DEFAULT attributes we have: BoundingBox, Confidence, Landmarks, Quality)."""
    out: dict[str, Any] = {"BoundingBox": bounding_box(face.box, width, height),
                           "Confidence": float(face.score) * 100.0,
                           "Landmarks": landmarks(face.landmarks, width, height)}
    q = quality(getattr(face, "quality", None))
    if q:
        out["Quality"] = q
    return out
