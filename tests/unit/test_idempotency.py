"""Idempotency-Key rules over an in-memory store (no Ray, no Redis): once, replay,
another body refused, concurrent repeats, failures released, Redis down."""
from __future__ import annotations

import asyncio

import pytest

from serve_app.errors import IdempotencyInProgress, IdempotencyKeyReused, InvalidRequest
from serve_app.idempotency import Answer, Idempotency, body_hash, check_key
from tests.unit.fake_redis import FakeKV


class Work:
    """A write that counts how often it ran."""

    def __init__(self, delay_s: float = 0.0, fail: BaseException | None = None) -> None:
        self.runs = 0
        self.delay_s = delay_s
        self.fail = fail

    async def __call__(self) -> Answer:
        self.runs += 1
        await asyncio.sleep(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return Answer(201, {"face": {"id": self.runs}})


def _idem(kv: FakeKV, **kw: object) -> tuple[Idempotency, list[str]]:
    seen: list[str] = []
    return Idempotency(kv, count=seen.append, poll_s=0.01, **kw), seen  # type: ignore[arg-type]


def test_the_same_key_and_body_runs_once_and_replays_the_answer() -> None:
    idem, seen = _idem(FakeKV())
    work = Work()

    async def go() -> list[Answer]:
        return [await idem.run("k", "h1", work) for _ in range(3)]

    first, *again = asyncio.run(go())
    assert work.runs == 1
    assert first == Answer(201, {"face": {"id": 1}}) and not first.replayed
    assert all(a.status == 201 and a.body == first.body and a.replayed for a in again)
    assert seen == ["claimed", "replayed", "replayed"]


def test_the_same_key_with_another_body_is_refused() -> None:
    idem, seen = _idem(FakeKV())
    work = Work()

    async def go() -> None:
        await idem.run("k", "h1", work)
        await idem.run("k", "h2", work)

    with pytest.raises(IdempotencyKeyReused):
        asyncio.run(go())
    assert work.runs == 1 and seen[-1] == "key_reused"


def test_a_concurrent_repeat_waits_for_the_first_and_gets_its_answer() -> None:
    idem, _ = _idem(FakeKV(), wait_s=5.0)
    work = Work(delay_s=0.1)

    async def go() -> list[Answer]:
        return list(await asyncio.gather(idem.run("k", "h", work), idem.run("k", "h", work)))

    a, b = asyncio.run(go())
    assert work.runs == 1 and a.body == b.body and {a.replayed, b.replayed} == {False, True}


def test_a_repeat_that_outwaits_its_patience_gets_in_progress() -> None:
    idem, seen = _idem(FakeKV(), wait_s=0.05)
    work = Work(delay_s=0.5)

    async def go() -> BaseException | None:
        first = asyncio.ensure_future(idem.run("k", "h", work))
        await asyncio.sleep(0.01)
        try:
            await idem.run("k", "h", work)
        except IdempotencyInProgress as exc:
            await first
            return exc
        return None

    exc = asyncio.run(go())
    assert isinstance(exc, IdempotencyInProgress) and exc.details["retry_after_s"] == 1
    assert work.runs == 1 and "in_progress" in seen


def test_a_failed_request_releases_its_key_so_the_retry_runs() -> None:
    kv = FakeKV()
    idem, _ = _idem(kv)
    failing = Work(fail=RuntimeError("database down"))

    async def go() -> Answer:
        with pytest.raises(RuntimeError):
            await idem.run("k", "h", failing)
        return await idem.run("k", "h", Work())

    assert asyncio.run(go()) == Answer(201, {"face": {"id": 1}})
    assert failing.runs == 1


def test_with_redis_down_the_request_is_served_without_the_guarantee() -> None:
    kv = FakeKV()
    kv.down = True
    idem, seen = _idem(kv)
    work = Work()

    async def go() -> list[Answer]:
        return [await idem.run("k", "h", work) for _ in range(2)]

    answers = asyncio.run(go())
    assert work.runs == 2 and all(a.status == 201 for a in answers)
    assert seen == ["unenforced", "unenforced"]


def test_redis_lost_between_claim_and_answer_still_answers() -> None:
    kv = FakeKV()
    idem, seen = _idem(kv)

    async def work() -> Answer:
        kv.down = True
        return Answer(201, {"ok": True})

    assert asyncio.run(idem.run("k", "h", work)) == Answer(201, {"ok": True})
    assert seen == ["claimed", "unrecorded"]


def test_a_client_that_hangs_up_does_not_stop_the_write_or_its_record() -> None:
    kv = FakeKV()
    idem, _ = _idem(kv)
    work = Work(delay_s=0.1)

    async def go() -> Answer:
        request = asyncio.ensure_future(idem.run("k", "h", work))
        await asyncio.sleep(0.02)
        request.cancel()  # the proxy cancels the handler when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.sleep(0.2)
        return await idem.run("k", "h", work)  # the client's retry

    again = asyncio.run(go())
    assert work.runs == 1 and again.replayed and again.body == {"face": {"id": 1}}


def test_records_are_scoped_by_tenant_caller_route_and_collection() -> None:
    idem, _ = _idem(FakeKV())
    base = dict(tenant="t", actor="a", route="POST /v1/subjects", collection="c", key="k")
    keys = {idem.record_key(**base)}
    for field, other in (("tenant", "t2"), ("actor", "a2"), ("route", "POST /v1/x"), ("collection", "c2"),
                         ("key", "k2")):
        keys.add(idem.record_key(**{**base, field: other}))
    assert len(keys) == 6


def test_body_hash_ignores_framing_but_not_content() -> None:
    a = body_hash({"liveness": "off", "largest": "true"}, {"image": b"jpeg-1"})
    assert a == body_hash({"largest": "true", "liveness": "off"}, {"image": b"jpeg-1"})
    assert a != body_hash({"liveness": "off", "largest": "true"}, {"image": b"jpeg-2"})
    assert a != body_hash({"liveness": "block", "largest": "true"}, {"image": b"jpeg-1"})


@pytest.mark.parametrize("bad", ["", "has space", "x" * 256, "caf\u00e9", "tab\there"])
def test_malformed_keys_are_refused(bad: str) -> None:
    with pytest.raises(InvalidRequest):
        check_key(bad)


def test_good_keys_pass() -> None:
    assert check_key("8d5e-4b1f_retry:1") == "8d5e-4b1f_retry:1"
