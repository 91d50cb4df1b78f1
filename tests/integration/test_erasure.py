"""Erasure you can prove, against the real app: a subject is deleted while the
object store is failing, the sweeper finishes once storage is back, and then
nothing of the subject is left anywhere it was.

The store fails the way the fault drill (test_faults.py) makes it fail: the
file:// store's `crops` and `index-snapshots` directories are moved aside and
plain files put in their place, so every listing, lookup and delete under
them errors (as root, permissions would not stop anything). Afterwards the
test scans Postgres (faces, subject, feedback rows), every object key in the
bucket, every index snapshot object (decoded and byte-scanned for the
subject's vectors), Redis, and the matcher's answer.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis

from serve_app.gallery.index_snapshots import decode, payload_of
from tests.conftest import people
from tests.integration.conftest import REDIS_URL, LiveApp

SNAPSHOT_KEY = b"it-snapshot-signing-key"  # the session app signs its snapshots with this
DEADLINE_S = 180.0  # for the snapshot to appear, and for the sweeper to finish after storage is back


def _enrol(c: httpx.Client, collection: str, sid: str, photo: Path) -> dict[str, Any]:
    r = c.post(f"/v1/subjects/{sid}/faces", params={"collection": collection},
               files={"image": (photo.name, photo.read_bytes())}, data={"liveness": "off", "largest": "true"})
    assert r.status_code == 201, r.text
    return r.json()


async def _rows(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def _q(app: LiveApp, sql: str, *args: Any) -> list[asyncpg.Record]:
    return asyncio.run(_rows(app.database_url, sql, *args))


def _snapshots(app: LiveApp) -> list[Path]:
    root = app.object_dir / "index-snapshots"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []


def _wait(what: str, check: Any, deadline_s: float = DEADLINE_S, every_s: float = 1.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline_s:
        if check():
            return time.monotonic() - t0
        time.sleep(every_s)
    raise AssertionError(f"{what}: not within {deadline_s:.0f} s")


def _break(root: Path, name: str) -> Path:
    """The drill's failure: the directory moved aside and a plain file in its place."""
    (root / name).mkdir(parents=True, exist_ok=True)
    aside = root / f"{name}.aside"
    (root / name).rename(aside)
    (root / name).write_bytes(b"not a directory")
    return aside


def _restore(root: Path, name: str) -> None:
    (root / name).unlink()
    (root / f"{name}.aside").rename(root / name)


def test_subject_erased_while_the_object_store_fails(live_app: LiveApp) -> None:
    collection = f"erasure-{time.time_ns()}"
    photos = people()
    with live_app.client(timeout=60) as c:
        assert c.post("/v1/collections", json={"name": collection}).status_code == 201
        sid = c.post("/v1/subjects", json={"name": "erase-me", "collection": collection}).json()["id"]
        keep = c.post("/v1/subjects", json={"name": "keep-me", "collection": collection}).json()["id"]
        enrolled = [_enrol(c, collection, sid, p) for p in photos["obama"][:3]]
        _enrol(c, collection, keep, photos["biden"][0])
        r = c.post(f"/v1/subjects/{sid}/not-this-person", params={"collection": collection},
                   files={"image": ("p.jpg", photos["rose_leslie"][0].read_bytes())})
        assert r.status_code == 201, r.text
        cid = _q(live_app, "SELECT id FROM collections WHERE name = $1", collection)[0]["id"]
        faces = {r["id"]: (r["crop_key"], bytes(r["embedding"])) for r in _q(
            live_app, "SELECT id, crop_key, embedding FROM faces WHERE subject_id = $1", uuid.UUID(sid))}
        assert sorted(faces) == sorted(e["face"]["id"] for e in enrolled)
        # A crop no row points at (a writer that died between upload and commit): only the prefix finds it.
        stray = live_app.object_dir / "crops" / str(cid) / sid / "stray.jpg"
        stray.write_bytes(b"\xff\xd8 a crop nobody knows of")
        keep_crops = sorted((live_app.object_dir / "crops" / str(cid) / keep).iterdir())

        # The matcher snapshots every 2 changes (the session app's config): wait for one holding the subject.
        def holds_subject() -> bool:
            return any(uuid.UUID(sid) in decode(p.read_bytes(), signing_key=SNAPSHOT_KEY).subject_of.values()
                       for p in _snapshots(live_app) if p.name.endswith(".snap"))

        _wait("an index snapshot holding the subject", holds_subject)

        crops_aside = _break(live_app.object_dir, "crops")
        snaps_aside = _break(live_app.object_dir, "index-snapshots")
        try:
            r = c.delete(f"/v1/subjects/{sid}", params={"collection": collection})
            assert r.status_code == 200, r.text
            answer = r.json()
            erasure = answer["erasure"]
            assert answer["faces_removed"] == 3 and answer["feedback_removed"] == 1
            assert not erasure["complete"] and erasure["completed_at"] is None
            assert erasure["copies"]["postgres"]["complete"]
            assert erasure["removed"]["rows"] == {"faces": 3, "subjects": 1, "feedback": 1}
            for copy in ("crops", "snapshots"):
                assert not erasure["copies"][copy]["complete"], erasure["copies"][copy]
                assert erasure["copies"][copy]["last_error"], erasure["copies"][copy]
            assert f"object store: crops/{cid}/{sid}/" in erasure["copies"]["crops"]["where"]
            # Postgres is already clean, inside the delete's own transaction.
            assert not _q(live_app, "SELECT 1 FROM faces WHERE subject_id = $1", uuid.UUID(sid))
            assert not _q(live_app, "SELECT 1 FROM subjects WHERE id = $1", uuid.UUID(sid))
            assert not _q(live_app, "SELECT 1 FROM feedback WHERE subject_id = $1", uuid.UUID(sid))
            # The sweeper keeps trying while the store is down.
            _wait("a retry while the store is down", lambda: c.get(f"/v1/erasures/{erasure['id']}").json()[
                "copies"]["crops"]["attempts"] >= 2, deadline_s=30)
            during = c.get(f"/v1/erasures/{erasure['id']}").json()
            assert not during["complete"]
        finally:
            _restore(live_app.object_dir, "crops")
            _restore(live_app.object_dir, "index-snapshots")
        assert not crops_aside.exists() and not snaps_aside.exists()

        t0 = time.monotonic()
        _wait("the erasure to complete once storage is back",
              lambda: c.get(f"/v1/erasures/{erasure['id']}").json()["complete"])
        print(f"\nerasure completed {time.monotonic() - t0:.1f} s after storage came back")
        done = c.get(f"/v1/erasures/{erasure['id']}").json()
        assert done["completed_at"] and all(copy["complete"] for copy in done["copies"].values()), done
        assert done["copies"]["crops"]["removed"] == 4  # 3 known crops + the stray, under the prefix
        assert done["copies"]["snapshots"]["removed"] >= 1

        # Postgres: no row of the subject; its erasure's outbox is all done.
        assert not _q(live_app, "SELECT 1 FROM faces WHERE subject_id = $1", uuid.UUID(sid))
        assert not _q(live_app, "SELECT 1 FROM feedback WHERE subject_id = $1", uuid.UUID(sid))
        assert not _q(live_app, "SELECT 1 FROM object_outbox WHERE erasure_id = $1 AND done_at IS NULL",
                      uuid.UUID(erasure["id"]))
        # The bucket, every key of it: nothing under or naming the subject; the other subject's crops stay.
        keys = [str(p.relative_to(live_app.object_dir)) for p in live_app.object_dir.rglob("*") if p.is_file()]
        assert not [k for k in keys if sid in k], keys
        assert not [k for k in keys if k in {key for key, _ in faces.values()}]
        assert sorted((live_app.object_dir / "crops" / str(cid) / keep).iterdir()) == keep_crops
        # Every snapshot object: decoded, neither the subject nor its faces. The
        # collection's own snapshots are byte-scanned for its vectors too (other
        # collections may hold the same photos, and so the very same vectors).
        own = live_app.object_dir / "index-snapshots" / str(cid)
        for p in _snapshots(live_app):
            blob = p.read_bytes()
            if own in p.parents:
                scan = blob + payload_of(blob)  # frames joined: a vector split across two is still found
                assert not [f for f, (_, vec) in faces.items() if vec in scan], f"{p} holds an erased vector"
            if p.name.endswith(".snap"):
                snap = decode(blob, signing_key=SNAPSHOT_KEY)
                assert uuid.UUID(sid) not in snap.subject_of.values() and not set(faces) & set(snap.subject_of)
        # Redis: no key names the subject (its tie set, its cache entries and idempotency records are gone).
        assert not list(redis.Redis.from_url(REDIS_URL).scan_iter(match=f"*{sid}*", count=1000))
        # The matcher, at the erasure's seq: the subject's own photo finds only other people.
        r = c.post("/v1/identify", params={"collection": collection, "min_seq": erasure["seq"]},
                   files={"image": ("p.jpg", photos["obama"][0].read_bytes())})
        assert r.status_code == 200, r.text
        assert sid not in r.text
        # The audit trail: the delete, with what and where, and the completion.
        audit = c.get("/v1/audit", params={"action": "subject.delete", "limit": 50}).json()
        entry = next(e for e in audit["entries"] if e["target"] == sid)
        assert entry["details"]["erasure_id"] == erasure["id"] and "crops" in entry["details"]["copies"]
        completed = c.get("/v1/audit", params={"action": "erasure.complete", "limit": 50}).json()
        assert any(e["target"] == erasure["id"] for e in completed["entries"])

        # Another tenant's key gets 404 for this receipt.
        tenant = f"erasure-other-{time.time_ns() % 10**9}"
        assert c.put(f"/v1/tenants/{tenant}", json={}).status_code == 200
        token = c.post("/v1/keys", params={"tenant": tenant}, json={"scopes": ["read", "enrol"]}).json()["token"]
        with live_app.client(key=token) as other:
            miss = other.get(f"/v1/erasures/{erasure['id']}")
            assert miss.status_code == 404 and miss.json()["error"]["code"] == "erasure_not_found"


def test_orphaned_enrolment_crop_is_swept(live_app: LiveApp) -> None:
    """A guard row whose enrolment never committed (the process died between
    upload and commit) is due after its grace period: the sweeper deletes the
    crop. The grace period is shortened here by making the guard due now."""
    key = f"crops/999999/{uuid.uuid4()}/orphan.jpg"
    path = live_app.object_dir / key
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xff\xd8 orphan")
    _q(live_app, "INSERT INTO object_outbox (copy, op, target, not_before) VALUES ('crops', 'object', $1, now())",
       key)
    _wait("the orphaned crop to be swept", lambda: not path.exists(), deadline_s=60)
    _wait("its guard row to go", lambda: not _q(live_app, "SELECT 1 FROM object_outbox WHERE target = $1", key),
          deadline_s=30)
