"""Tenants and scoped keys against the real app and Postgres.

Tenant A's key cannot list, read, verify against, identify in, enrol into or
delete tenant B's anything: every attempt is a 404 (as if it did not exist),
and B's data is unchanged afterwards.
"""
from __future__ import annotations

import time
import uuid

import httpx
import pytest

from serve_app.cli import main as cli_main
from tests.conftest import FACES_DIR, people
from tests.integration.conftest import BOOTSTRAP_KEY, LiveApp


def _key(client: httpx.Client, scopes: list[str], tenant: str | None = None) -> dict:
    r = client.post("/v1/keys", params={"tenant": tenant} if tenant else {}, json={"scopes": scopes})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture()
def tenants(live_app: LiveApp):
    suffix = uuid.uuid4().hex[:8]
    a, b = f"tenant-a-{suffix}", f"tenant-b-{suffix}"
    with live_app.client() as boot:
        for t in (a, b):
            assert boot.put(f"/v1/tenants/{t}", json={"min_enrol_liveness": "off"}).status_code == 200
        keys = {"a": _key(boot, ["read", "enrol", "admin"], a), "b": _key(boot, ["read", "enrol", "admin"], b),
                "a_read": _key(boot, ["read"], a)}
    yield keys
    with live_app.client() as boot:
        for k in keys.values():
            boot.delete(f"/v1/keys/{k['key_id']}", params={"tenant": k["tenant"]})


def _snapshot(client: httpx.Client) -> dict:
    subjects = client.get("/v1/subjects", params={"limit": 500}).json()["subjects"]
    return {s["id"]: (s["name"], s["face_count"],
                      sorted(f["id"] for f in client.get(f"/v1/subjects/{s['id']}/faces").json()["faces"]))
            for s in subjects}


def test_a_tenant_sees_nothing_of_another(live_app: LiveApp, tenants: dict) -> None:
    obama = people()["obama"]
    with live_app.client(key=tenants["b"]["token"]) as b, live_app.client(key=tenants["a"]["token"]) as a:
        sid = b.post("/v1/subjects", json={"name": "bee"}).json()["id"]
        r = b.post(f"/v1/subjects/{sid}/faces", files={"image": obama[0].open("rb")})
        assert r.status_code == 201, r.text
        face_id, seq = r.json()["face"]["id"], r.json()["seq"]
        assert b.post("/v1/collections", json={"name": "private"}).status_code == 201
        before = _snapshot(b)

        attempts = {
            "get subject": a.get(f"/v1/subjects/{sid}"),
            "list faces": a.get(f"/v1/subjects/{sid}/faces"),
            "rename": a.patch(f"/v1/subjects/{sid}", json={"name": "stolen"}),
            "enrol into": a.post(f"/v1/subjects/{sid}/faces", files={"image": obama[1].open("rb")}),
            "verify against": a.post("/v1/verify", data={"subject_id": sid}, files={"image1": obama[1].open("rb")}),
            "delete face": a.delete(f"/v1/subjects/{sid}/faces/{face_id}"),
            "delete subject": a.delete(f"/v1/subjects/{sid}"),
            "other collection": a.get("/v1/subjects", params={"collection": "private"}),
        }
        for what, r in attempts.items():
            assert r.status_code == 404, (what, r.status_code, r.text)
            assert r.json()["error"]["code"].endswith("not_found"), what
        assert a.get("/v1/subjects").json()["total"] == 0
        assert "private" not in {c["name"] for c in a.get("/v1/collections").json()["collections"]}
        found = a.post("/v1/identify", params={"min_seq": seq}, files={"image": obama[1].open("rb")}).json()
        assert all(f["decision"] == "unknown" and not f["candidates"] for f in found["faces"])
        # B is untouched and still finds its own subject
        assert _snapshot(b) == before
        found = b.post("/v1/identify", params={"min_seq": seq}, files={"image": obama[1].open("rb")}).json()
        assert found["faces"][0]["subject"]["id"] == sid


def test_scopes_revocation_and_tenant_liveness_minimum(live_app: LiveApp, tenants: dict) -> None:
    with live_app.client(key=tenants["a_read"]["token"]) as reader:
        assert reader.get("/v1/subjects").status_code == 200
        r = reader.post("/v1/subjects", json={"name": "nope"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    with live_app.client(key=tenants["a"]["token"]) as admin:
        assert admin.delete(f"/v1/keys/{tenants['a_read']['key_id']}").status_code == 200
    with live_app.client(key=tenants["a_read"]["token"]) as reader:
        assert reader.get("/v1/subjects").status_code == 401  # revoked: this replica forgot it at once
    with live_app.client(key="fsk_0000_wrong") as wrong:
        assert wrong.get("/v1/subjects").status_code == 401
    with live_app.client(key=None) as anonymous:
        assert anonymous.get("/v1/subjects").status_code == 401  # a bootstrap key is set: never open
    # the tenant's minimum wins over a caller's liveness=off: a spoof is refused
    spoof = FACES_DIR / "liveness" / "image_F2.jpg"
    tenant = tenants["a"]["tenant"]
    with live_app.client() as boot:
        boot.put(f"/v1/tenants/{tenant}", json={"min_enrol_liveness": "block"})
    with live_app.client(key=tenants["a"]["token"]) as admin:
        sid = admin.post("/v1/subjects", json={"name": "spoofer"}).json()["id"]
        time.sleep(5.5)  # the tenant setting is cached per replica for up to 5 s
        r = admin.post(f"/v1/subjects/{sid}/faces", data={"liveness": "off"}, files={"image": spoof.open("rb")})
        assert r.status_code == 422 and r.json()["error"]["code"] == "spoof_detected", r.text
        audit = admin.get("/v1/audit", params={"action": "subject.create"}).json()["entries"]
        assert any(e["target"] == sid and e["actor"] == tenants["a"]["key_id"] for e in audit)


def test_cli_keys(live_app: LiveApp, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--url", live_app.url, "--api-key", BOOTSTRAP_KEY]
    assert cli_main(["keys", "create", "--scopes", "read,enrol", "--name", "cli-made", *base]) == 0
    out = capsys.readouterr().out
    key_id = out.split("created key ", 1)[1].split()[0]
    token = out.split("token (shown once, keep it secret): ", 1)[1].strip()
    with live_app.client(key=token) as c:
        assert c.get("/v1/subjects").status_code == 200
    assert cli_main(["keys", "list", *base]) == 0
    assert key_id in capsys.readouterr().out
    assert cli_main(["keys", "revoke", key_id, *base]) == 0
    with live_app.client(key=token) as c:
        assert c.get("/v1/subjects").status_code == 401
