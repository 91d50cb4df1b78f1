"""Erasure you can prove: the sweeper that empties the object outbox, and receipts.

A delete (face, subject, collection) commits the row delete, an erasure
record and one outbox row per copy outside Postgres in one transaction
(serve_app/gallery/erasures.py). This service then removes those copies:

- crops: each known key, and the whole crops/<collection>/<subject>/ prefix,
  listed, so a crop no row points at goes too;
- snapshots: every index snapshot object of the collection older than the
  delete's change-log seq (those still hold the vectors; a newer one cannot);
- cache: the Redis keys tied to the subject (its enrolment images'
  embedding-cache entries, its idempotency records), through the cache's
  delete hook (serve_app/embedding_cache.SubjectKeys.forget) when the
  deployment has one.

An item counts as done only when the store confirms it (a fresh listing or
a direct lookup shows nothing left); a failure reschedules it with
exponential backoff (1 s doubling to 30 s), and a claim is a lease, so an
item whose sweeper died is taken up again. The last item of an erasure
stamps it complete (and writes an `erasure.complete` audit record).

Where it runs: an asyncio task in every Ingress replica. The ingress
already holds the Postgres pool and the object store, it always runs (at
least one replica), and its replicas share the outbox safely (claims use
FOR UPDATE SKIP LOCKED); the matcher's event loop serves searches and is
kept free of bucket listings, and the bulk job is not always running. A
delete also sweeps its own erasure at once for up to ``settle_s``, so with
storage healthy the delete answer already says complete.

Enrolment guards: before an enrolment uploads its crop it writes an outbox
row for that key (``guard``) due after ``guard_grace_s``; the transaction
that writes the face row deletes it. A crop whose enrolment failed, was
cancelled or died between upload and commit is swept once the grace period
has passed, and a claimed guard makes a late commit fail instead of
pointing a row at a crop being deleted.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from serve_app.errors import ErasureNotFound
from serve_app.gallery.erasures import OutboxItem, Receipt
from serve_app.gallery.index_snapshots import snapshot_seq_of

log = logging.getLogger("ray.serve")

T = TypeVar("T")


class ErasurePort(Protocol):
    async def guard(self, key: str, grace_s: float) -> int: ...
    async def drop_guard(self, guard_id: int) -> None: ...
    async def claim(self, *, limit: int, lease_s: float, erasure_id: uuid.UUID | None = None) -> list[OutboxItem]: ...
    async def finish(self, item: OutboxItem, removed: int, note: str | None = None) -> bool: ...
    async def progress(self, item: OutboxItem, removed: int) -> None: ...
    async def retry_later(self, item: OutboxItem, delay_s: float, error: str) -> None: ...
    async def receipt(self, erasure_id: uuid.UUID, tenant: str | None) -> Receipt | None: ...
    async def backlog(self, guard_grace_s: float) -> tuple[int, float]: ...


class StorePort(Protocol):
    """Blocking object-store calls (ObjectStore); the sweeper runs them in a thread."""

    def present(self, key: str) -> bool: ...
    def delete_keys(self, keys: list[str]) -> None: ...
    def list_keys(self, prefix: str) -> list[str]: ...


class CacheEraser(Protocol):
    """The Redis delete hook: every key tied to a subject (embedding_cache.SubjectKeys).
    Raises when Redis is unreachable, so the item is retried, not reported done."""

    async def forget(self, subject_id: str) -> int: ...


class StillThere(RuntimeError):
    """The store still shows a copy after deleting it."""


@dataclass
class SweeperConfig:
    interval_s: float = 5.0  # idle poll of the outbox (a delete also wakes the sweeper)
    batch: int = 20  # outbox rows per claim
    lease_s: float = 120.0  # a claimed row is due again after this if its sweeper vanished
    base_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    op_timeout_s: float = 60.0  # one store or cache call
    prefix_batch: int = 1000  # keys deleted per pass over a large prefix
    guard_grace_s: float = 600.0  # an enrolment's crop is an orphan after this (requests end in 30 s)
    settle_s: float = 5.0  # a delete waits this long for its own erasure before answering


class ErasureService:
    def __init__(self, repo: ErasurePort, store: StorePort, cache: CacheEraser | None = None,
                 config: SweeperConfig | None = None,
                 on_backlog: Callable[[int, float], None] | None = None) -> None:
        self.repo = repo
        # Told (rows owed, age of the oldest in s) after each pass of run(),
        # at most every interval_s: the metrics behind the ErasureBacklog alert.
        self.on_backlog = on_backlog
        self._backlog_at = float("-inf")
        self.store = store
        self.cache = cache
        self.config = config or SweeperConfig()
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.failures = 0  # attempts that failed and were rescheduled
        self.completed = 0  # erasures this replica completed
        self._failed_at = float("-inf")  # monotonic time of the latest failed attempt

    # ------------------------------------------------------------ enrolment
    async def guard(self, key: str) -> int:
        return await self.repo.guard(key, self.config.guard_grace_s)

    async def drop_guard(self, guard_id: int) -> None:
        await self.repo.drop_guard(guard_id)

    # ------------------------------------------------------------ receipts
    async def receipt(self, erasure_id: uuid.UUID | str, tenant: str | None) -> Receipt:
        """One tenant's erasure (another tenant's is simply not found)."""
        try:
            eid = erasure_id if isinstance(erasure_id, uuid.UUID) else uuid.UUID(str(erasure_id))
        except ValueError:
            raise ErasureNotFound(f"no erasure with id {erasure_id!r}", erasure_id=str(erasure_id)) from None
        found = await self.repo.receipt(eid, tenant)
        if found is None:
            raise ErasureNotFound(f"no erasure with id {eid}", erasure_id=str(eid))
        return found

    async def settle(self, erasure_id: uuid.UUID) -> None:
        """Sweep this erasure now, waiting up to settle_s; what is left (the
        store is down, a large prefix) goes on in the background and then
        in the sweeper loop. While attempts are failing (the store or Redis
        is down) the delete does not wait at all: a run of deletes (the
        compatibility APIs' delete-all) must not take settle_s each."""
        task = asyncio.get_running_loop().create_task(self._sweep_erasure(erasure_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if time.monotonic() - self._failed_at < self.config.max_backoff_s:
            return
        await asyncio.wait({task}, timeout=self.config.settle_s)

    async def _sweep_erasure(self, erasure_id: uuid.UUID) -> None:
        try:
            while await self.sweep_once(erasure_id=erasure_id) > 0:
                pass
        except Exception:  # Postgres down: the loop (any replica) takes it up later
            log.warning("sweeping erasure %s failed; the sweeper will retry", erasure_id, exc_info=True)

    # ------------------------------------------------------------ sweeping
    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Forever: work due outbox rows, then wait for a wake-up or the interval."""
        while True:
            try:
                n = await self.sweep_once()
            except Exception:  # Postgres unreachable: nothing can be claimed; try again later
                log.warning("erasure sweep failed; retrying in %ss", self.config.interval_s, exc_info=True)
                n = 0
            await self.report_backlog()
            if n < self.config.batch:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.config.interval_s)
                except asyncio.TimeoutError:
                    pass
                self._wake.clear()

    async def report_backlog(self, force: bool = False) -> tuple[int, float] | None:
        """Ask the outbox how much is owed and tell on_backlog (every
        interval_s at most, unless forced); None when not asked or Postgres
        cannot say (the gauges then keep their last value)."""
        now = time.monotonic()
        if self.on_backlog is None or (not force and now - self._backlog_at < self.config.interval_s):
            return None
        self._backlog_at = now
        try:
            due, oldest = await self.repo.backlog(self.config.guard_grace_s)
        except Exception:
            log.warning("could not read the erasure outbox backlog", exc_info=True)
            return None
        self.on_backlog(due, oldest)
        return due, oldest

    async def sweep_once(self, erasure_id: uuid.UUID | None = None) -> int:
        """Claim due rows (of one erasure, or any) and work them; the number claimed."""
        items = await self.repo.claim(limit=self.config.batch, lease_s=self.config.lease_s, erasure_id=erasure_id)
        for item in items:
            await self._work(item)
        return len(items)

    async def _work(self, item: OutboxItem) -> None:
        try:
            removed, note, more = await self._clear(item)
        except Exception as exc:  # whatever the store or cache raised: retry later
            self.failures += 1
            self._failed_at = time.monotonic()
            delay = self.backoff_s(item.attempts)
            log.warning("erasure outbox %s %s %s failed (attempt %d): %s; retrying in %.1fs",
                        item.id, item.op, item.target, item.attempts, exc, delay)
            try:
                await self.repo.retry_later(item, delay, f"{type(exc).__name__}: {exc}")
            except Exception:  # the lease makes it due again anyway
                log.warning("could not reschedule outbox row %s", item.id, exc_info=True)
            return
        if more:
            await self.repo.progress(item, removed)
            return
        if await self.repo.finish(item, removed, note):
            self.completed += 1
            log.info("erasure %s complete", item.erasure_id)

    def backoff_s(self, attempts: int) -> float:
        """Exponential in the failed attempts so far, capped, with jitter so
        replicas do not retry in step."""
        delay = min(self.config.max_backoff_s, self.config.base_backoff_s * 2 ** min(max(attempts - 1, 0), 20))
        return delay * random.uniform(0.75, 1.0)

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wait_for(asyncio.to_thread(fn, *args), self.config.op_timeout_s)

    async def _clear(self, item: OutboxItem) -> tuple[int, str | None, bool]:
        """Remove one copy and confirm it gone: (removed, note, more to do)."""
        if item.op == "object":
            existed = await self._io(self.store.present, item.target)
            if existed:
                await self._io(self.store.delete_keys, [item.target])
            if await self._io(self.store.present, item.target):
                raise StillThere(f"{item.target} is still in the object store")
            return int(existed), None, False
        if item.op in ("prefix", "snapshots_below"):
            keys = self._select(item, await self._io(self.store.list_keys, item.target))
            batch = keys[: self.config.prefix_batch]
            await self._io(self.store.delete_keys, batch)
            if len(keys) > len(batch):
                return len(batch), None, True
            left = self._select(item, await self._io(self.store.list_keys, item.target))
            if left:
                raise StillThere(f"{len(left)} objects still under {item.target}, e.g. {left[0]}")
            return len(batch), None, False
        if item.op == "cache":
            if self.cache is None:
                return 0, "no Redis cache configured on the replica that swept this", False
            n = 0
            for subject_id in item.items:
                n += int(await asyncio.wait_for(self.cache.forget(subject_id), self.config.op_timeout_s))
            return n, None, False
        raise ValueError(f"unknown outbox op {item.op!r}")

    @staticmethod
    def _select(item: OutboxItem, keys: list[str]) -> list[str]:
        if item.op != "snapshots_below":
            return keys
        below = item.below_seq or 0
        return [k for k in keys if (s := snapshot_seq_of(k)) is not None and s < below]
