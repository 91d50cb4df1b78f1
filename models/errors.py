"""Every domain error faceserve raises, in one place.

models/ is the dependency-free base layer, so the whole service's errors live
here: model code, the gallery store and the deployments raise these, and only
the HTTP ingress maps them to status codes (serve_app/http_errors.py).
Each error carries a stable machine-readable ``code`` besides its message.
"""
from __future__ import annotations


class FaceServeError(Exception):
    """Base class; ``code`` is a stable identifier clients can branch on."""

    code = "error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


# --- bad input (client errors) -------------------------------------------
class InvalidRequest(FaceServeError, ValueError):
    code = "invalid_request"


class ImageDecodeError(FaceServeError):
    """Bytes that claim to be an image but cannot be decoded."""

    code = "image_unreadable"


class UnsupportedImageType(FaceServeError):
    """A file that is not one of the accepted image formats."""

    code = "unsupported_media_type"


class ImageTooLarge(FaceServeError):
    """Over the byte or pixel limit (guards against decompression bombs)."""

    code = "image_too_large"


class NoFaceFound(FaceServeError):
    code = "no_face"


class MultipleFaces(FaceServeError):
    code = "multiple_faces"


class SpoofDetected(FaceServeError):
    code = "spoof_detected"


# --- gallery ---------------------------------------------------------------
class SubjectNotFound(FaceServeError):
    code = "subject_not_found"


class FaceNotFound(FaceServeError):
    code = "face_not_found"


class CollectionNotFound(FaceServeError):
    code = "collection_not_found"


class Conflict(FaceServeError):
    code = "conflict"


class Unauthorized(FaceServeError):
    code = "unauthorized"


class RateLimited(FaceServeError):
    """Over the per-client request quota; details carry retry_after_s."""

    code = "rate_limited"


# --- server side -----------------------------------------------------------
class WeightsError(FaceServeError):
    code = "weights_error"


class WeightsNotFound(WeightsError):
    code = "weights_not_found"


class ChecksumMismatch(WeightsError):
    code = "checksum_mismatch"


class ModelMismatch(FaceServeError):
    """Embeddings from different embedders cannot be compared."""

    code = "model_mismatch"


class ServiceUnavailable(FaceServeError):
    code = "unavailable"


class IndexCorrupt(FaceServeError):
    """An index snapshot that is truncated, tampered with, or not ours."""

    code = "index_corrupt"
