"""RedisStore, the embedding cache and idempotency records against a real Redis
(127.0.0.1:6379, keys under a prefix of this test's own, removed afterwards).
No Ray: these run without the shared lock."""
from __future__ import annotations

import asyncio
import socket
import uuid
from typing import AsyncIterator

import numpy as np
import pytest

from serve_app.embedding_cache import EmbeddingCache, SubjectKeys
from serve_app.idempotency import Answer, Idempotency
from serve_app.messages import DetectionResult, EmbeddingResult, FaceInfo
from serve_app.redis_store import RedisStore, RedisUnavailable
from tests.integration.conftest import REDIS_URL


@pytest.fixture()
async def store() -> AsyncIterator[tuple[RedisStore, str]]:
    s = RedisStore(REDIS_URL)
    prefix = f"faceserve-test-{uuid.uuid4().hex[:8]}"
    try:
        yield s, prefix
    finally:
        keys = [k async for k in s._redis.scan_iter(match=f"{prefix}:*")]
        if keys:
            await s._redis.delete(*keys)
        await s.close()


def _result() -> tuple[DetectionResult, EmbeddingResult]:
    v = np.eye(1, 128, dtype=np.float32)
    det = DetectionResult([FaceInfo((1.0, 2.0, 3.0, 4.0), np.ones((5, 2), np.float32), 0.9, None)],
                          np.zeros((1, 112, 112, 3), np.uint8), None, None, (10, 10), "JPEG")
    return det, EmbeddingResult("sface", 128, v)


async def test_set_nx_expiry_and_compare_and_set(store) -> None:
    s, prefix = store
    key = f"{prefix}:k"
    assert await s.set(key, b"a", 60, nx=True)
    assert not await s.set(key, b"b", 60, nx=True)
    assert await s.get(key) == b"a"
    assert not await s.compare_and_set(key, b"other", b"c", 60)
    assert await s.compare_and_set(key, b"a", b"c", 60)
    assert await s.get(key) == b"c"
    assert await s.compare_and_set(key, b"c", None, 60)
    assert await s.get(key) is None
    await s.set(key, b"x", 1)
    await asyncio.sleep(1.2)
    assert await s.get(key) is None


async def test_cache_and_subject_keys_round_trip(store) -> None:
    s, prefix = store
    cache = EmbeddingCache(s, prefix=prefix)
    keys = SubjectKeys(s, prefix=prefix)
    det, emb = _result()
    assert await cache.put("sha", "ident", det, emb)
    assert 3500 < await s._redis.ttl(cache.key("sha", "ident")) <= 3600
    got = await cache.get("sha", "ident")
    assert got is not None and np.array_equal(got[1].vectors, emb.vectors)
    sid = uuid.uuid4()
    assert await keys.tie(sid, cache.key("sha", "ident"))
    assert await keys.forget(sid) == 1
    assert await cache.get("sha", "ident") is None
    assert not [k async for k in s._redis.scan_iter(match=f"{prefix}:*")]


async def test_idempotency_over_real_redis(store) -> None:
    s, prefix = store
    idem = Idempotency(s, prefix=prefix, poll_s=0.01)
    runs = []

    async def work() -> Answer:
        runs.append(1)
        await asyncio.sleep(0.1)
        return Answer(201, {"id": len(runs)})

    key = idem.record_key(tenant="t", actor="a", route="r", collection="c", key="k")
    answers = await asyncio.gather(*(idem.run(key, "h", work) for _ in range(3)))
    assert len(runs) == 1 and {a.body["id"] for a in answers} == {1}
    assert sum(a.replayed for a in answers) == 2
    assert 86000 < await s._redis.ttl(key) <= 86400


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_a_stopped_redis_fails_fast_and_the_breaker_holds() -> None:
    s = RedisStore(f"redis://127.0.0.1:{_closed_port()}/0", cooldown_s=60.0)
    with pytest.raises(RedisUnavailable):
        await s.get("k")
    assert not s.available
    with pytest.raises(RedisUnavailable):  # answered by the breaker, no connection attempt
        await s.set("k", b"v", 10)
    cache = EmbeddingCache(s)
    assert await cache.get("sha", "ident") is None
    await s.close()
