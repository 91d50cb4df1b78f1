"""Idempotency-Key through the real FastAPI app over fake services (no Ray, no Redis)."""
from __future__ import annotations

import asyncio
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from serve_app.api.app import create_app
from serve_app.api.deps import Edge
from serve_app.deployment_config import IngressConfig
from serve_app.embedding_cache import SubjectKeys
from serve_app.idempotency import Idempotency
from serve_app.services.access import Authenticator
from serve_app.services.gallery import GalleryService
from serve_app.services.recognition import RecognitionService
from tests.unit.fake_redis import FakeKV
from tests.unit.fakes import DIM, CountingOutcomes, FakeAccess, FakeObjects, FakePipeline, FakeRepo, unit

JPEG = b"\xff\xd8\xff\xe0" + b"face-a"
JPEG_B = b"\xff\xd8\xff\xe0" + b"face-b"


@pytest.fixture()
def app() -> Iterator[tuple[TestClient, FakeRepo, FakeKV]]:
    repo, kv = FakeRepo(), FakeKV()
    pipe = FakePipeline(repo)
    pipe.script(JPEG, unit(1, 0, 0, 0))
    pipe.script(JPEG_B, unit(0, 1, 0, 0))
    gallery = GalleryService(pipe, repo, FakeObjects(), model="fake", dim=DIM, default_collection="default")
    asyncio.run(gallery.collection(None, create=True))
    access = FakeAccess()
    edge = Edge(recognition=RecognitionService(pipe, repo, CountingOutcomes()), gallery=gallery,
                config=lambda: IngressConfig(), auth=Authenticator(access, b"boot", cache_ttl_s=0.0),
                access=access, idempotency=Idempotency(kv, poll_s=0.01), subject_keys=SubjectKeys(kv))
    with TestClient(create_app(edge), raise_server_exceptions=False, headers={"x-api-key": "boot"}) as client:
        yield client, repo, kv


def _enrol(client: TestClient, sid: str, image: bytes, key: str | None):
    headers = {"Idempotency-Key": key} if key else {}
    return client.post(f"/v1/subjects/{sid}/faces", files={"image": ("a.jpg", image)},
                       data={"liveness": "off"}, headers=headers)


def _faces(repo: FakeRepo) -> int:
    return len(repo.faces)


def test_an_enrolment_retried_three_times_enrols_one_face(app) -> None:
    client, repo, _ = app
    sid = client.post("/v1/subjects", json={"name": "ada"}).json()["id"]
    answers = [_enrol(client, sid, JPEG, "enrol-ada-1") for _ in range(3)]
    assert [r.status_code for r in answers] == [201, 201, 201], answers[0].text
    assert answers[0].json() == answers[1].json() == answers[2].json()
    assert "idempotent-replayed" not in answers[0].headers
    assert [r.headers.get("idempotent-replayed") for r in answers[1:]] == ["true", "true"]
    assert _faces(repo) == 1


def test_without_a_key_each_request_enrols(app) -> None:
    client, repo, _ = app
    sid = client.post("/v1/subjects", json={"name": "ada"}).json()["id"]
    assert [_enrol(client, sid, JPEG, None).status_code for _ in range(2)] == [201, 201]
    assert _faces(repo) == 2


def test_the_same_key_with_another_image_is_422(app) -> None:
    client, repo, _ = app
    sid = client.post("/v1/subjects", json={"name": "ada"}).json()["id"]
    assert _enrol(client, sid, JPEG, "k1").status_code == 201
    r = _enrol(client, sid, JPEG_B, "k1")
    assert r.status_code == 422 and r.json()["error"]["code"] == "idempotency_key_reused", r.text
    assert "different request body" in r.json()["error"]["message"]
    assert _faces(repo) == 1


def test_a_key_is_scoped_to_its_route_and_subject(app) -> None:
    client, repo, _ = app
    a = client.post("/v1/subjects", json={"name": "ada"}).json()["id"]
    b = client.post("/v1/subjects", json={"name": "bob"}).json()["id"]
    assert _enrol(client, a, JPEG, "same").status_code == 201
    assert _enrol(client, b, JPEG, "same").status_code == 201  # another subject: another request
    assert _faces(repo) == 2


def test_subject_creation_takes_a_key_too(app) -> None:
    client, _, _ = app
    first = client.post("/v1/subjects", json={"name": "ada"}, headers={"Idempotency-Key": "mk-ada"})
    again = client.post("/v1/subjects", json={"name": "ada"}, headers={"Idempotency-Key": "mk-ada"})
    assert first.status_code == again.status_code == 201 and first.json() == again.json()
    assert client.get("/v1/subjects").json()["total"] == 1
    other = client.post("/v1/subjects", json={"name": "eve"}, headers={"Idempotency-Key": "mk-ada"})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_a_malformed_key_is_400_in_the_envelope(app) -> None:
    client, repo, _ = app
    sid = client.post("/v1/subjects", json={"name": "ada"}).json()["id"]
    r = _enrol(client, sid, JPEG, "has spaces in it")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request", r.text
    assert _faces(repo) == 0


def test_with_redis_down_enrolment_is_served_unprotected(app) -> None:
    client, repo, kv = app
    sid = client.post("/v1/subjects", json={"name": "ada"}).json()["id"]
    kv.down = True
    assert [_enrol(client, sid, JPEG, "k-down").status_code for _ in range(2)] == [201, 201]
    assert _faces(repo) == 2  # not enforced, as documented: served, not refused


def test_the_stored_answer_is_tied_to_the_subject_for_erasure(app) -> None:
    client, _, kv = app
    sid = client.post("/v1/subjects", json={"name": "ada"}).json()["id"]
    assert _enrol(client, sid, JPEG, "k-tie").status_code == 201
    keys = SubjectKeys(kv)
    tied = asyncio.run(kv.members(keys.index_key(sid)))
    assert len(tied) == 1 and all(":idem:" in k for k in tied)
    assert asyncio.run(keys.forget(sid)) == 1
    assert not any(":idem:" in k for k in kv.keys())
