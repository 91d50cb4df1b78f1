"""The ingress's lookup cache: fresh answers reused, the last good one served
through a database outage for a bounded time, bugs never hidden."""
from __future__ import annotations

import asyncio

import asyncpg
import pytest

from serve_app.errors import CollectionNotFound, ServiceUnavailable
from serve_app.services.access import Authenticator
from serve_app.services.gallery import GalleryService
from serve_app.services.last_good import LastGood
from tests.unit.fakes import DIM, FakeAccess, FakeObjects, FakePipeline, FakeRepo


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Source:
    """A lookup that counts its calls and can be made to fail."""

    def __init__(self) -> None:
        self.value = "v1"
        self.calls = 0
        self.error: BaseException | None = None

    async def __call__(self) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.value


async def test_fresh_answers_are_reused_then_asked_again() -> None:
    clock, src = Clock(), Source()
    cache: LastGood[str, str] = LastGood(ttl_s=5, stale_s=60, clock=clock)
    assert await cache.get("k", src) == "v1"
    src.value = "v2"
    clock.now += 4
    assert await cache.get("k", src) == "v1" and src.calls == 1
    clock.now += 2
    assert await cache.get("k", src) == "v2" and src.calls == 2


@pytest.mark.parametrize("down", [ConnectionRefusedError(111, "refused"), asyncpg.exceptions.AdminShutdownError(),
                                  asyncpg.exceptions.CannotConnectNowError(), asyncio.TimeoutError(),
                                  asyncpg.exceptions.InternalClientError("cannot switch to state 15; another "
                                                                         "operation (2) is in progress")])
async def test_outage_serves_the_last_good_answer_within_the_bound(down: BaseException) -> None:
    clock, src = Clock(), Source()
    cache: LastGood[str, str] = LastGood(ttl_s=5, stale_s=60, clock=clock)
    await cache.get("k", src)
    src.error = down
    clock.now += 59
    assert await cache.get("k", src) == "v1"
    assert cache.stale_served == 1
    clock.now += 2  # 61 s old: past the bound
    with pytest.raises(ServiceUnavailable):
        await cache.get("k", src)
    with pytest.raises(ServiceUnavailable):  # nothing cached at all
        await cache.get("other", src)
    src.error = None
    assert await cache.get("k", src) == "v1"  # back: asked again, fresh


async def test_a_bug_or_a_4xx_is_raised_and_never_cached() -> None:
    clock, src = Clock(), Source()
    cache: LastGood[str, str] = LastGood(ttl_s=5, stale_s=60, clock=clock)
    await cache.get("k", src)
    clock.now += 10
    src.error = KeyError("bug")
    with pytest.raises(KeyError):
        await cache.get("k", src)
    src.error = CollectionNotFound("gone")
    with pytest.raises(CollectionNotFound):
        await cache.get("k", src)


async def test_entries_are_bounded() -> None:
    cache: LastGood[int, int] = LastGood(ttl_s=5, stale_s=60, max_entries=100)
    for i in range(1000):
        cache.put(i, i)
    assert len(cache) <= 100 and cache.pop(999) == 999


async def test_keys_and_tenants_survive_a_database_outage() -> None:
    access = FakeAccess()
    _, token = await access.create_key("default", ["read"])
    auth = Authenticator(access, None, cache_ttl_s=0.0, stale_s=300)
    who = await auth.authenticate({"x-api-key": token}, "1.2.3.4")
    assert (await auth.tenant("default")).name == "default"

    async def down(*_a: object) -> None:
        raise ConnectionRefusedError(111, "postgres is down")

    access.get_key = access.get_tenant = access.any_keys = down  # type: ignore[method-assign]
    assert await auth.authenticate({"x-api-key": token}, "1.2.3.4") == who
    assert (await auth.tenant("default")).name == "default"
    with pytest.raises(ServiceUnavailable):  # a key never seen cannot be checked: 503, not 401
        await auth.authenticate({"x-api-key": "fsk_0123456789abcdef_secret"}, "1.2.3.4")
    auth.set_bounds(stale_s=0.0)
    with pytest.raises(ServiceUnavailable):
        await auth.authenticate({"x-api-key": token}, "1.2.3.4")


async def test_collections_survive_a_database_outage_but_a_miss_is_never_cached() -> None:
    repo = FakeRepo()
    gallery = GalleryService(FakePipeline(repo), repo, FakeObjects(), model="fake", dim=DIM,
                             default_collection="default", lookup_ttl_s=0.0)
    made = await gallery.collection("staff", create=True)
    with pytest.raises(CollectionNotFound):
        await gallery.collection("later")
    await repo.ensure_collection("later", "fake", DIM)  # made through another replica
    assert (await gallery.collection("later")).name == "later"

    async def down(*_a: object) -> None:
        raise ConnectionRefusedError(111, "postgres is down")

    repo.get_collection = repo.ensure_collection = down  # type: ignore[method-assign]
    assert await gallery.collection("staff") == made
    with pytest.raises(ServiceUnavailable):
        await gallery.collection("never-seen")


async def test_a_stopped_database_is_a_database_outage() -> None:
    """A stopped server's socket file is gone: asyncpg raises FileNotFoundError,
    which must read as the database's 503, not object storage's."""
    from serve_app.errors import dependency_outage
    from serve_app.gallery.repository import DatabaseUnreachable, _connect

    with pytest.raises(DatabaseUnreachable) as err:
        await _connect("postgresql://postgres:@/postgres?host=/nonexistent-socket-dir", timeout=5)
    down = dependency_outage(err.value)
    assert down is not None and down.details["dependency"] == "postgres"
