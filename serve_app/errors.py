"""Every error the service raises on purpose, in one place.

Two roots, because they mean different things to the caller:
- CallerError: the request was wrong (bad image, unknown subject, no face);
  a 4xx that says why. Retrying the same request will not help.
- InternalFault: we could not answer (a dependency down, overload, a model
  missing); a 5xx, usually 503 with Retry-After.
Model and index code (models/, index/) raise ValueError/TypeError/RuntimeError
and know nothing of these; the services translate. HTTP statuses are assigned
only at the edge (serve_app/api/errors.py).
"""
from __future__ import annotations

from models.detailed_error import DetailedError


class ServiceError(DetailedError):
    """Base class; ``code`` is a stable identifier clients can branch on."""

    code = "error"


# --- the caller's errors (4xx) ----------------------------------------------
class CallerError(ServiceError):
    code = "invalid_request"


class InvalidRequest(CallerError):
    code = "invalid_request"


class ImageUnreadable(CallerError):
    code = "image_unreadable"


class UnsupportedMediaType(CallerError):
    code = "unsupported_media_type"


class PayloadTooLarge(CallerError):
    code = "image_too_large"


class NoFaceFound(CallerError):
    code = "no_face"


class MultipleFaces(CallerError):
    code = "multiple_faces"


class LowQuality(CallerError):
    """The face is too poor a sample to enrol; details carry score and reasons."""

    code = "low_quality"


class SpoofDetected(CallerError):
    code = "spoof_detected"


class NotFound(CallerError):
    code = "not_found"


class SubjectNotFound(NotFound):
    code = "subject_not_found"


class FaceNotFound(NotFound):
    code = "face_not_found"


class CollectionNotFound(NotFound):
    code = "collection_not_found"


class ErasureNotFound(NotFound):
    code = "erasure_not_found"


class Conflict(CallerError):
    code = "conflict"


class ModelMismatch(Conflict):
    """Embeddings from different embedders cannot be compared."""

    code = "model_mismatch"


class IdempotencyInProgress(Conflict):
    """A request with the same Idempotency-Key is still running; details carry retry_after_s."""

    code = "idempotency_in_progress"


class IdempotencyKeyReused(CallerError):
    """The Idempotency-Key was used before with a different request body."""

    code = "idempotency_key_reused"


class Unauthorized(CallerError):
    code = "unauthorized"


class Forbidden(CallerError):
    """The key is valid but lacks the scope this operation needs."""

    code = "forbidden"


class RateLimited(CallerError):
    """Over the per-client request quota; details carry retry_after_s."""

    code = "rate_limited"


# --- our faults (5xx) ----------------------------------------------------------
class InternalFault(ServiceError):
    code = "internal_error"


class ServiceUnavailable(InternalFault):
    """Overload, a lost replica, a dependency down: retry after retry_after_s."""

    code = "unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1, **details: object) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **details)
        self.retry_after_s = retry_after_s


class ModelUnavailable(InternalFault):
    code = "weights_error"


class IndexCorrupt(InternalFault):
    code = "index_corrupt"


class ModelChanged(ServiceUnavailable):
    """The collection's vectors are of another model than the probe's: it was
    re-embedded (serve_app/jobs/reembed.py) after the caller looked it up, or
    the matcher has not applied the switch yet. details["model"] is the
    collection's model as the matcher holds it; the ingress embeds the probe
    with that and asks again, so a caller rarely sees this 503."""

    code = "model_changed"


def dependency_outage(exc: BaseException) -> ServiceUnavailable | None:
    """A dependency failure (Postgres, Redis, object storage, a timeout) as
    the 503 it should be, or None when exc is something else."""
    import asyncio

    import asyncpg

    try:
        import redis.exceptions as redis_exc

        redis_errors: tuple[type[BaseException], ...] = (redis_exc.ConnectionError, redis_exc.TimeoutError)
    except ImportError:  # pragma: no cover - redis is a dependency
        redis_errors = ()
    if isinstance(exc, ServiceUnavailable):
        return exc
    # OperatorInterventionError: "terminating connection due to administrator
    # command" (a fast shutdown or failover) and "the database system is
    # shutting down / starting up". InternalClientError ("cannot switch to
    # state ..."): a pool connection's reset on release, when the server
    # dropped it under the query (drill: Postgres stopped mid-request); asyncpg
    # terminates that connection itself.
    if isinstance(exc, (asyncpg.exceptions.PostgresConnectionError, asyncpg.exceptions.InterfaceError,
                        asyncpg.exceptions.OperatorInterventionError, asyncpg.exceptions.InternalClientError,
                        asyncpg.exceptions.TooManyConnectionsError,
                        asyncpg.exceptions.LockNotAvailableError, asyncpg.exceptions.QueryCanceledError,
                        ConnectionError)):
        return ServiceUnavailable("the database is unavailable; retry shortly", retry_after_s=2,
                                  dependency="postgres")
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return ServiceUnavailable("a dependency did not answer in time; retry shortly", retry_after_s=2,
                                  reason="timeout")
    if redis_errors and isinstance(exc, redis_errors):
        return ServiceUnavailable("the cache is unavailable; retry shortly", retry_after_s=2, dependency="redis")
    if isinstance(exc, OSError):
        return ServiceUnavailable("object storage is unavailable; retry shortly", retry_after_s=2,
                                  dependency="object_store")
    return None
