"""The model graph with the embedding cache in front: what the services call.

A request whose answer does not depend on crops (detect, verify, identify
without liveness; the feedback probe) first looks its image up in the cache
(serve_app/embedding_cache.py); on a hit, the detector and embedder are
skipped and only the matcher runs, if the request searches. Requests that
check liveness or enrol need crops the cache does not hold: they run the
graph, and every pass that produced vectors writes them back before it
answers (one SET, well under a millisecond on a healthy Redis; so a repeat
right after the answer hits, and an enrolment's entry exists before it is
tied to the subject for erasure).

Keys carry the model identity (detector options + embedder model + weights).
A lookup uses the model the request names (a collection's) or the
embedder's default, and the detector options the ingress learns at start,
every IDENTITY_REFRESH_S (5 s) from the deployments themselves, and from
every result a pass returns; so a changed detector config or default model
stops hits on the old entries within that interval or at the first miss,
whichever comes first. A write is keyed by what made the result, exactly.

Redis down: lookups are misses and writes are dropped, in at most the store's
timeout (and not at all while its breaker is open).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from serve_app.embedding_cache import EmbeddingCache, image_digest, model_identity
from serve_app.pipeline_client import AnalyseSpec, Analysis, PipelineClient
from serve_app.telemetry import carrier_from_current

log = logging.getLogger("ray.serve")

# Hashing a large upload takes a few ms per MB: off the event loop above this.
_HASH_INLINE_BYTES = 1 << 20


class CachedPipeline:
    def __init__(self, inner: PipelineClient, cache: EmbeddingCache | None) -> None:
        self.inner = inner
        self.cache = cache
        # What keys are made of; unknown until learned (no lookups before).
        self.detector_id: str | None = None
        self.default_model: str | None = None  # the embedder's default: specs that name no model

    async def refresh_identity(self) -> None:
        """Ask the detector and embedder what they run now."""
        det_id, model = await self.inner.model_parts()
        self._learn_detector(det_id)
        self.default_model = model

    def _learn_detector(self, det_id: str) -> None:
        if det_id and det_id != self.detector_id:
            if self.detector_id is not None:
                log.info("embedding cache: detector options changed (%s -> %s)", self.detector_id, det_id)
            self.detector_id = det_id

    def identity_for(self, model: str | None) -> str | None:
        """The key part for results of this embedder model (None: the default)."""
        model = model or self.default_model
        if not self.detector_id or not model:
            return None
        return model_identity(self.detector_id, model)

    def _usable(self, spec: AnalyseSpec) -> bool:
        return self.cache is not None and self.cache.enabled and not (spec.liveness or spec.enrol_crops)

    async def analyse(self, data: bytes, spec: AnalyseSpec) -> Analysis:
        cache = self.cache
        if cache is None or not cache.enabled:
            return await self.inner.analyse(data, spec)
        digest = image_digest(data) if len(data) <= _HASH_INLINE_BYTES else await asyncio.to_thread(
            image_digest, data)
        identity = self.identity_for(spec.model) if self._usable(spec) else None
        if identity is not None:
            t0 = time.perf_counter()
            found = await cache.get(digest, identity)
            if found is not None:
                return await self._from_cache(found, spec, cache.key(digest, identity),
                                              (time.perf_counter() - t0) * 1000.0)
        analysis = await self.inner.analyse(data, spec)
        emb = analysis.embeddings
        if emb is not None and analysis.detection.config_id:
            # Keyed by what made it, exactly: the detector's options and the model that embedded.
            self._learn_detector(analysis.detection.config_id)
            if spec.model is None:
                self.default_model = emb.model  # what "no model named" means now
            made_by = model_identity(analysis.detection.config_id, emb.model)
            analysis.cache_key = cache.key(digest, made_by)
            await self._put(digest, made_by, analysis)
        return analysis

    async def _from_cache(self, found: Any, spec: AnalyseSpec, key: str, ms: float) -> Analysis:
        det, emb = found
        trace = carrier_from_current()
        det.trace, emb.trace = trace, trace
        det.timings_ms = {"cache": ms}
        match = await self.inner.search(emb, spec.match) if spec.match is not None else None
        wants_vectors = spec.embed or spec.match is not None
        return Analysis(detection=det, embeddings=emb if wants_vectors else None, liveness=None,
                        matches=match, cache_key=key)

    async def _put(self, digest: str, identity: str, analysis: Analysis) -> None:
        assert self.cache is not None and analysis.embeddings is not None
        try:
            await self.cache.put(digest, identity, analysis.detection, analysis.embeddings)
        except Exception:  # the answer is made; a failed write is only a later miss
            log.warning("embedding cache: write failed", exc_info=True)

    # --- the rest of the graph's port, unchanged --------------------------------
    @property
    def timeout_s(self) -> float:
        return self.inner.timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        self.inner.timeout_s = value

    @property
    def retry_after_s(self) -> int:
        return self.inner.retry_after_s

    @retry_after_s.setter
    def retry_after_s(self, value: int) -> None:
        self.inner.retry_after_s = value

    async def embedder_info(self) -> dict[str, Any]:
        return await self.inner.embedder_info()

    async def ready(self) -> dict[str, bool]:
        return await self.inner.ready()
