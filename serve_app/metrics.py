"""The service's own Prometheus metrics, through ray.serve.metrics.

Ray exports them on its metrics port with a `ray_` prefix (counters gain
`_total`) and application/deployment/replica labels; monitoring/ relies on
the exact names listed in monitoring/metrics_catalog.yml. Objects are
created per replica when a deployment starts, never at import time.
"""
from __future__ import annotations

from functools import cached_property

from ray.serve import metrics as serve_metrics

LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 400, 600, 1000, 1500, 2500, 5000, 10000]
FACES_BOUNDARIES = [0.5, 1.5, 2.5, 3.5, 5.5, 10.5, 20.5, 50.5]
SCORE_BOUNDARIES = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]


class _Off:
    """Stands in for every metric when metrics are switched off."""

    def inc(self, *_: object, **__: object) -> None: ...
    def observe(self, *_: object, **__: object) -> None: ...
    def set(self, *_: object, **__: object) -> None: ...


class ServiceMetrics:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            off = _Off()
            for name in _METRIC_NAMES:
                self.__dict__[name] = off  # shadows the cached_property
    @cached_property
    def stage_latency(self) -> serve_metrics.Histogram:
        return serve_metrics.Histogram(
            "faceserve_stage_latency_ms",
            description="Latency of one pipeline stage in milliseconds.",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=("stage",),
        )

    @cached_property
    def faces_per_image(self) -> serve_metrics.Histogram:
        return serve_metrics.Histogram(
            "faceserve_faces_per_image",
            description="Faces found per decoded image.",
            boundaries=FACES_BOUNDARIES,
        )

    @cached_property
    def verifications(self) -> serve_metrics.Counter:
        return serve_metrics.Counter(
            "faceserve_verifications",
            description="1:1 verifications by outcome (match, no_match, error).",
            tag_keys=("outcome",),
        )

    @cached_property
    def identifications(self) -> serve_metrics.Counter:
        return serve_metrics.Counter(
            "faceserve_identifications",
            description="1:N identifications per face by outcome (match, unknown, error).",
            tag_keys=("outcome",),
        )

    @cached_property
    def liveness_checks(self) -> serve_metrics.Counter:
        return serve_metrics.Counter(
            "faceserve_liveness_checks",
            description="Liveness checks per face by outcome (live, spoof, error).",
            tag_keys=("outcome",),
        )

    @cached_property
    def liveness_score(self) -> serve_metrics.Histogram:
        return serve_metrics.Histogram(
            "faceserve_liveness_score",
            description="Live-face probability per checked face.",
            boundaries=SCORE_BOUNDARIES,
        )

    @cached_property
    def db_pool_size(self) -> serve_metrics.Gauge:
        return serve_metrics.Gauge(
            "faceserve_db_pool_size", description="Connections open in this replica's Postgres pool."
        )

    @cached_property
    def db_pool_in_use(self) -> serve_metrics.Gauge:
        return serve_metrics.Gauge(
            "faceserve_db_pool_in_use", description="Pool connections currently checked out."
        )

    @cached_property
    def db_pool_max(self) -> serve_metrics.Gauge:
        return serve_metrics.Gauge(
            "faceserve_db_pool_max", description="Configured maximum size of the Postgres pool."
        )

    @cached_property
    def redis_used_memory(self) -> serve_metrics.Gauge:
        return serve_metrics.Gauge(
            "faceserve_redis_used_memory_bytes", description="Redis used_memory from INFO memory."
        )

    @cached_property
    def redis_maxmemory(self) -> serve_metrics.Gauge:
        return serve_metrics.Gauge(
            "faceserve_redis_maxmemory_bytes", description="Redis maxmemory (0 = unlimited)."
        )

    @cached_property
    def embedding_cache(self) -> serve_metrics.Counter:
        return serve_metrics.Counter(
            "faceserve_embedding_cache",
            description="Embedding cache lookups and writes by result "
                        "(hit, miss, stored, unavailable, corrupt, too_large).",
            tag_keys=("result",),
        )

    @cached_property
    def idempotency(self) -> serve_metrics.Counter:
        return serve_metrics.Counter(
            "faceserve_idempotency",
            description="Idempotency-Key requests by result (claimed, replayed, key_reused, in_progress, "
                        "unenforced = Redis down, unrecorded = answer not stored).",
            tag_keys=("result",),
        )

    @cached_property
    def http_responses(self) -> serve_metrics.Counter:
        return serve_metrics.Counter(
            "faceserve_http_responses",
            description="HTTP responses by status code and route template.",
            tag_keys=("code", "route"),
        )

    @cached_property
    def matcher_seq_behind(self) -> serve_metrics.Gauge:
        return serve_metrics.Gauge(
            "faceserve_matcher_seq_behind",
            description="Change-log entries known to be committed that this matcher replica has not applied.",
        )

    @cached_property
    def matcher_sync_age(self) -> serve_metrics.Gauge:
        return serve_metrics.Gauge(
            "faceserve_matcher_sync_age_seconds",
            description="Seconds since this matcher replica's last sync that reached the end of the change log.",
        )

    @cached_property
    def erasure_outbox_due(self) -> serve_metrics.Gauge:
        return serve_metrics.Gauge(
            "faceserve_erasure_outbox_due",
            description="Erasure outbox rows owed (unfinished erasure copies, orphaned crops past their grace).",
        )

    @cached_property
    def erasure_outbox_oldest(self) -> serve_metrics.Gauge:
        return serve_metrics.Gauge(
            "faceserve_erasure_outbox_oldest_seconds",
            description="Seconds the oldest owed erasure outbox row has been owed (0 when none).",
        )

    def observe_stages(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self.stage_latency.observe(float(ms), tags={"stage": stage})


_METRIC_NAMES = [
    name for name, value in vars(ServiceMetrics).items() if isinstance(value, cached_property)
]
