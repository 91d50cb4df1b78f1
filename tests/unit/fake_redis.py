"""An in-memory stand-in for serve_app.redis_store.RedisStore (unit tests only).

Same methods and semantics (SET NX, expiry, compare-and-set, sets), and a
`down` switch that makes every call raise RedisUnavailable, as the real
store does when Redis is stopped. The real store is tested against a real
Redis in tests/integration/test_redis_store.py.
"""
from __future__ import annotations

import time

from serve_app.redis_store import RedisUnavailable


class FakeKV:
    def __init__(self) -> None:
        self.data: dict[str, tuple[bytes, float]] = {}
        self.sets: dict[str, set[str]] = {}
        self.down = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise RedisUnavailable("fake redis is down")

    def _live(self, key: str) -> bytes | None:
        hit = self.data.get(key)
        if hit is None:
            return None
        if hit[1] <= time.monotonic():
            del self.data[key]
            return None
        return hit[0]

    @property
    def available(self) -> bool:
        return not self.down

    async def get(self, key: str) -> bytes | None:
        self._check()
        return self._live(key)

    async def set(self, key: str, value: bytes, ttl_s: int, *, nx: bool = False) -> bool:
        self._check()
        if nx and self._live(key) is not None:
            return False
        self.data[key] = (bytes(value), time.monotonic() + ttl_s)
        return True

    async def compare_and_set(self, key: str, expected: bytes, value: bytes | None, ttl_s: int) -> bool:
        self._check()
        if self._live(key) != expected:
            return False
        if value is None:
            del self.data[key]
        else:
            self.data[key] = (bytes(value), time.monotonic() + ttl_s)
        return True

    async def delete(self, *keys: str) -> int:
        self._check()
        n = 0
        for key in keys:
            if self._live(key) is not None:
                del self.data[key]
                n += 1
            elif key in self.sets:
                del self.sets[key]
                n += 1
        return n

    async def add_to_set(self, key: str, member: str, ttl_s: int) -> None:
        self._check()
        self.sets.setdefault(key, set()).add(member)

    async def members(self, key: str) -> set[str]:
        self._check()
        return set(self.sets.get(key, set()))

    def keys(self) -> set[str]:
        return {k for k in list(self.data) if self._live(k) is not None} | set(self.sets)
