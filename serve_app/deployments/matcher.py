"""Matcher deployment: one FAISS index per collection, kept in step with Postgres.

A replica loads every face from Postgres in one consistent snapshot, then
follows the ordered change log (polling every sync_interval_s, and at once
when a caller asks for a sequence number it has not reached yet, which is
how an enrolment's answer gives read-your-writes).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve

from index.collection_index import CollectionIndex
from serve_app.gallery.repository import Change, GalleryRepository, create_pool
from serve_app.messages import EmbeddingResult, Hit, MatchResult
from serve_app.metrics import ServiceMetrics
from serve_app.settings import Settings
from serve_app.telemetry import now_ns, record_span

log = logging.getLogger("ray.serve")


@serve.deployment(name="Matcher", ray_actor_options={"num_cpus": 0.2})
class Matcher:
    async def __init__(self, settings: Settings) -> None:
        settings.setup_telemetry("Matcher")
        pool = await create_pool(settings.database_dsn(), min_size=1, max_size=3)
        self._repo = GalleryRepository(pool)
        self._indexes: dict[int, CollectionIndex] = {}
        self._subject_of: dict[int, uuid.UUID] = {}
        self._seq = 0
        self._sync_lock = asyncio.Lock()
        self._interval = 1.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")
        self._metrics = ServiceMetrics(settings.metrics_enabled)
        seq, faces = await self._repo.load_all()
        self._apply(faces)
        self._seq = seq
        self._follower = asyncio.get_running_loop().create_task(self._follow())

    def reconfigure(self, config: dict[str, Any]) -> None:
        self._interval = float(config.get("sync_interval_s", 1.0))

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.sync()
            except Exception:  # a DB blip must not kill the follower; retry next tick
                log.exception("matcher: change-log sync failed")

    async def sync(self) -> int:
        async with self._sync_lock:
            while True:
                changes = await self._repo.changes_since(self._seq, limit=5000)
                if not changes:
                    break
                self._apply(changes)
                self._seq = changes[-1].seq
                if len(changes) < 5000:
                    break
        return self._seq

    def _apply(self, changes: list[Change]) -> None:
        for ch in changes:
            if ch.op == "add":
                if ch.embedding is None:  # removed again later in the log
                    continue
                index = self._indexes.get(ch.collection_id)
                if index is None:
                    index = self._indexes[ch.collection_id] = CollectionIndex(dim=ch.embedding.shape[0])
                index.add(np.array([ch.face_id], np.int64), ch.embedding[None, :])
                self._subject_of[ch.face_id] = ch.subject_id
            else:
                index = self._indexes.get(ch.collection_id)
                if index is not None:
                    index.remove(np.array([ch.face_id], np.int64))
                self._subject_of.pop(ch.face_id, None)

    async def search(
        self, embeddings: EmbeddingResult, collection_id: int, k: int, min_seq: int = 0
    ) -> MatchResult:
        n0, t0 = now_ns(), time.perf_counter()
        if min_seq > self._seq:
            await self.sync()
        index = self._indexes.get(collection_id)
        vectors = embeddings.vectors
        if index is None or len(index) == 0 or len(vectors) == 0:
            hits: list[list[Hit]] = [[] for _ in range(len(vectors))]
        else:
            # Ask for more faces than subjects: one subject may own many faces.
            k_faces = min(len(index), max(8 * k, 64))
            loop = asyncio.get_running_loop()
            scores, ids = await loop.run_in_executor(self._executor, index.search, vectors, k_faces)
            hits = [self._best_per_subject(s, i, k) for s, i in zip(scores, ids)]
        ms = (time.perf_counter() - t0) * 1000.0
        self._metrics.observe_stages({"search": ms})
        record_span(
            embeddings.trace, "Matcher.search", n0, now_ns(),
            {"collection_id": collection_id, "k": k, "index.seq": self._seq},
        )
        return MatchResult(hits=hits, seq=self._seq, timings_ms={"search": round(ms, 3)})

    def _best_per_subject(self, scores: np.ndarray, ids: np.ndarray, k: int) -> list[Hit]:
        seen: set[uuid.UUID] = set()
        out: list[Hit] = []
        for score, face_id in zip(scores, ids):
            if face_id < 0:
                break
            subject = self._subject_of.get(int(face_id))
            if subject is None or subject in seen:
                continue
            seen.add(subject)
            out.append(Hit(subject_id=str(subject), face_id=int(face_id), similarity=float(score)))
            if len(out) == k:
                break
        return out

    def stats(self) -> dict[str, Any]:
        return {
            "seq": self._seq,
            "faces": {cid: len(ix) for cid, ix in self._indexes.items()},
        }

    def ready(self) -> bool:
        return not self._follower.done()
