"""Matcher deployment: one FAISS index per collection, kept in step with Postgres.

A replica restores the newest index snapshot of each collection from object
storage, loads what has none from Postgres, replays the ordered change log
from there, then follows it (polling every sync_interval_s, and at once when
a caller asks for a sequence number it has not reached yet, which is how an
enrolment's answer gives read-your-writes). Every `snapshot_every` changes
to a collection it writes a new snapshot in the background
(serve_app/gallery/gallery_index.py holds that logic, testable without Ray).
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from index.policy import IndexPolicy
from serve_app.gallery.gallery_index import GalleryIndex
from serve_app.gallery.index_snapshots import SnapshotStore
from serve_app.gallery.objects import ObjectStore
from serve_app.gallery.repository import GalleryRepository, create_pool
from serve_app.messages import EmbeddingResult, MatchResult
from serve_app.metrics import ServiceMetrics
from serve_app.settings import Settings
from serve_app.telemetry import now_ns, record_span

log = logging.getLogger("ray.serve")


@serve.deployment(name="Matcher", ray_actor_options={"num_cpus": 0.2})
class Matcher:
    async def __init__(self, settings: Settings) -> None:
        settings.setup_telemetry("Matcher")
        pool = await create_pool(settings.database_dsn(), min_size=1, max_size=3)
        self._interval = 1.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")
        self._metrics = ServiceMetrics(settings.metrics_enabled)
        self._gallery = GalleryIndex(
            GalleryRepository(pool), SnapshotStore(ObjectStore(settings.object_store_url))
        )
        report = await self._gallery.load()
        log.info(
            "matcher loaded %d faces at seq %d in %.2fs: snapshots %s, from Postgres %s%s, "
            "%d log entries replayed",
            report.faces, report.seq, report.seconds, report.from_snapshot, report.from_postgres,
            " (full load)" if report.full_load else "", report.replayed,
        )
        self._snapshot_task: asyncio.Task[list[str]] | None = None
        self._rebuild_task: asyncio.Task[Any] | None = None
        self._follower = asyncio.get_running_loop().create_task(self._follow())

    def reconfigure(self, config: dict[str, Any]) -> None:
        self._interval = float(config.get("sync_interval_s", 1.0))
        self._gallery.snapshot_every = int(config.get("snapshot_every", 1000))
        self._gallery.set_policy(
            IndexPolicy(
                exact_max=int(config.get("exact_max_faces", 50_000)),
                memory_budget_bytes=int(float(config.get("index_memory_budget_mb", 4096)) * (1 << 20)),
                target_recall=float(config.get("target_recall", 0.99)),
            )
        )

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.sync()
            except Exception:  # a DB blip must not kill the follower; retry next tick
                log.exception("matcher: change-log sync failed")
            # Snapshots are written by a task of their own: a slow upload
            # never delays following the log, and only one runs at a time.
            if (self._snapshot_task is None or self._snapshot_task.done()) and self._gallery.snapshot_due():
                self._snapshot_task = asyncio.get_running_loop().create_task(self._gallery.write_snapshots())
            # Index rebuilds (a collection outgrew exact search, or its IVF
            # needs retraining) run in a thread; searches use the old index
            # until the new one is swapped in.
            if (self._rebuild_task is None or self._rebuild_task.done()) and self._gallery.rebuild_due():
                self._rebuild_task = asyncio.get_running_loop().create_task(self._gallery.rebuild_indexes())

    async def sync(self) -> int:
        return await self._gallery.sync()

    async def search(
        self, embeddings: EmbeddingResult, collection_id: int, k: int, min_seq: int = 0
    ) -> MatchResult:
        n0, t0 = now_ns(), time.perf_counter()
        if min_seq > self._gallery.seq:
            await self.sync()
        seq = self._gallery.seq  # read first: the search reflects at least this
        loop = asyncio.get_running_loop()
        hits = await loop.run_in_executor(
            self._executor, self._gallery.search, collection_id, embeddings.vectors, k
        )
        ms = (time.perf_counter() - t0) * 1000.0
        self._metrics.observe_stages({"search": ms})
        record_span(
            embeddings.trace, "Matcher.search", n0, now_ns(),
            {"collection_id": collection_id, "k": k, "index.seq": seq},
        )
        return MatchResult(hits=hits, seq=seq, timings_ms={"search": round(ms, 3)})

    def stats(self) -> dict[str, Any]:
        return self._gallery.stats()

    def ready(self) -> bool:
        return not self._follower.done()
