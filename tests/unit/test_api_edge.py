"""The whole FastAPI app from the factory, over fake services (no Ray)."""
from __future__ import annotations

from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from serve_app.api.app import create_app
from serve_app.api.deps import Edge
from serve_app.deployment_config import IngressConfig
from serve_app.errors import ServiceUnavailable
from serve_app.services.gallery import GalleryService
from serve_app.services.recognition import RecognitionService
from serve_app.services.access import Authenticator
from tests.unit.fakes import DIM, CountingOutcomes, FakeAccess, FakeObjects, FakePipeline, FakeRepo, Scripted, unit

JPEG = b"\xff\xd8\xff\xe0" + b"face-a"
JPEG_B = b"\xff\xd8\xff\xe0" + b"face-b"
PDF = b"%PDF-1.4 not an image"


@pytest.fixture()
def app_client() -> Iterator[tuple[TestClient, FakePipeline, FakeRepo]]:
    import asyncio

    repo = FakeRepo()
    pipe = FakePipeline(repo)
    pipe.script(JPEG, unit(1, 0, 0, 0))
    pipe.script(JPEG_B, unit(0, 1, 0, 0))
    gallery = GalleryService(pipe, repo, FakeObjects(), model="fake", dim=DIM, default_collection="default")
    asyncio.run(gallery.collection(None, create=True))
    access = FakeAccess()
    edge = Edge(recognition=RecognitionService(pipe, repo, CountingOutcomes()), gallery=gallery,
                config=lambda: IngressConfig(verify_threshold=0.5, identify_threshold=0.5),
                auth=Authenticator(access, b"boot", cache_ttl_s=0.0), access=access)
    with TestClient(create_app(edge), raise_server_exceptions=False, headers={"x-api-key": "boot"}) as client:
        client.access = access  # type: ignore[attr-defined]
        yield client, pipe, repo


def _error(r, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"]


def test_enrol_identify_verify_round_trip(app_client) -> None:
    client, _, _ = app_client
    r = client.post("/v1/subjects", json={"name": "ada"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r = client.post(f"/v1/subjects/{sid}/faces", files={"image": ("a.jpg", JPEG)})
    assert r.status_code == 201, r.text
    assert r.json()["seq"] == 1 and r.json()["face"]["liveness"]["live"] is True  # enrolment checks by default
    r = client.post("/v1/identify", content=JPEG, headers={"content-type": "image/jpeg"})
    face = r.json()["faces"][0]
    assert face["decision"] == "match" and face["subject"]["name"] == "ada"
    assert r.json()["timings_ms"]["total"] >= 0
    r = client.post("/v1/verify", files={"image1": ("a.jpg", JPEG), "image2": ("b.jpg", JPEG_B)})
    assert r.status_code == 200 and r.json()["match"] is False and "faces" in r.json()
    r = client.post("/v1/verify", data={"subject_id": sid}, files={"image1": ("a.jpg", JPEG)})
    assert r.json()["match"] is True and r.json()["subject"]["faces_compared"] == 1


def test_unknown_routes_and_methods_use_the_envelope(app_client) -> None:
    client, _, _ = app_client
    _error(client.get("/nope"), 404, "not_found")
    _error(client.put("/v1/identify"), 405, "method_not_allowed")


def test_json_only_with_a_json_content_type(app_client) -> None:
    client, _, _ = app_client
    r = client.post("/v1/subjects", content=b'{"name": "csrf"}', headers={"content-type": "text/plain"})
    assert 400 <= r.status_code < 500 and "error" in r.json()
    assert client.get("/v1/subjects").json()["total"] == 0


def test_bad_input_is_a_4xx(app_client) -> None:
    client, _, _ = app_client
    _error(client.post("/v1/detect", files={"image": ("x.pdf", PDF)}), 415, "unsupported_media_type")
    _error(client.post("/v1/detect", json={"liveness": "off"}), 400, "invalid_request")
    _error(client.post("/v1/detect", data={"liveness": "off"}), 415, "unsupported_media_type")
    _error(client.post("/v1/subjects", json={"name": ""}), 400, "invalid_request")
    _error(client.delete("/v1/subjects/00000000-0000-0000-0000-000000000000/faces/99999999999999999999999"),
           400, "invalid_request")
    _error(client.get("/v1/subjects/not-a-uuid"), 404, "subject_not_found")
    _error(client.post("/v1/identify", files={"image": ("a.jpg", JPEG)}, data={"top_k": "0"}),
           400, "invalid_request")
    _error(client.get("/v1/subjects", params={"collection": "missing"}), 404, "collection_not_found")


def test_overload_is_a_503_with_retry_after(app_client) -> None:
    client, pipe, _ = app_client
    pipe.images[JPEG] = Scripted([], error=ServiceUnavailable("at capacity", retry_after_s=2))
    r = client.post("/v1/detect", files={"image": ("a.jpg", JPEG)})
    _error(r, 503, "unavailable")
    assert r.headers["retry-after"] == "2"


def test_dependency_outage_is_a_503_and_a_bug_a_500(app_client) -> None:
    client, pipe, repo = app_client

    async def down(*_a, **_k):
        raise ConnectionRefusedError("postgres is down")

    repo.create_subject = down  # type: ignore[method-assign]
    _error(client.post("/v1/subjects", json={"name": "x"}), 503, "unavailable")

    async def bug(*_a, **_k):
        raise KeyError("oops")

    repo.list_collections = bug  # type: ignore[method-assign]
    r = client.get("/v1/collections")
    _error(r, 500, "internal_error")
    assert "oops" not in r.text


def test_openapi_lists_request_and_response_models(app_client) -> None:
    client, _, _ = app_client
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for name in ("ImageForm", "ImageJSON", "VerifyForm", "VerifyJSON", "IdentifyResponse", "DetectResponse",
                 "VerifyResponse", "EnrolResponse", "SubjectIn", "ErrorResponse"):
        assert name in schemas, name
    body = doc["paths"]["/v1/identify"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["$ref"].endswith("/ImageForm")
    ok = doc["paths"]["/v1/identify"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/IdentifyResponse")


def test_text_fields_and_metadata_are_bounded(app_client) -> None:
    client, _, _ = app_client
    for bad in ({"name": "nul\x00byte"}, {"name": "bell\x07"}, {"name": "   "},
                {"name": "ok", "metadata": {"blob": "x" * 20_000}},
                {"name": "ok", "metadata": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}}):
        _error(client.post("/v1/subjects", json=bad), 400, "invalid_request")
    r = client.post("/v1/subjects", content='{"name": "lone \\ud800"}'.encode(),
                    headers={"content-type": "application/json"})
    _error(r, 400, "invalid_request")
    assert client.post("/v1/subjects", json={"name": "Zoë", "metadata": {"team": ["a", "b"]}}).status_code == 201


def test_collection_names_are_safe(app_client) -> None:
    client, _, _ = app_client
    for bad in ("..", ".", "../../etc", "a/b", "-lead", "x" * 129, ""):
        _error(client.post("/v1/collections", json={"name": bad}), 400, "invalid_request")
    assert client.post("/v1/collections", json={"name": "team-a.v2_1"}).status_code == 201


def test_json_bodies_are_capped_and_depth_checked(app_client) -> None:
    client, _, _ = app_client
    _error(client.post("/v1/subjects", content=b"[" * 50_000, headers={"content-type": "application/json"}),
           400, "invalid_request")
    big = b'{"name": "' + b"x" * 70_000 + b'"}'
    _error(client.post("/v1/subjects", content=big, headers={"content-type": "application/json"}),
           413, "payload_too_large")

    def chunks():
        for _ in range(100):
            yield b"x" * 1000

    _error(client.post("/v1/subjects", content=chunks(), headers={"content-type": "application/json"}),
           413, "payload_too_large")


def test_admission_gate_sheds_image_work_beyond_the_limit() -> None:
    import asyncio

    from serve_app.api.admission import AdmissionGate

    release = asyncio.Event()
    answered: list[int] = []

    async def slow_app(scope, receive, send) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    gate = AdmissionGate(slow_app, limit=lambda: 2, retry_after_s=lambda: 3)

    async def call(path: str) -> tuple[int, dict[bytes, bytes]]:
        out: dict[str, object] = {}

        async def send(msg) -> None:
            if msg["type"] == "http.response.start":
                out["status"], out["headers"] = msg["status"], dict(msg["headers"])

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        await gate({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send)
        answered.append(out["status"])  # type: ignore[arg-type]
        return out["status"], out["headers"]  # type: ignore[return-value]

    async def scenario() -> None:
        first = [asyncio.create_task(call("/v1/identify")) for _ in range(2)]
        await asyncio.sleep(0.01)
        status, headers = await call("/v1/detect")  # over the limit: refused at once
        assert status == 503 and headers[b"retry-after"] == b"3"
        gallery = asyncio.create_task(call("/v1/subjects"))  # not image work: not gated
        await asyncio.sleep(0.01)
        assert gate.in_flight == 2
        release.set()
        await asyncio.gather(*first, gallery)
        assert gate.in_flight == 0
        assert (await call("/v1/identify"))[0] == 200

    asyncio.run(scenario())
    assert sorted(answered) == [200, 200, 200, 200, 503]



def test_keys_scopes_and_tenant_isolation(app_client) -> None:
    client, _, _ = app_client
    boot = {"x-api-key": "boot"}
    assert client.put("/v1/tenants/acme", json={"min_enrol_liveness": "block"}, headers=boot).status_code == 200
    # keys per tenant, made by the bootstrap key acting for them
    a_admin = client.post("/v1/keys", params={"tenant": "acme"}, json={"scopes": ["read", "enrol", "admin"]},
                          headers=boot).json()
    b_enrol = client.post("/v1/keys", json={"scopes": ["read", "enrol"]}, headers=boot).json()
    a_read = client.post("/v1/keys", json={"scopes": ["read"]}, headers={"x-api-key": a_admin["token"]}).json()
    assert a_admin["tenant"] == "acme" and a_read["tenant"] == "acme" and b_enrol["tenant"] == "default"
    A, B, AR = ({"x-api-key": k["token"]} for k in (a_admin, b_enrol, a_read))
    sid_b = client.post("/v1/subjects", json={"name": "bob"}, headers=B).json()["id"]
    client.post(f"/v1/subjects/{sid_b}/faces", files={"image": ("b.jpg", JPEG_B)}, headers=B)
    # tenant A sees none of B's things: 404 exactly as if they did not exist
    _error(client.get(f"/v1/subjects/{sid_b}", headers=A), 404, "subject_not_found")
    _error(client.delete(f"/v1/subjects/{sid_b}", headers=A), 404, "subject_not_found")
    _error(client.post("/v1/verify", data={"subject_id": sid_b}, files={"image1": ("a.jpg", JPEG_B)}, headers=A),
           404, "subject_not_found")
    assert client.get("/v1/subjects", headers=A).json()["total"] == 0
    r = client.post("/v1/identify", files={"image": ("b.jpg", JPEG_B)}, headers=A).json()
    assert r["faces"][0]["decision"] == "unknown"
    assert client.get("/v1/subjects", headers=B).json()["total"] == 1
    # scopes: a read key cannot enrol or manage keys; wrong/revoked keys are 401
    _error(client.post("/v1/subjects", json={"name": "x"}, headers=AR), 403, "forbidden")
    _error(client.get("/v1/keys", headers=AR), 403, "forbidden")
    _error(client.get("/v1/subjects", headers={"x-api-key": a_read["token"] + "x"}), 401, "unauthorized")
    _error(client.get("/v1/subjects", headers={"x-api-key": "nope"}), 401, "unauthorized")
    assert client.delete(f"/v1/keys/{a_read['key_id']}", headers=A).status_code == 200
    _error(client.get("/v1/subjects", headers=AR), 401, "unauthorized")
    # a tenant admin may not act for another tenant, nor revoke its keys
    _error(client.get("/v1/subjects", params={"tenant": "default"}, headers=A), 400, "invalid_request")
    _error(client.delete(f"/v1/keys/{b_enrol['key_id']}", headers=A), 404, "key_not_found")
    # the tenant's minimum enrolment liveness wins over the caller's "off"
    sid_a = client.post("/v1/subjects", json={"name": "ann"}, headers=A).json()["id"]
    r = client.post(f"/v1/subjects/{sid_a}/faces", files={"image": ("a.jpg", JPEG)}, data={"liveness": "off"},
                    headers=A)
    assert r.status_code == 201 and r.json()["face"]["liveness"]["live"] is True
    actions = [a for _, _, a, _ in client.access.audits]  # type: ignore[attr-defined]
    assert {"key.create", "subject.create", "face.add", "key.revoke", "tenant.put"} <= set(actions)


def test_open_mode_only_without_any_key(app_client) -> None:
    from serve_app.services.access import Authenticator

    client, _, _ = app_client
    client.app.state.edge.auth = Authenticator(client.access, None, cache_ttl_s=0.0)  # type: ignore[attr-defined]
    assert client.get("/v1/subjects", headers={"x-api-key": ""}).status_code == 200  # open: no keys at all
    made = client.post("/v1/keys", json={"scopes": ["admin"]}, headers={"x-api-key": ""}).json()
    _error(client.get("/v1/subjects", headers={"x-api-key": ""}), 401, "unauthorized")  # closed now
    assert client.get("/v1/keys", headers={"x-api-key": made["token"]}).status_code == 200


def test_finished_bulk_jobs_are_listed_per_tenant_and_collection(app_client) -> None:
    import json

    client, _, _ = app_client
    objects = client.app.state.edge.gallery.objects
    report = {"summary": {"total": 3, "enrolled": 2, "rejected": 1}, "options": {}, "images": [
        {"uri": "x.jpg", "status": "rejected", "reason": "no_face"}]}
    objects.data["reports/enroll/default/default/20261201T200000Z.json"] = json.dumps(report).encode()
    objects.data["reports/enroll/acme/default/20261201T210000Z.json"] = b"{}"  # another tenant's
    jobs = client.get("/v1/jobs").json()["jobs"]
    assert [j["id"] for j in jobs] == ["20261201T200000Z"] and jobs[0]["state"] == "finished"
    got = client.get("/v1/jobs/20261201T200000Z").json()
    assert got["summary"]["enrolled"] == 2 and got["images"][0]["reason"] == "no_face"
    _error(client.get("/v1/jobs/20261201T210000Z"), 404, "not_found")
    _error(client.get("/v1/jobs/..%2F..%2Fsecret"), 404, "not_found")


def test_database_down_reads_answer_writes_and_listings_get_503(app_client) -> None:
    """identify and verify of an image pair need no database (the matcher
    carries names; keys, tenants and collections are served from their last
    good lookup); writes and listings get 503 with Retry-After, never 500."""
    import asyncio
    import inspect

    client, _, repo = app_client
    access = client.access  # type: ignore[attr-defined]
    _, token = asyncio.run(access.create_key("default", ["read", "enrol"]))
    sid = client.post("/v1/subjects", json={"name": "ada"}).json()["id"]
    assert client.post(f"/v1/subjects/{sid}/faces", files={"image": ("a.jpg", JPEG)}).status_code == 201
    keyed = {"x-api-key": token}
    assert client.post("/v1/identify", files={"image": ("a.jpg", JPEG)}, headers=keyed).status_code == 200

    async def down(*_a, **_k):
        raise ConnectionRefusedError(111, "postgres is down")

    for obj in (repo, access):
        for name, fn in inspect.getmembers(obj, inspect.iscoroutinefunction):
            if not name.startswith("__"):
                setattr(obj, name, down)
    for headers in (keyed, {}):  # a tenant key (looked up, cached 0 s here) and the bootstrap key
        r = client.post("/v1/identify", files={"image": ("a.jpg", JPEG)}, headers=headers)
        assert r.status_code == 200, r.text
        assert r.json()["faces"][0]["subject"]["name"] == "ada"
        r = client.post("/v1/verify", files={"image1": ("a.jpg", JPEG), "image2": ("b.jpg", JPEG_B)}, headers=headers)
        assert r.status_code == 200, r.text
    for method, path, kw in (
        ("post", f"/v1/subjects/{sid}/faces", {"files": {"image": ("a.jpg", JPEG)}}),
        ("post", "/v1/subjects", {"json": {"name": "bob"}}),
        ("patch", f"/v1/subjects/{sid}", {"json": {"name": "ada2"}}),
        ("delete", f"/v1/subjects/{sid}", {}),
        ("get", "/v1/subjects", {}),
        ("get", "/v1/collections", {}),
        ("get", f"/v1/subjects/{sid}/faces", {}),
    ):
        r = getattr(client, method)(path, headers=keyed, **kw)
        _error(r, 503, "unavailable")
        assert int(r.headers["retry-after"]) >= 1, (method, path)
