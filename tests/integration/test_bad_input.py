"""A catalogue of bad input, over every route, against the real app.

Each case names the request and the 4xx it must get (status and error code,
in the {"error": {...}} envelope). After the whole catalogue the service is
healthy and the gallery is exactly as before: Postgres compared row by row,
object storage object by object.
"""
from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import asyncpg
import httpx
import pytest
from PIL import Image

from tests.conftest import FACES_DIR, people
from tests.integration.conftest import LiveApp

IMAGE_ROUTES = ("/v1/detect", "/v1/identify", "/v1/liveness")
UUID0 = "00000000-0000-0000-0000-000000000000"


def _encode(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_claiming(png: bytes, width: int, height: int) -> bytes:
    body = struct.pack(">II", width, height) + png[24:29]
    chunk = b"IHDR" + body
    return png[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]


@dataclass
class Case:
    name: str
    method: str
    path: str
    status: int
    code: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def _catalogue(subject_id: str, face_photo: bytes, group_photo: bytes) -> list[Case]:
    small = Image.open(io.BytesIO(face_photo)).convert("RGB")
    png = _encode(small, "PNG")
    jpeg = _encode(small, "JPEG", quality=90)
    grey = _encode(Image.new("RGB", (320, 240), (128, 128, 128)), "JPEG")
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    tiff_float = _encode(Image.new("F", (64, 64)), "TIFF")
    gif = _encode(small.resize((32, 32)), "GIF")
    gif_bomb = gif[:6] + struct.pack("<HH", 65535, 65535) + gif[10:]  # logical screen of 4.3 GP
    cases: list[Case] = []

    def img(name: str, data: bytes, status: int, code: str, route: str = "/v1/detect", **extra: Any) -> None:
        cases.append(Case(name, "POST", route, status, code, {"files": {"image": ("x", data)}, **extra}))

    # --- files: corrupt, truncated, polyglot, bombs, odd formats ---------------------------------
    img("empty file", b"", 400, "invalid_request")
    img("text file", b"hello, I am not a picture", 415, "unsupported_media_type")
    img("pdf", b"%PDF-1.4\n" + jpeg[:300], 415, "unsupported_media_type")
    img("heic", heic, 415, "unsupported_media_type")
    img("eps", b"%!PS-Adobe-3.0 EPSF-3.0\n" + jpeg[:300], 415, "unsupported_media_type")
    img("jpeg reversed", jpeg[::-1], 415, "unsupported_media_type")
    img("jpeg truncated to half", jpeg[: len(jpeg) // 2], 400, "image_unreadable")
    img("jpeg header only", jpeg[:20], 400, "image_unreadable")
    img("jpeg with zeroed body", jpeg[:3] + bytes(200), 400, "image_unreadable")
    img("png truncated", png[: len(png) // 2], 400, "image_unreadable")
    img("png with broken crc", png[:30] + b"\x00\x00" + png[32:], 400, "image_unreadable")
    img("polyglot jpeg+zip", b"\xff\xd8\xff\xe0" + b"PK\x03\x04" + bytes(100), 400, "image_unreadable")
    img("png bomb 48 MP header", _png_claiming(png, 8000, 6000), 413, "image_too_large")
    img("png bomb 10 GP header", _png_claiming(png, 100_000, 100_000), 413, "image_too_large")
    img("gif bomb header", gif_bomb, 413, "image_too_large")
    img("bmp with no pixels", b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<I", 40) + bytes(36),
        400, "image_unreadable")
    img("tiny float tiff, no face", tiff_float, 422, "no_face", route="/v1/identify")
    img("grey picture, no face, identify", grey, 422, "no_face", route="/v1/identify")
    img("grey picture, no face, liveness", grey, 422, "no_face", route="/v1/liveness")
    cases.append(Case("over the byte limit", "POST", "/v1/detect", 413, "image_too_large",
                      {"content": b"\xff\xd8\xff" + bytes(16_000_000), "headers": {"content-type": "image/jpeg"}}))
    # --- bodies and fields ---------------------------------------------------------------------
    for route in IMAGE_ROUTES:
        cases.append(Case(f"{route}: no body", "POST", route, 400, "invalid_request"))
    cases += [
        Case("base64 garbage", "POST", "/v1/detect", 400, "invalid_request", {"json": {"image": "%%%not base64"}}),
        Case("image as a number", "POST", "/v1/detect", 400, "invalid_request", {"json": {"image": 12}}),
        Case("json array body", "POST", "/v1/identify", 400, "invalid_request", {"json": [1, 2, 3]}),
        Case("json nested 50k deep", "POST", "/v1/identify", 400, "invalid_request",
             {"content": b"[" * 50_000, "headers": {"content-type": "application/json"}}),
        Case("invalid utf-8 json", "POST", "/v1/identify", 400, "invalid_request",
             {"content": b'{"image": "\xff\xfe"}', "headers": {"content-type": "application/json"}}),
        Case("text/plain body", "POST", "/v1/identify", 415, "unsupported_media_type",
             {"content": b"hello", "headers": {"content-type": "text/plain"}}),
        Case("form-urlencoded", "POST", "/v1/identify", 415, "unsupported_media_type", {"data": {"image": "x"}}),
        Case("three files", "POST", "/v1/verify", 400, "invalid_request",
             {"files": [("image1", ("a", jpeg)), ("image2", ("b", jpeg)), ("image3", ("c", jpeg))]}),
        Case("liveness=maybe", "POST", "/v1/detect", 400, "invalid_request",
             {"files": {"image": ("a", jpeg)}, "params": {"liveness": "maybe"}}),
        Case("top_k=0", "POST", "/v1/identify", 400, "invalid_request",
             {"files": {"image": ("a", jpeg)}, "params": {"top_k": "0"}}),
        Case("top_k=101", "POST", "/v1/identify", 400, "invalid_request",
             {"files": {"image": ("a", jpeg)}, "params": {"top_k": "101"}}),
        Case("top_k=abc", "POST", "/v1/identify", 400, "invalid_request",
             {"files": {"image": ("a", jpeg)}, "params": {"top_k": "abc"}}),
        Case("min_seq=-1", "POST", "/v1/identify", 400, "invalid_request",
             {"files": {"image": ("a", jpeg)}, "params": {"min_seq": "-1"}}),
        Case("min_seq from the future", "POST", "/v1/identify", 400, "invalid_request",
             {"files": {"image": ("a", jpeg)}, "params": {"min_seq": str(2**60)}}),
        Case("unknown collection", "POST", "/v1/identify", 404, "collection_not_found",
             {"files": {"image": ("a", jpeg)}, "params": {"collection": "nope"}}),
        Case("traversal collection", "POST", "/v1/identify", 404, "collection_not_found",
             {"files": {"image": ("a", jpeg)}, "params": {"collection": "../../etc"}}),
        Case("verify without image2", "POST", "/v1/verify", 400, "invalid_request",
             {"files": {"image1": ("a", jpeg)}}),
        Case("verify against a non-uuid subject", "POST", "/v1/verify", 404, "subject_not_found",
             {"files": {"image1": ("a", jpeg)}, "data": {"subject_id": "robert'); DROP TABLE faces;--"}}),
        Case("verify against an unknown subject", "POST", "/v1/verify", 404, "subject_not_found",
             {"files": {"image1": ("a", jpeg)}, "data": {"subject_id": UUID0}}),
        Case("verify, image2 has no face", "POST", "/v1/verify", 422, "no_face",
             {"files": {"image1": ("a", jpeg), "image2": ("b", grey)}}),
        # --- enrolment ----------------------------------------------------------------------------
        Case("enrol: unknown subject", "POST", f"/v1/subjects/{UUID0}/faces", 404, "subject_not_found",
             {"files": {"image": ("a", jpeg)}}),
        Case("enrol: not a uuid", "POST", "/v1/subjects/abc/faces", 404, "subject_not_found",
             {"files": {"image": ("a", jpeg)}}),
        Case("enrol: no face", "POST", f"/v1/subjects/{subject_id}/faces", 422, "no_face",
             {"files": {"image": ("a", grey)}, "data": {"liveness": "off"}}),
        Case("enrol: several faces", "POST", f"/v1/subjects/{subject_id}/faces", 422, "multiple_faces",
             {"files": {"image": ("g", group_photo)}, "data": {"liveness": "off"}}),
        Case("enrol: largest=maybe", "POST", f"/v1/subjects/{subject_id}/faces", 400, "invalid_request",
             {"files": {"image": ("a", jpeg)}, "data": {"largest": "maybe"}}),
        Case("enrol: corrupt image", "POST", f"/v1/subjects/{subject_id}/faces", 400, "image_unreadable",
             {"files": {"image": ("a", jpeg[: len(jpeg) // 2])}}),
        Case("enrol: a spoof", "POST", f"/v1/subjects/{subject_id}/faces", 422, "spoof_detected",
             {"files": {"image": ("s", (FACES_DIR / "liveness" / "image_F2.jpg").read_bytes())}}),
        # --- subjects (JSON) ------------------------------------------------------------------------
        Case("subject: NUL in name", "POST", "/v1/subjects", 400, "invalid_request", {"json": {"name": "a\x00b"}}),
        Case("subject: control char", "POST", "/v1/subjects", 400, "invalid_request", {"json": {"name": "a\x1bb"}}),
        Case("subject: lone surrogate", "POST", "/v1/subjects", 400, "invalid_request",
             {"content": b'{"name": "x\\udc00"}', "headers": {"content-type": "application/json"}}),
        Case("subject: 300 chars", "POST", "/v1/subjects", 400, "invalid_request", {"json": {"name": "x" * 300}}),
        Case("subject: no name", "POST", "/v1/subjects", 400, "invalid_request", {"json": {}}),
        Case("subject: name is a number", "POST", "/v1/subjects", 400, "invalid_request", {"json": {"name": 5}}),
        Case("subject: metadata a list", "POST", "/v1/subjects", 400, "invalid_request",
             {"json": {"name": "m", "metadata": [1]}}),
        Case("subject: metadata 20 KB", "POST", "/v1/subjects", 400, "invalid_request",
             {"json": {"name": "m", "metadata": {"x": "y" * 20_000}}}),
        Case("subject: metadata 9 deep", "POST", "/v1/subjects", 400, "invalid_request",
             {"json": {"name": "m", "metadata": {"a": [[[[[[[[1]]]]]]]]}}}),
        Case("subject: unknown field", "POST", "/v1/subjects", 400, "invalid_request",
             {"json": {"name": "m", "admin": True}}),
        Case("subject: json as text/plain (csrf)", "POST", "/v1/subjects", 400, "invalid_request",
             {"content": b'{"name": "csrf"}', "headers": {"content-type": "text/plain"}}),
        Case("subject: 100 KB body", "POST", "/v1/subjects", 413, "payload_too_large",
             {"json": {"name": "m", "metadata": {"x": "y" * 100_000}}}),
        Case("subject: chunked 1 MB body", "POST", "/v1/subjects", 413, "payload_too_large",
             {"content": iter([b"{" + b" " * 10_000] * 100), "headers": {"content-type": "application/json"}}),
        Case("subject: nested 50k deep", "POST", "/v1/subjects", 400, "invalid_request",
             {"content": b"[" * 50_000, "headers": {"content-type": "application/json"}}),
        Case("subject: duplicate name", "POST", "/v1/subjects", 409, "conflict", {"json": {"name": "catalogue"}}),
        Case("subject: unknown collection", "POST", "/v1/subjects", 404, "collection_not_found",
             {"json": {"name": "m", "collection": "nope"}}),
        Case("list: limit=0", "GET", "/v1/subjects", 400, "invalid_request", {"params": {"limit": "0"}}),
        Case("list: limit=501", "GET", "/v1/subjects", 400, "invalid_request", {"params": {"limit": "501"}}),
        Case("list: limit=abc", "GET", "/v1/subjects", 400, "invalid_request", {"params": {"limit": "abc"}}),
        Case("list: garbage cursor", "GET", "/v1/subjects", 400, "invalid_request", {"params": {"cursor": "zz"}}),
        Case("get: not a uuid", "GET", "/v1/subjects/xyz", 404, "subject_not_found"),
        Case("get: unknown", "GET", f"/v1/subjects/{UUID0}", 404, "subject_not_found"),
        Case("rename: empty", "PATCH", f"/v1/subjects/{subject_id}", 400, "invalid_request", {"json": {"name": ""}}),
        Case("rename: NUL", "PATCH", f"/v1/subjects/{subject_id}", 400, "invalid_request",
             {"json": {"name": "\x00"}}),
        Case("delete subject: unknown", "DELETE", f"/v1/subjects/{UUID0}", 404, "subject_not_found"),
        Case("delete face: id over int64", "DELETE", f"/v1/subjects/{subject_id}/faces/99999999999999999999999",
             400, "invalid_request"),
        Case("delete face: negative id", "DELETE", f"/v1/subjects/{subject_id}/faces/-1", 400, "invalid_request"),
        Case("delete face: not a number", "DELETE", f"/v1/subjects/{subject_id}/faces/abc", 400, "invalid_request"),
        Case("delete face: unknown", "DELETE", f"/v1/subjects/{subject_id}/faces/424242", 404, "face_not_found"),
        # --- collections, keys ------------------------------------------------------------------
        Case("collection: ..", "POST", "/v1/collections", 400, "invalid_request", {"json": {"name": ".."}}),
        Case("collection: traversal", "POST", "/v1/collections", 400, "invalid_request",
             {"json": {"name": "../../etc"}}),
        Case("collection: slash", "POST", "/v1/collections", 400, "invalid_request", {"json": {"name": "a/b"}}),
        Case("collection: 129 chars", "POST", "/v1/collections", 400, "invalid_request",
             {"json": {"name": "c" * 129}}),
        Case("collection: duplicate", "POST", "/v1/collections", 409, "conflict", {"json": {"name": "default"}}),
        Case("key: unknown scope", "POST", "/v1/keys", 400, "invalid_request", {"json": {"scopes": ["root"]}}),
        Case("key: no scopes", "POST", "/v1/keys", 400, "invalid_request", {"json": {"scopes": []}}),
        Case("key: revoke unknown", "DELETE", "/v1/keys/0000", 404, "key_not_found"),
        Case("tenant: bad name", "PUT", "/v1/tenants/-bad", 400, "invalid_request", {"json": {}}),
        Case("tenant: unknown field", "PUT", "/v1/tenants/t1", 400, "invalid_request", {"json": {"root": True}}),
        Case("wrong api key", "GET", "/v1/subjects", 401, "unauthorized", {"headers": {"x-api-key": "wrong"}}),
        Case("malformed key token", "GET", "/v1/subjects", 401, "unauthorized",
             {"headers": {"x-api-key": "fsk_" + "a" * 300}}),
        # --- routes and methods ---------------------------------------------------------------------
        Case("unknown route", "GET", "/v2/everything", 404, "not_found"),
        Case("unknown route under v1", "POST", "/v1/teleport", 404, "not_found"),
        Case("wrong method on identify", "PUT", "/v1/identify", 405, "method_not_allowed"),
        Case("wrong method on collections", "DELETE", "/v1/collections", 405, "method_not_allowed"),
    ]
    return cases


async def _gallery_rows(dsn: str) -> dict[str, list[tuple]]:
    conn = await asyncpg.connect(dsn)
    try:
        out = {}
        for table, order in (("collections", "id"), ("subjects", "id"), ("faces", "id"), ("changes", "seq"),
                             ("api_keys", "key_id"), ("tenants", "name")):
            out[table] = [tuple(r) for r in await conn.fetch(f"SELECT * FROM {table} ORDER BY {order}")]
        return out
    finally:
        await conn.close()


def _objects(root: Path) -> dict[str, bytes]:
    """The gallery's objects (face crops); index snapshots are the matchers' own cache."""
    crops = root / "crops"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(crops.rglob("*")) if p.is_file()} \
        if crops.exists() else {}


@pytest.fixture(scope="module")
def subject(live_app: LiveApp) -> str:
    with live_app.client() as c:
        r = c.post("/v1/subjects", json={"name": "catalogue"})
        assert r.status_code in (201, 409)
        if r.status_code == 409:
            return c.get("/v1/subjects", params={"name": "catalogue"}).json()["subjects"][0]["id"]
        return r.json()["id"]


def test_bad_input_catalogue(live_app: LiveApp, subject: str) -> None:
    face = people()["obama"][0].read_bytes()
    group = (FACES_DIR / "groups" / "two_people.jpg").read_bytes()
    cases = _catalogue(subject, face, group)
    assert len(cases) >= 60, len(cases)
    rows_before = asyncio.run(_gallery_rows(live_app.database_url))
    objects_before = _objects(live_app.object_dir)
    failures = []
    with live_app.client() as c:
        for case in cases:
            kwargs = dict(case.kwargs)
            headers = {**c.headers, **kwargs.pop("headers", {})}
            r = c.request(case.method, case.path, headers=headers, **kwargs)
            try:
                body = r.json()
                ok = (r.status_code == case.status and set(body) == {"error"}
                      and body["error"].get("code") == case.code and body["error"].get("message"))
            except ValueError:
                ok, body = False, r.text[:200]
            if not ok:
                failures.append(f"{case.name}: {case.method} {case.path} -> {r.status_code} {body}")
        assert c.get("/readyz").status_code == 200
        assert c.get("/healthz").json() == {"status": "ok"}
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)
    assert asyncio.run(_gallery_rows(live_app.database_url)) == rows_before
    assert _objects(live_app.object_dir) == objects_before
