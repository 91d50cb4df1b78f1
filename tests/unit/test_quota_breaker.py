"""The quota fails open, and after a failure stops asking Redis for a while."""
from __future__ import annotations

import asyncio

import pytest

from serve_app import quota as quota_mod
from serve_app.quota import RequestQuota


class _FailingPipeline:
    def __init__(self, calls: list[int]) -> None:
        self.calls = calls

    async def __aenter__(self) -> "_FailingPipeline":
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def incr(self, key: str) -> None:
        pass

    def expire(self, key: str, seconds: int) -> None:
        pass

    async def execute(self) -> list[int]:
        self.calls.append(1)
        raise ConnectionError("redis is down")


class _FailingRedis:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def pipeline(self, transaction: bool = True) -> _FailingPipeline:
        return _FailingPipeline(self.calls)


def test_fails_open_then_skips_redis_until_the_cooldown_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    q = RequestQuota("redis://127.0.0.1:1/0")
    fake = _FailingRedis()
    q._redis = fake  # the failing server stands in for the client's transport only
    clock = [1000.0]
    monkeypatch.setattr(quota_mod.time, "monotonic", lambda: clock[0])

    async def run() -> None:
        first = await q.check("k", 10, now=0.0)
        assert first.allowed and first.remaining == -1
        assert len(fake.calls) == 1
        for _ in range(5):  # within the cooldown: admitted, Redis not asked
            assert (await q.check("k", 10, now=0.0)).allowed
        assert len(fake.calls) == 1
        clock[0] += quota_mod.COOLDOWN_S + 0.01
        assert (await q.check("k", 10, now=0.0)).allowed
        assert len(fake.calls) == 2

    asyncio.run(run())


def test_an_unreachable_redis_is_one_fast_fail_open() -> None:
    async def run() -> None:
        q = RequestQuota("redis://127.0.0.1:1/0")  # nothing listens on port 1
        try:
            decision = await asyncio.wait_for(q.check("k", 5), 2.0)
            assert decision.allowed and decision.remaining == -1
            assert (await asyncio.wait_for(q.check("k", 5), 0.05)).allowed  # breaker open: no connect
        finally:
            await q.close()

    asyncio.run(run())
