"""Matcher deployment: one FAISS index per collection, kept in step with Postgres.

A replica restores the newest index snapshot of each collection from object
storage, loads what has none from Postgres, replays the ordered change log
from there, then follows it: LISTEN/NOTIFY wakes it on every commit, a poll
every `sync_interval_s` covers a lost listener, and a caller asking for a
sequence number not reached yet makes it sync at once (read-your-writes).
It carries each subject's name and "not this person" probes as well (both
follow the log), so a search answers everything identify needs and keeps
answering while Postgres is down.
It writes snapshots every `snapshot_every` changes and rebuilds indexes that
outgrew their kind, both in the background. Its lag (seq behind, seconds
since the last good sync) is exported as metrics, and `check_health` fails
once it is staler than `max_staleness_s`, so Serve stops routing to it and
replaces it. serve_app/gallery/gallery_index.py holds the logic, testable
without Ray.

With `matcher_shards` > 1 the graph binds one of these per shard
(`Matcher-0` ...), each holding the faces with face_id % count == its index
and snapshotting them under a key prefix of its own; the ingress asks every
shard and merges (serve_app/gallery/shards.py).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
from ray import serve

from index.policy import IndexPolicy
from serve_app.gallery.gallery_index import GalleryIndex, LogFollower
from serve_app.gallery.index_snapshots import SnapshotStore
from serve_app.gallery.objects import ObjectStore
from serve_app.gallery.shards import Shard
from serve_app.gallery.repository import GalleryRepository, create_pool
from serve_app.messages import EmbeddingResult, MatchResult
from serve_app.metrics import ServiceMetrics
from serve_app.deployment_config import MatcherConfig
from serve_app.errors import InvalidRequest, ModelChanged, ServiceUnavailable
from serve_app.settings import Settings
from serve_app.telemetry import now_ns, record_span

log = logging.getLogger("ray.serve")

_PRUNE_EVERY_S = 600.0  # how often a replica prunes the change log (any replica may; it is idempotent)
_LAG_REPORT_S = 5.0  # gauges are set on a timer: Ray drops a gauge ~20 s after its last set()


@serve.deployment(name="Matcher", ray_actor_options={"num_cpus": 0.2, "memory": 1024**3})
class Matcher:
    async def __init__(self, settings: Settings, shard_index: int = 0, shard_count: int = 1) -> None:
        self._shard = Shard(shard_index, shard_count)
        settings.setup_telemetry(self._shard.deployment)
        dsn = settings.database_dsn()
        pool = await create_pool(dsn, min_size=1, max_size=3)
        self._config = MatcherConfig()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")
        self._metrics = ServiceMetrics(settings.metrics_enabled)
        self._gallery = GalleryIndex(
            GalleryRepository(pool), SnapshotStore(
                ObjectStore(settings.object_store_url),
                signing_key=settings.snapshot_key.get_secret_value().encode() if settings.snapshot_key else None,
                shard=self._shard),
            shard=self._shard,
        )
        report = await self._gallery.load()
        log.info(
            "matcher (%s) loaded %d faces at seq %d in %.2fs: snapshots %s, from Postgres %s%s, "
            "%d log entries replayed",
            self._shard.label, report.faces, report.seq, report.seconds, report.from_snapshot, report.from_postgres,
            " (full load)" if report.full_load else "", report.replayed,
        )
        self._snapshot_task: asyncio.Task[list[str]] | None = None
        self._rebuild_task: asyncio.Task[Any] | None = None
        self._prune_task: asyncio.Task[int] | None = None
        self._prune_at = time.monotonic() + _PRUNE_EVERY_S
        self._follower = LogFollower(
            self._gallery,
            interval_s=self._config.sync_interval_s,
            listen_connect=lambda: asyncpg.connect(dsn),
            after_sync=self._background_work,
        )
        loop = asyncio.get_running_loop()
        self._follow_task = loop.create_task(self._follower.run())
        self._lag_task = loop.create_task(self._report_lag())

    def reconfigure(self, config: dict[str, Any]) -> None:
        cfg = MatcherConfig(**(config or {}))
        self._config = cfg
        self._follower.interval_s = cfg.sync_interval_s
        self._gallery.snapshot_every = cfg.snapshot_every
        self._gallery.snapshot_max_behind = cfg.snapshot_max_behind
        self._gallery.set_policy(
            IndexPolicy(
                exact_max=cfg.exact_max_faces,
                memory_budget_bytes=int(cfg.index_memory_budget_mb * (1 << 20)),
                target_recall=cfg.target_recall,
            )
        )

    def _background_work(self) -> None:
        loop = asyncio.get_running_loop()
        # Snapshots are written by a task of their own: a slow upload
        # never delays following the log, and only one runs at a time.
        if (self._snapshot_task is None or self._snapshot_task.done()) and self._gallery.snapshot_due():
            self._snapshot_task = loop.create_task(self._gallery.write_snapshots())
        # Index rebuilds (a collection outgrew exact search, or its IVF needs
        # retraining) run in a thread; searches use the old index until the
        # new one is swapped in.
        if (self._rebuild_task is None or self._rebuild_task.done()) and self._gallery.rebuild_due():
            self._rebuild_task = loop.create_task(self._gallery.rebuild_indexes())
        # Now and then, the change log below what every newest snapshot needs goes.
        if (self._prune_task is None or self._prune_task.done()) and time.monotonic() >= self._prune_at:
            self._prune_at = time.monotonic() + _PRUNE_EVERY_S
            self._prune_task = loop.create_task(self._gallery.prune_log(self._config.log_retention_s))

    async def _report_lag(self) -> None:
        while True:
            lag = self._gallery.lag()
            self._metrics.matcher_seq_behind.set(float(lag.seq_behind))
            # A replica that never synced reports a large finite age, not inf.
            self._metrics.matcher_sync_age.set(min(lag.sync_age_s, 1e9))
            await asyncio.sleep(_LAG_REPORT_S)

    async def sync(self) -> int:
        return await self._gallery.sync()

    async def search(
        self, embeddings: EmbeddingResult, collection_id: int, k: int, min_seq: int = 0,
        known_seq: int = 0, feedback_similarity: float | None = None,
    ) -> MatchResult:
        """Top-k subjects per face, named and marked demoted from this replica's
        own state: no database read unless a seq not applied yet is asked for.

        min_seq is the caller's read-your-writes: 400 if never committed, 503
        if the log is out of reach, never a stale answer. known_seq is the
        ingress's own newest write, a courtesy: reached when the log can be
        read, otherwise (Postgres down, or a log rewound below it) the answer
        is the state held, and its seq says which."""
        n0, t0 = now_ns(), time.perf_counter()
        if min_seq > self._gallery.seq:
            await self._gallery.reach(min_seq, self._config.min_seq_timeout_s)
        if known_seq > self._gallery.seq:
            try:
                await self._gallery.reach(known_seq, self._config.min_seq_timeout_s)
            except (ServiceUnavailable, InvalidRequest) as exc:
                log.warning("answering at seq %d without reaching this ingress's write %d: %s",
                            self._gallery.seq, known_seq, exc)
        seq = self._gallery.seq  # read first: the search reflects at least this
        loop = asyncio.get_running_loop()
        search = functools.partial(self._gallery.search, collection_id, embeddings.vectors, k,
                                   feedback_similarity, embeddings.model)
        try:
            hits = await loop.run_in_executor(self._executor, search)
        except ModelChanged:
            # Probes of another model than the index's: this replica may not have
            # applied a re-embed's switch yet. Catch up once; if the models still
            # differ the caller's view is the stale one (ModelChanged names the model).
            try:
                await asyncio.wait_for(self._gallery.sync(), self._config.min_seq_timeout_s)
            except Exception as exc:  # the log out of reach: answer from what is held, or refuse
                log.warning("could not catch up before a search of collection %s: %s", collection_id, exc)
            seq = self._gallery.seq
            hits = await loop.run_in_executor(self._executor, search)
        ms = (time.perf_counter() - t0) * 1000.0
        self._metrics.observe_stages({"search": ms})
        record_span(
            embeddings.trace, "Matcher.search", n0, now_ns(),
            {"collection_id": collection_id, "k": k, "index.seq": seq},
        )
        return MatchResult(hits=hits, seq=seq, timings_ms={"search": round(ms, 3)})

    def stats(self) -> dict[str, Any]:
        lag = self._gallery.lag()
        return {
            **self._gallery.stats(),
            "seq_behind": lag.seq_behind,
            "sync_age_s": lag.sync_age_s,
            "listening": self._follower.listening,
            "reloads": self._gallery.reloads,
        }

    def ready(self) -> bool:
        return not self._follow_task.done()

    def check_health(self) -> None:
        """Serve calls this periodically; raising marks the replica unhealthy."""
        if self._follow_task.done():
            raise RuntimeError("the change-log follower has stopped")
        self._gallery.check_fresh(self._config.max_staleness_s)
