"""Idempotency-Key on the real app (Ray Serve, Postgres, Redis): a retried
enrolment enrols once, concurrent duplicates too, another body is refused."""
from __future__ import annotations

import asyncio
import uuid
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import httpx
import pytest

from tests.conftest import people
from tests.integration.conftest import LiveApp

COLLECTION = "idempotency-it"


@pytest.fixture(scope="module")
def subject(live_app: LiveApp) -> str:
    with live_app.client() as c:
        c.post("/v1/collections", json={"name": COLLECTION})  # 201, or 409 from an earlier run of this module
        r = c.post("/v1/subjects", json={"name": f"idem-{uuid.uuid4().hex[:6]}", "collection": COLLECTION})
        assert r.status_code == 201, r.text
        return r.json()["id"]


async def _faces(dsn: str, subject_id: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return [r["id"] for r in await conn.fetch("SELECT id FROM faces WHERE subject_id = $1",
                                                  uuid.UUID(subject_id))]
    finally:
        await conn.close()


def _enrol(c: httpx.Client, subject_id: str, image: bytes, key: str) -> httpx.Response:
    return c.post(f"/v1/subjects/{subject_id}/faces", params={"collection": COLLECTION},
                  files={"image": ("p.jpg", image)}, data={"liveness": "off"},
                  headers={"Idempotency-Key": key})


def test_an_enrolment_retried_three_times_gives_one_face(live_app: LiveApp, subject: str) -> None:
    image = people()["biden"][0].read_bytes()
    before = asyncio.run(_faces(live_app.database_url, subject))
    key = f"retry-{uuid.uuid4().hex}"
    with live_app.client() as c:
        answers = [_enrol(c, subject, image, key) for _ in range(3)]
    assert [r.status_code for r in answers] == [201, 201, 201], answers[0].text
    assert answers[0].json() == answers[1].json() == answers[2].json()
    assert [r.headers.get("idempotent-replayed") for r in answers] == [None, "true", "true"]
    after = asyncio.run(_faces(live_app.database_url, subject))
    assert sorted(set(after) - set(before)) == [answers[0].json()["face"]["id"]]


def test_concurrent_duplicates_enrol_once(live_app: LiveApp, subject: str) -> None:
    image = people()["biden"][1].read_bytes()
    before = asyncio.run(_faces(live_app.database_url, subject))
    key = f"burst-{uuid.uuid4().hex}"
    with live_app.client() as c, ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: _enrol(c, subject, image, key), range(3)))
    assert [r.status_code for r in answers] == [201, 201, 201], [r.text for r in answers]
    assert len({r.json()["face"]["id"] for r in answers}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in answers) == 2
    assert len(set(asyncio.run(_faces(live_app.database_url, subject))) - set(before)) == 1


def test_the_same_key_with_another_image_is_refused(live_app: LiveApp, subject: str) -> None:
    ppl = people()["biden"]
    key = f"reuse-{uuid.uuid4().hex}"
    with live_app.client() as c:
        assert _enrol(c, subject, ppl[0].read_bytes(), key).status_code == 201
        before = asyncio.run(_faces(live_app.database_url, subject))
        r = _enrol(c, subject, ppl[1].read_bytes(), key)
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused", r.text
    assert asyncio.run(_faces(live_app.database_url, subject)) == before
