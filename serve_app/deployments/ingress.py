"""Ingress deployment: wires the HTTP edge to the model graph and the gallery.

It holds no HTTP logic of its own. At replica start it builds the services
(serve_app/services/) around the pipeline client, the repository and the
object store, and serve.ingress() asks __serve_build_asgi_app__ for the
FastAPI app (serve_app/api/app.py) that routes requests to them.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.api.app import create_app
from serve_app.api.deps import Edge
from serve_app.cached_pipeline import CachedPipeline
from serve_app.deployment_config import IngressConfig
from serve_app.embedding_cache import CacheConfig, EmbeddingCache, SubjectKeys
from serve_app.gallery.access import AccessRepository
from serve_app.gallery.erasures import ErasureRepository
from serve_app.gallery.objects import ObjectStore
from serve_app.gallery.repository import GalleryRepository, create_pool
from serve_app.idempotency import Idempotency
from serve_app.metrics import ServiceMetrics
from serve_app.pipeline_client import PipelineClient
from serve_app.quota import RequestQuota
from serve_app.redis_store import RedisStore
from serve_app.services.access import Authenticator
from serve_app.services.erasure import ErasureService
from serve_app.services.feedback import FeedbackService, ProbeCache
from serve_app.services.gallery import GalleryService
from serve_app.services.recognition import RecognitionService
from serve_app.settings import Settings

log = logging.getLogger("ray.serve")

IDENTITY_REFRESH_S = 5.0


def _calibration(model: str) -> Any:
    """The FMR calibration of the running embedder, or None (then target_fmr is refused)."""
    from models.calibration import load_calibration

    try:
        return load_calibration(model)
    except ValueError:
        log.warning("no FMR calibration for embedder %s: target_fmr and FMR estimates are off", model)
        return None


class _Outcomes:
    def __init__(self, metrics: ServiceMetrics) -> None:
        self._m = metrics

    def verification(self, outcome: str) -> None:
        self._m.verifications.inc(tags={"outcome": outcome})

    def identification(self, outcome: str) -> None:
        self._m.identifications.inc(tags={"outcome": outcome})


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.2, "memory": 512 * 1024**2},
                  max_queued_requests=64)
@serve.ingress()
class Ingress:
    async def __init__(self, settings: Settings, detector: DeploymentHandle, embedder: DeploymentHandle,
                       liveness: DeploymentHandle, matcher: DeploymentHandle | list[DeploymentHandle]) -> None:
        settings.setup_telemetry("Ingress")
        self._settings = settings
        self._config = IngressConfig()
        self._metrics = ServiceMetrics(settings.metrics_enabled)
        # The graph behind the embedding cache; Redis also keeps idempotency records.
        redis = RedisStore(settings.redis_url) if settings.redis_url else None
        self._pipeline = CachedPipeline(PipelineClient(detector, embedder, liveness, matcher), self._cache(redis))
        self._models = asyncio.get_running_loop().create_task(self._follow_models())
        self._repo = GalleryRepository(await create_pool(
            settings.database_dsn(), min_size=settings.db_pool_min, max_size=settings.db_pool_max))
        info = await self._pipeline.embedder_info()
        gallery = GalleryService(self._pipeline, self._repo, ObjectStore(settings.object_store_url),
                                 model=info["model"], dim=int(info["dim"]),
                                 default_collection=settings.default_collection)
        await gallery.collection(settings.default_collection, create=True)
        # Erasures: the outbox sweeper runs here (why: serve_app/services/erasure.py).
        self._erasure_repo = ErasureRepository(self._repo.pool)
        gallery.erasures = ErasureService(self._erasure_repo, gallery.objects, on_backlog=self._erasure_backlog)
        self._access = AccessRepository(self._repo.pool)
        bootstrap = settings.api_key.get_secret_value().encode() if settings.api_key else None
        probes = ProbeCache()
        self._edge = Edge(
            recognition=RecognitionService(self._pipeline, self._repo, _Outcomes(self._metrics), probes,
                                           on_model_changed=gallery.model_changed),
            feedback=FeedbackService(self._pipeline, self._repo, probes, saw=gallery.saw),
            calibration=_calibration(info["model"]),
            gallery=gallery,
            config=lambda: self._config,
            auth=Authenticator(self._access, bootstrap),
            access=self._access,
            quota=RequestQuota(settings.redis_url) if settings.redis_url else None,
            ready=self._ready,
            observe_stages=self._metrics.observe_stages,
            idempotency=self._idempotency(redis),
            subject_keys=SubjectKeys(redis, prefix=settings.redis_prefix) if redis else None,
        )
        self._gauges = asyncio.get_running_loop().create_task(self._update_gauges())
        # Redis keys tied to a subject (embedding cache, idempotency records) go with its erasure.
        gallery.erasures.cache = getattr(self._edge, "subject_keys", None)
        self._sweeper = asyncio.get_running_loop().create_task(gallery.erasures.run())

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self._edge, self._metrics)

    def reconfigure(self, config: dict[str, Any]) -> None:
        self._config = IngressConfig.model_validate(config)
        self._apply_redis_config()
        self._pipeline.timeout_s = self._config.pipeline_timeout_s
        self._pipeline.retry_after_s = self._config.retry_after_s
        self._repo.acquire_timeout_s = self._config.db_acquire_timeout_s
        self._access.acquire_timeout_s = self._config.db_acquire_timeout_s
        self._erasure_repo.acquire_timeout_s = self._config.db_acquire_timeout_s
        self._edge.auth.set_bounds(stale_s=self._config.lookup_stale_s)
        self._edge.gallery.set_lookup_stale_s(self._config.lookup_stale_s)

    def _erasure_backlog(self, due: int, oldest_s: float) -> None:
        self._metrics.erasure_outbox_due.set(float(due))
        self._metrics.erasure_outbox_oldest.set(min(oldest_s, 1e9))

    def _cache(self, redis: RedisStore | None) -> EmbeddingCache | None:
        if redis is None:
            return None
        return EmbeddingCache(redis, prefix=self._settings.redis_prefix,
                              count=lambda result: self._metrics.embedding_cache.inc(tags={"result": result}))

    def _idempotency(self, redis: RedisStore | None) -> Idempotency | None:
        if redis is None:
            return None
        return Idempotency(redis, prefix=self._settings.redis_prefix,
                           count=lambda result: self._metrics.idempotency.inc(tags={"result": result}))

    def _apply_redis_config(self) -> None:
        cfg = self._config
        if self._pipeline.cache is not None:
            self._pipeline.cache.config = CacheConfig(cfg.embedding_cache_ttl_s, cfg.embedding_cache_max_entry_bytes)
        if self._edge.idempotency is not None:
            self._edge.idempotency.ttl_s = cfg.idempotency_ttl_s
            self._edge.idempotency.wait_s = cfg.idempotency_wait_s
        if self._edge.subject_keys is not None:
            self._edge.subject_keys.ttl_s = max(cfg.idempotency_ttl_s, cfg.embedding_cache_ttl_s)

    async def _follow_models(self) -> None:
        """What the detector and embedder run now (the cache's key part): at
        start, then every IDENTITY_REFRESH_S (results met between refreshes
        update it too)."""
        while True:
            try:
                await asyncio.wait_for(self._pipeline.refresh_identity(), 10.0)
            except Exception as exc:  # overloaded or restarting: keep what is known
                log.info("embedding cache: model identity not refreshed (%s)", type(exc).__name__)
            await asyncio.sleep(IDENTITY_REFRESH_S)

    async def _ready(self) -> dict[str, bool]:
        checks = await self._pipeline.ready()
        try:
            await asyncio.wait_for(self._repo.ping(), 3.0)
            checks["database"] = True
        except Exception:
            checks["database"] = False
        return checks

    async def _update_gauges(self) -> None:
        redis_client = None
        if self._settings.redis_url:
            import redis.asyncio as aioredis

            redis_client = aioredis.from_url(self._settings.redis_url, socket_timeout=2.0)
        while True:
            size, in_use = self._repo.pool_stats()
            self._metrics.db_pool_size.set(size)
            self._metrics.db_pool_in_use.set(in_use)
            self._metrics.db_pool_max.set(self._settings.db_pool_max)
            if redis_client is not None:
                try:
                    info = await redis_client.info("memory")
                    self._metrics.redis_used_memory.set(float(info.get("used_memory", 0)))
                    self._metrics.redis_maxmemory.set(float(info.get("maxmemory", 0)))
                except Exception:  # Redis is optional; its outage must not stop the gauges
                    log.warning("could not read Redis memory info", exc_info=True)
            await asyncio.sleep(5.0)
