"""RedisStore fails fast: errors and hangs become RedisUnavailable, and the breaker
spares Redis (and the request) further attempts for a while (no Ray, no Redis)."""
from __future__ import annotations

import asyncio

import pytest
import redis.exceptions

from serve_app.redis_store import RedisStore, RedisUnavailable


class FlakyClient:
    def __init__(self, mode: str) -> None:
        self.mode = mode  # ok | refused | hang
        self.calls = 0

    async def get(self, key: str) -> bytes | None:
        self.calls += 1
        if self.mode == "refused":
            raise redis.exceptions.ConnectionError("Connection refused")
        if self.mode == "hang":
            await asyncio.sleep(3600)
        return b"v"


def test_a_refused_connection_opens_the_breaker_for_the_cooldown() -> None:
    client = FlakyClient("refused")
    store = RedisStore("", client=client, cooldown_s=60.0)

    async def go() -> None:
        for _ in range(3):
            with pytest.raises(RedisUnavailable):
                await store.get("k")

    asyncio.run(go())
    assert client.calls == 1 and not store.available


def test_after_the_cooldown_redis_is_tried_again() -> None:
    client = FlakyClient("refused")
    store = RedisStore("", client=client, cooldown_s=0.0)

    async def go() -> bytes | None:
        with pytest.raises(RedisUnavailable):
            await store.get("k")
        client.mode = "ok"
        return await store.get("k")

    assert asyncio.run(go()) == b"v" and client.calls == 2 and store.available


def test_a_hanging_redis_is_cut_off_by_the_deadline() -> None:
    store = RedisStore("", client=FlakyClient("hang"), timeout_s=0.02)

    async def go() -> None:
        with pytest.raises(RedisUnavailable):
            await store.get("k")

    asyncio.run(asyncio.wait_for(go(), 30))  # the outer bound only guards the test itself
    assert not store.available


def test_the_real_client_is_built_without_retries() -> None:
    store = RedisStore("redis://127.0.0.1:1/0", timeout_s=0.1)
    pool_kwargs = store._redis.connection_pool.connection_kwargs
    assert pool_kwargs["socket_timeout"] == 0.1 and pool_kwargs["socket_connect_timeout"] == 0.1
    retry = pool_kwargs.get("retry")
    assert retry is not None and retry._retries == 0
