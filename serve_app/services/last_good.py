"""A per-replica lookup cache that keeps its last good answer through an outage.

The ingress looks up API keys, tenants and collections in Postgres on behalf
of every request. Those rows change rarely, so an answer is reused for
``ttl_s``; after that the next request asks again. When asking fails because
a dependency is down (serve_app.errors.dependency_outage), the last good
answer is served for as long as it is younger than ``stale_s``, so reads
(identify, verify) go on through a database restart or failover. Past that
bound, or with nothing cached, the outage is raised (503 + Retry-After).

Staleness is therefore bounded twice: while Postgres answers, a change made
through another replica shows here within ``ttl_s``; while it does not, no
change can be made at all, and an answer older than ``stale_s`` is never used.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from serve_app.errors import dependency_outage

log = logging.getLogger("ray.serve")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LastGood(Generic[K, V]):
    def __init__(self, *, ttl_s: float, stale_s: float, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.stale_s = stale_s
        self.max_entries = max_entries
        self.clock = clock
        self._items: dict[K, tuple[float, V]] = {}
        self.stale_served = 0  # answers given from the cache while the database was out of reach

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        """The cached answer while fresh; else load() and keep what it returns.
        A failure that is not an outage (a bug, a 4xx) is raised as is and
        never cached."""
        now = self.clock()
        hit = self._items.get(key)
        if hit is not None and now - hit[0] <= self.ttl_s:
            return hit[1]
        try:
            value = await load()
        except Exception as exc:
            down = dependency_outage(exc)
            if down is None:
                raise
            if hit is not None and now - hit[0] <= self.stale_s:
                self.stale_served += 1
                if self.stale_served % 100 == 1:
                    log.warning("lookup %r served from a %.0f s old answer: %s", key, now - hit[0], down.message)
                return hit[1]
            raise down from exc
        self.put(key, value)
        return value

    def put(self, key: K, value: V) -> None:
        if key not in self._items and len(self._items) >= self.max_entries:
            # Unknown ids from scanners must not grow this for ever; the
            # oldest answers go first.
            for old in sorted(self._items, key=lambda k: self._items[k][0])[: max(1, self.max_entries // 10)]:
                del self._items[old]
        self._items[key] = (self.clock(), value)

    def pop(self, key: K, default: V | None = None) -> V | None:
        hit = self._items.pop(key, None)
        return hit[1] if hit is not None else default

    def drop(self, pred: Callable[[K, V], bool]) -> int:
        """Forget every entry for which pred(key, value) holds; how many."""
        doomed = [k for k, (_, v) in self._items.items() if pred(k, v)]
        for k in doomed:
            del self._items[k]
        return len(doomed)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
