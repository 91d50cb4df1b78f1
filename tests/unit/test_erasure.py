"""Erasure with a receipt, driven through the services with fakes (no Ray, no servers):
the outbox written with the delete, the sweeper's retries with backoff, the
receipt, enrolment guards, snapshot purging, and the strict object store."""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serve_app.errors import ErasureNotFound, ServiceUnavailable
from serve_app.gallery.index_snapshots import SnapshotStore, snapshot_seq_of
from serve_app.gallery.objects import ObjectStore
from serve_app.services.erasure import ErasureService, SweeperConfig
from serve_app.services.gallery import GalleryService
from serve_app.services.liveness_policy import LivenessPolicy
from serve_app.timing import StageTimer
from tests.unit.fakes import DIM, FakeErasures, FakeObjects, FakePipeline, FakeRepo, unit


class FakeSubjectKeys:
    """embedding_cache.SubjectKeys' delete hook: forget(subject) -> keys removed."""

    def __init__(self) -> None:
        self.tied: dict[str, set[str]] = {}
        self.down = False

    async def forget(self, subject_id: str) -> int:
        if self.down:
            raise ConnectionError("redis down")
        return len(self.tied.pop(str(subject_id), set()))


class World:
    def __init__(self) -> None:
        self.repo = FakeRepo()
        self.pipe = FakePipeline(self.repo)
        self.objects = FakeObjects()
        self.cache = FakeSubjectKeys()
        self.gal = GalleryService(self.pipe, self.repo, self.objects, model="fake", dim=DIM,
                                  default_collection="default")
        self.erasures = ErasureService(self.repo.erasures, self.objects, self.cache,
                                       SweeperConfig(settle_s=5.0, base_backoff_s=1.0, max_backoff_s=30.0,
                                                     guard_grace_s=600.0))
        self.gal.erasures = self.erasures

    @property
    def outbox(self) -> FakeErasures:
        return self.repo.erasures

    async def enrolled(self, name: str, *vectors: np.ndarray) -> uuid.UUID:
        col = await self.gal.collection(None, create=True)
        s = await self.gal.create_subject(col, name, {})
        for i, v in enumerate(vectors):
            data = self.pipe.script(f"{name}-{i}".encode(), v)
            await self.gal.enrol(col, s.id, data, StageTimer(), largest=False, policy=LivenessPolicy.OFF)
        return s.id


@pytest.fixture()
def world() -> World:
    return World()


def _snap(cid: int, seq: int) -> str:
    return f"index-snapshots/{cid}/{seq:020d}.snap"


async def test_subject_erasure_removes_every_copy_and_answers_complete(world: World) -> None:
    sid = await world.enrolled("ada", unit(1, 0, 0, 0), unit(1, 0.1, 0, 0))
    col = await world.gal.collection(None)
    assert world.outbox.outbox == {}  # each enrolment's guard went with its committed row
    world.repo.feedback[1] = (col.id, sid, unit(0, 1, 0, 0))
    stray = f"crops/{col.id}/{sid}/left-by-a-crash.jpg"  # no row points at it: only the prefix finds it
    world.objects.data[stray] = b"jpeg"
    other = await world.enrolled("bob", unit(0, 0, 1, 0))
    world.objects.data[_snap(col.id, world.repo.seq)] = b"snapshot holding ada"
    world.objects.data[_snap(col.id, world.repo.seq) + ".tmp-abc123"] = b"half a snapshot"
    world.cache.tied[str(sid)] = {"faceserve:emb:x:1", "faceserve:idem:y"}
    bob_crops = world.objects.list_keys(f"crops/{col.id}/{other}")

    removed = await world.gal.delete_subject(col, sid, requested_by="key-1")

    receipt = removed.erasure
    assert receipt is not None and receipt.complete and receipt.completed_at is not None
    assert removed.faces_removed == 2 and removed.feedback_removed == 1 and removed.crops_pending_cleanup == 0
    copies = {c.copy: c for c in receipt.copies}
    assert copies["postgres"].removed == 4  # 2 faces, 1 subject, 1 feedback row
    assert copies["crops"].complete and copies["crops"].removed == 3  # 2 known keys + the stray (prefix)
    assert copies["snapshots"].complete and copies["snapshots"].removed == 2
    assert copies["cache"].complete and copies["cache"].removed == 2
    assert f"object store: crops/{col.id}/{sid}/" in copies["crops"].where
    assert receipt.requested_by == "key-1" and receipt.kind == "subject" and receipt.target == str(sid)
    assert not [k for k in world.objects.data if str(sid) in k] and not world.objects.list_keys("index-snapshots")
    assert world.objects.list_keys(f"crops/{col.id}/{other}") == bob_crops  # nobody else's crops
    assert world.repo.feedback == {} and world.outbox.audits[-1]["action"] == "erasure.complete"


async def test_erasure_while_the_store_fails_is_retried_with_backoff_until_confirmed(world: World) -> None:
    sid = await world.enrolled("ada", unit(1, 0, 0, 0))
    col = await world.gal.collection(None)
    world.objects.data[_snap(col.id, world.repo.seq)] = b"snapshot holding ada"
    world.objects.fail_delete = True

    removed = await world.gal.delete_subject(col, sid)

    assert removed.erasure is not None and not removed.erasure.complete
    assert sid not in world.repo.subjects and removed.crops_pending_cleanup == 2  # the key and the prefix
    pending = {c.copy: c for c in removed.erasure.copies}
    assert not pending["crops"].complete and "OSError" in (pending["crops"].last_error or "")
    assert pending["cache"].complete  # Redis was fine
    # Rows are rescheduled with exponential backoff: nothing is due until the clock moves.
    assert await world.erasures.sweep_once() == 0
    prefix_row = next(r for r in world.outbox.outbox.values() if r["op"] == "prefix")
    delays = [prefix_row["not_before"] - world.outbox.clock]
    for _ in range(6):
        world.outbox.clock = max(r["not_before"] for r in world.outbox.outbox.values() if r["done_at"] is None)
        assert await world.erasures.sweep_once() > 0
        delays.append(prefix_row["not_before"] - world.outbox.clock)
    # doubling from 1 s (with up to 25 % jitter off), capped at 30 s
    assert all(0.75 * 2 ** i <= d <= 2 ** i for i, d in enumerate(delays[:5])), delays
    assert 22.5 <= delays[-1] <= 30.0 and prefix_row["attempts"] == 7
    receipt = await world.erasures.receipt(removed.erasure.id, "default")
    assert not receipt.complete and not [c for c in receipt.copies if c.copy in ("crops", "snapshots") and c.complete]
    # Storage is back: the next due attempt confirms everything gone.
    world.objects.fail_delete = False
    world.outbox.clock += 60
    while await world.erasures.sweep_once():
        pass
    receipt = await world.erasures.receipt(removed.erasure.id, "default")
    assert receipt.complete and all(c.complete and c.last_error is None for c in receipt.copies)
    assert not [k for k in world.objects.data if str(sid) in k or k.startswith("index-snapshots/")]


async def test_snapshots_from_after_the_erasure_stay(world: World) -> None:
    sid = await world.enrolled("ada", unit(1, 0, 0, 0))
    col = await world.gal.collection(None)
    before = _snap(col.id, world.repo.seq)
    world.objects.data[before] = b"old"
    removed = await world.gal.remove_face(col, sid, next(iter(world.repo.faces)))
    assert removed.erasure is not None and removed.erasure.complete
    assert before not in world.objects.data
    world.objects.data[_snap(col.id, removed.seq)] = b"new"  # a matcher re-snapshotted at the erasure's seq
    await world.gal.delete_subject(col, sid)  # nothing left to erase in it but the subject
    assert _snap(col.id, removed.seq) not in world.objects.data  # below this second erasure


async def test_receipts_are_tenant_scoped(world: World) -> None:
    sid = await world.enrolled("ada", unit(1, 0, 0, 0))
    col = await world.gal.collection(None)
    removed = await world.gal.delete_subject(col, sid)
    assert removed.erasure is not None
    assert (await world.gal.erasure(str(removed.erasure.id), "default")).complete
    for eid, tenant in ((str(removed.erasure.id), "acme"), ("not-a-uuid", "default"), (str(uuid.uuid4()), "default")):
        with pytest.raises(ErasureNotFound):
            await world.gal.erasure(eid, tenant)


async def test_cache_outage_keeps_the_erasure_open(world: World) -> None:
    sid = await world.enrolled("ada", unit(1, 0, 0, 0))
    col = await world.gal.collection(None)
    world.cache.tied[str(sid)] = {"k"}
    world.cache.down = True
    removed = await world.gal.delete_subject(col, sid)
    assert removed.erasure is not None and not removed.erasure.complete
    assert [c.complete for c in removed.erasure.copies if c.copy == "cache"] == [False]
    world.cache.down = False
    world.outbox.clock += 60
    while await world.erasures.sweep_once():
        pass
    assert (await world.gal.erasure(str(removed.erasure.id), "default")).complete and world.cache.tied == {}


async def test_without_a_cache_the_receipt_says_so(world: World) -> None:
    world.erasures.cache = None
    sid = await world.enrolled("ada", unit(1, 0, 0, 0))
    removed = await world.gal.delete_subject(await world.gal.collection(None), sid)
    cache = [c for c in removed.erasure.copies if c.copy == "cache"][0]  # type: ignore[union-attr]
    assert cache.complete and cache.removed == 0 and cache.notes and "no Redis cache" in cache.notes[0]


async def test_large_prefixes_are_removed_in_batches(world: World) -> None:
    world.erasures.config.prefix_batch = 2
    sid = await world.enrolled("ada", unit(1, 0, 0, 0))
    col = await world.gal.collection(None)
    for i in range(5):
        world.objects.data[f"crops/{col.id}/{sid}/extra{i}.jpg"] = b"x"
    removed = await world.gal.delete_subject(col, sid)
    assert removed.erasure is not None and removed.erasure.complete
    assert [c.removed for c in removed.erasure.copies if c.copy == "crops"] == [6]
    assert not world.objects.list_keys(f"crops/{col.id}")


async def test_deletes_do_not_wait_on_a_store_that_is_failing(world: World) -> None:
    ada = await world.enrolled("ada", unit(1, 0, 0, 0))
    bob = await world.enrolled("bob", unit(0, 1, 0, 0))
    col = await world.gal.collection(None)
    world.objects.fail_delete = True
    await world.gal.delete_subject(col, ada)  # waits for its own erasure, which fails
    stuck = asyncio.Event()

    async def never_done(erasure_id: uuid.UUID) -> None:
        await stuck.wait()

    world.erasures._sweep_erasure = never_done  # type: ignore[method-assign]
    world.erasures.config.settle_s = 3600.0
    removed = await asyncio.wait_for(world.gal.delete_subject(col, bob), 30)  # does not wait settle_s
    assert removed.erasure is not None and not removed.erasure.complete
    stuck.set()


# --- enrolment guards ----------------------------------------------------------------
async def test_failed_enrolment_drops_its_crop_and_its_guard(world: World) -> None:
    col = await world.gal.collection(None, create=True)
    s = await world.gal.create_subject(col, "ada", {})
    world.repo.fail_add_face = ConnectionError("postgres went away")
    with pytest.raises(ConnectionError):
        await world.gal.enrol(col, s.id, world.pipe.script(b"a", unit(1, 0, 0, 0)), StageTimer(), largest=False,
                              policy=LivenessPolicy.OFF)
    assert world.objects.data == {} and world.outbox.outbox == {}


async def test_orphaned_crop_is_swept_once_its_guard_falls_due(world: World) -> None:
    col = await world.gal.collection(None, create=True)
    s = await world.gal.create_subject(col, "ada", {})
    world.repo.fail_add_face = ConnectionError("postgres went away")
    real_adelete = world.objects.adelete_many

    async def store_fails_on_cleanup(keys: list[str]) -> list[str]:
        return list(keys)  # the clean-up after the failed row write fails too

    world.objects.adelete_many = store_fails_on_cleanup  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        await world.gal.enrol(col, s.id, world.pipe.script(b"a", unit(1, 0, 0, 0)), StageTimer(), largest=False,
                              policy=LivenessPolicy.OFF)
    world.objects.adelete_many = real_adelete  # type: ignore[method-assign]
    (orphan,) = world.objects.data
    assert await world.erasures.sweep_once() == 0  # within the grace period an enrolment may still commit
    world.outbox.clock += 601
    assert await world.erasures.sweep_once() == 1
    assert world.objects.data == {} and world.outbox.outbox == {}


async def test_a_guard_claimed_by_the_sweeper_fails_the_late_commit(world: World) -> None:
    col = await world.gal.collection(None, create=True)
    s = await world.gal.create_subject(col, "ada", {})
    guard = await world.erasures.guard(f"crops/{col.id}/{s.id}/x.jpg")
    world.outbox.clock += 601
    assert len(await world.outbox.claim(limit=10, lease_s=60)) == 1  # the sweeper took it
    with pytest.raises(ServiceUnavailable):
        await world.repo.add_face(col, s.id, embedding=unit(1, 0, 0, 0), model="fake", image_sha256="h",
                                  crop_key=f"crops/{col.id}/{s.id}/x.jpg", box={}, det_score=0.9, guard_id=guard)
    assert world.repo.faces == {}


def test_backoff_doubles_and_is_capped() -> None:
    svc = ErasureService(FakeErasures(), FakeObjects(), config=SweeperConfig(base_backoff_s=1, max_backoff_s=30))
    for attempts, top in ((1, 1), (2, 2), (3, 4), (5, 16), (6, 30), (40, 30)):
        d = svc.backoff_s(attempts)
        assert 0.75 * top <= d <= top


# --- the HTTP edge -------------------------------------------------------------------
@pytest.fixture()
def app(world: World) -> Iterator[TestClient]:
    from serve_app.api.app import create_app
    from serve_app.api.deps import Edge
    from serve_app.deployment_config import IngressConfig
    from serve_app.services.access import Authenticator
    from serve_app.services.recognition import RecognitionService
    from tests.unit.fakes import CountingOutcomes, FakeAccess

    asyncio.run(world.gal.collection(None, create=True))
    access = FakeAccess()
    edge = Edge(recognition=RecognitionService(world.pipe, world.repo, CountingOutcomes()), gallery=world.gal,
                config=lambda: IngressConfig(), auth=Authenticator(access, b"boot", cache_ttl_s=0.0), access=access)
    with TestClient(create_app(edge), raise_server_exceptions=False, headers={"x-api-key": "boot"}) as client:
        client.access = access  # type: ignore[attr-defined]
        yield client


def test_delete_answer_audit_and_receipt_over_http(app: TestClient, world: World) -> None:
    jpeg = world.pipe.script(b"\xff\xd8\xff\xe0face", unit(1, 0, 0, 0))
    sid = app.post("/v1/subjects", json={"name": "ada"}).json()["id"]
    assert app.post(f"/v1/subjects/{sid}/faces", files={"image": ("a.jpg", jpeg)},
                    data={"liveness": "off"}).status_code == 201
    r = app.delete(f"/v1/subjects/{sid}")
    assert r.status_code == 200, r.text
    body = r.json()
    erasure = body["erasure"]
    assert erasure["complete"] and erasure["completed_at"] and set(erasure["copies"]) == {
        "postgres", "crops", "snapshots", "cache"}
    assert erasure["copies"]["crops"]["removed"] == 1 and erasure["removed"]["rows"]["faces"] == 1
    audit = [a for a in app.access.audits if a[2] == "subject.delete"]  # type: ignore[attr-defined]
    assert audit and audit[0][3] == sid
    got = app.get(f"/v1/erasures/{erasure['id']}")
    assert got.status_code == 200 and got.json()["complete"] and got.json()["id"] == erasure["id"]
    # another tenant's key sees no such erasure; neither does a malformed id
    app.put("/v1/tenants/acme", json={})
    other = app.post("/v1/keys", params={"tenant": "acme"}, json={"scopes": ["read", "enrol"]}).json()["token"]
    for url, key in ((f"/v1/erasures/{erasure['id']}", other), ("/v1/erasures/nope", "boot")):
        miss = app.get(url, headers={"x-api-key": key})
        assert miss.status_code == 404 and miss.json()["error"]["code"] == "erasure_not_found"
    assert "/v1/erasures/{erasure_id}" in app.get("/openapi.json").json()["paths"]


def test_face_delete_answers_with_its_receipt(app: TestClient, world: World) -> None:
    jpeg = world.pipe.script(b"\xff\xd8\xff\xe0face", unit(1, 0, 0, 0))
    sid = app.post("/v1/subjects", json={"name": "ada"}).json()["id"]
    face = app.post(f"/v1/subjects/{sid}/faces", files={"image": ("a.jpg", jpeg)},
                    data={"liveness": "off"}).json()["face"]["id"]
    r = app.delete(f"/v1/subjects/{sid}/faces/{face}")
    assert r.status_code == 200 and r.json()["erasure"]["kind"] == "face" and r.json()["erasure"]["complete"]
    assert world.objects.data == {}


# --- the object store and snapshots, on a real directory ---------------------------------
def test_local_store_that_cannot_be_read_is_an_error_not_empty(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}")
    store.put("crops/1/s/a.jpg", b"x")
    assert store.list_keys("crops/1/s") == ["crops/1/s/a.jpg"] and store.present("crops/1/s/a.jpg")
    assert store.list_keys("crops/2") == [] and not store.present("crops/2/s/a.jpg")
    (tmp_path / "crops").rename(tmp_path / "aside")
    (tmp_path / "crops").write_bytes(b"not a directory")  # a broken store, as the fault drill makes it
    for call in (lambda: store.list_keys("crops/1/s"), lambda: store.present("crops/1/s/a.jpg"),
                 lambda: store.delete("crops/1/s/a.jpg")):
        with pytest.raises(OSError):
            call()
    (tmp_path / "crops").unlink()
    (tmp_path / "aside").rename(tmp_path / "crops")
    store.delete_keys(["crops/1/s/a.jpg", "crops/1/s/never-there.jpg"])
    assert store.list_keys("crops/1") == []


def test_prune_drops_every_snapshot_below_an_erasure(tmp_path: Path) -> None:
    objects = ObjectStore(f"file://{tmp_path}")
    snaps = SnapshotStore(objects, keep=2)
    for seq in (10, 20, 30):
        objects.put(snaps.key(7, seq), b"s")
    objects.put(snaps.key(7, 25) + ".tmp-0a1b", b"half")
    assert sorted(snapshot_seq_of(k) for k in snaps.prune(7)) == [10]  # keep 2
    assert snaps.list_seqs(7) == [30, 20]
    assert sorted(snapshot_seq_of(k) for k in snaps.prune(7, floor=30)) == [20, 25]  # fewer than keep remain
    assert snaps.list_seqs(7) == [30]
    assert snaps.prune(7, floor=31) and snaps.list_seqs(7) == [] and objects.list_keys("index-snapshots") == []
