"""The console's server side over fakes: the crop route and the static mount."""
from __future__ import annotations

import asyncio
import re
import tomllib
from pathlib import Path
from typing import Iterator

import pytest
from fastapi.testclient import TestClient

from serve_app.api.app import create_app
from serve_app.api.deps import Edge
from serve_app.console import STATIC_DIR
from serve_app.deployment_config import IngressConfig
from serve_app.services.access import Authenticator
from serve_app.services.gallery import GalleryService
from serve_app.services.recognition import RecognitionService
from tests.unit.fakes import DIM, CountingOutcomes, FakeAccess, FakeObjects, FakePipeline, FakeRepo, unit

JPEG = b"\xff\xd8\xff\xe0" + b"face-a"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def app() -> Iterator[tuple[TestClient, FakeAccess, FakeObjects]]:
    repo = FakeRepo()
    pipe = FakePipeline(repo)
    pipe.script(JPEG, unit(1, 0, 0, 0))
    objects = FakeObjects()
    gallery = GalleryService(pipe, repo, objects, model="fake", dim=DIM, default_collection="default")
    access = FakeAccess()
    edge = Edge(recognition=RecognitionService(pipe, repo, CountingOutcomes()), gallery=gallery,
                config=lambda: IngressConfig(verify_threshold=0.5, identify_threshold=0.5),
                auth=Authenticator(access, b"boot", cache_ttl_s=0.0), access=access)
    with TestClient(create_app(edge), raise_server_exceptions=False, headers={"x-api-key": "boot"}) as client:
        yield client, access, objects


def _enrol(client: TestClient, name: str = "ada", **params: str) -> tuple[str, int]:
    r = client.post("/v1/subjects", json={"name": name}, params=params)
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    r = client.post(f"/v1/subjects/{sid}/faces", files={"image": ("a.jpg", JPEG)}, params=params)
    assert r.status_code == 201, r.text
    return sid, r.json()["face"]["id"]


def test_crop_is_the_stored_jpeg(app) -> None:
    client, access, objects = app
    sid, fid = _enrol(client)
    r = client.get(f"/v1/subjects/{sid}/faces/{fid}/crop")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    assert r.content == b"jpeg0" and list(objects.data.values()) == [b"jpeg0"]
    assert "private" in r.headers["cache-control"]
    _, token = asyncio.run(access.create_key("default", ["read"]))
    assert client.get(f"/v1/subjects/{sid}/faces/{fid}/crop", headers={"x-api-key": token}).status_code == 200


def test_crop_of_another_tenants_face_is_not_found(app) -> None:
    client, access, _ = app
    sid, fid = _enrol(client)
    _, token = asyncio.run(access.create_key("other", ["read", "enrol"]))
    r = client.get(f"/v1/subjects/{sid}/faces/{fid}/crop", headers={"x-api-key": token})
    assert r.status_code == 404 and r.json()["error"]["code"] == "subject_not_found"
    # the other tenant's own subject cannot reach the face by its id either
    own = client.post("/v1/subjects", json={"name": "eve"}, headers={"x-api-key": token}).json()["id"]
    r = client.get(f"/v1/subjects/{own}/faces/{fid}/crop", headers={"x-api-key": token})
    assert r.status_code == 404 and r.json()["error"]["code"] == "face_not_found"


def test_crop_errors(app) -> None:
    client, _, objects = app
    sid, fid = _enrol(client)
    other_sid, _ = _enrol(client, "bob")
    assert client.get(f"/v1/subjects/{other_sid}/faces/{fid}/crop").json()["error"]["code"] == "face_not_found"
    assert client.get(f"/v1/subjects/{sid}/faces/{fid + 99}/crop").status_code == 404
    assert client.get(f"/v1/subjects/not-a-uuid/faces/{fid}/crop").json()["error"]["code"] == "subject_not_found"
    assert client.get(f"/v1/subjects/{sid}/faces/0/crop").status_code == 400
    r = client.get(f"/v1/subjects/{sid}/faces/{fid}/crop", headers={"x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    objects.data.clear()  # the row outlived its object: a 404 that says so, not a 500
    r = client.get(f"/v1/subjects/{sid}/faces/{fid}/crop")
    assert r.status_code == 404 and "object store" in r.json()["error"]["message"]
    assert client.get(f"/v1/subjects/{sid}/faces/{fid}/crop", params={"collection": "nope"}).status_code == 404


def test_crop_route_is_documented(app) -> None:
    client, _, _ = app
    op = client.get("/openapi.json").json()["paths"]["/v1/subjects/{subject_id}/faces/{face_id}/crop"]["get"]
    assert "image/jpeg" in op["responses"]["200"]["content"]
    assert {"401", "403", "404"} <= set(op["responses"])


def test_crop_needs_the_read_scope(app) -> None:
    client, access, _ = app
    sid, fid = _enrol(client)
    _, token = asyncio.run(access.create_key("default", ["enrol"]))
    r = client.get(f"/v1/subjects/{sid}/faces/{fid}/crop", headers={"x-api-key": token})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


def test_console_is_served_with_a_strict_policy(app, caplog) -> None:
    client, _, _ = app
    with caplog.at_level("INFO", logger="faceserve.access"):
        r = client.get("/console/", headers={"x-api-key": ""})
    assert any(getattr(rec, "route", None) == "/console" for rec in caplog.records)  # one label, not per file  # the page itself needs no key
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    scripts = re.findall(r'<script[^>]*src="([^"]+)"', r.text)
    assert scripts and all(not s.startswith(("http:", "https:", "//")) for s in scripts)
    for name in scripts:
        js = client.get(f"/console/{name}")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert client.get("/console", follow_redirects=False).status_code in (307, 308)
    r = client.get("/console/nope.js")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_console_loads_nothing_from_elsewhere() -> None:
    files = [p for p in STATIC_DIR.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".html", ".css", ".js"}
    for p in files:
        text = p.read_text()
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), p
        assert not re.search(r"""(import|fetch)\s*\(?\s*["'](https?:)?//""", text), p
        assert not re.search(r"@import\s+url\(\s*['\"]?(https?:)?//", text), p


def test_console_files_ship_as_package_data() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    globs = cfg["serve_app.console"]
    for p in STATIC_DIR.rglob("*"):
        if p.is_file():
            rel = p.relative_to(STATIC_DIR.parent)
            assert any(rel.match(g) for g in globs), f"{rel} would not ship"
