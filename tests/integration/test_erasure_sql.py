"""The erasure SQL on the real Postgres (no Ray): the outbox commits with the
delete, claims are leases shared safely, guards, completion and receipts, and
the sweeper against a real object store directory."""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import numpy as np
import pytest

from serve_app.errors import ServiceUnavailable
from serve_app.gallery.erasures import ErasureRepository
from serve_app.gallery.objects import ObjectStore
from serve_app.gallery.repository import GalleryRepository
from serve_app.services.erasure import ErasureService, SweeperConfig


def _vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(8).astype(np.float32)
    return v / np.linalg.norm(v)


async def _face(repo: GalleryRepository, col, sid: uuid.UUID, n: int, objects: ObjectStore, **kw) -> int:
    key = f"crops/{col.id}/{sid}/{n}.jpg"
    objects.put(key, b"jpeg")
    rec, _ = await repo.add_face(col, sid, embedding=_vec(n), model="m", image_sha256=f"h{n}", crop_key=key,
                                 box={"x1": 0.0}, det_score=0.9, **kw)
    return rec.id


async def test_subject_erasure_round_trip(repo: GalleryRepository, tmp_path: Path) -> None:
    objects = ObjectStore(f"file://{tmp_path}")
    erasures = ErasureRepository(repo.pool)
    col = await repo.create_collection("c", "m", 8)
    ada = await repo.create_subject(col, "ada")
    bob = await repo.create_subject(col, "bob")
    for i in range(3):
        await _face(repo, col, ada.id, i, objects)
    await _face(repo, col, bob.id, 9, objects)
    await repo.add_feedback(col, ada.id, _vec(5), model="m", source="image", actor="t")
    objects.put(f"index-snapshots/{col.id}/{1:020d}.snap", b"old")
    store_dir = tmp_path / "crops"

    # The store is broken: the delete still commits, with its outbox.
    store_dir.rename(tmp_path / "aside")
    store_dir.write_bytes(b"not a directory")
    removed = await repo.delete_subject(col, ada.id, requested_by="k1")
    assert removed.erasure_id is not None and removed.feedback_removed == 1 and len(removed.face_ids) == 3
    sweeper = ErasureService(erasures, objects, config=SweeperConfig(base_backoff_s=0.05, max_backoff_s=0.2))
    assert await sweeper.sweep_once() == 6  # 3 keys, the prefix, the snapshots, the cache
    receipt = await erasures.receipt(removed.erasure_id, "default")
    assert receipt is not None and not receipt.complete
    copies = {c.copy: c for c in receipt.copies}
    assert copies["snapshots"].complete and not copies["crops"].complete  # only crops/ is broken
    assert "NotADirectoryError" in (copies["crops"].last_error or "")
    assert await erasures.receipt(removed.erasure_id, "other-tenant") is None
    # Storage back: the retries confirm every crop gone, the erasure completes with an audit record.
    store_dir.unlink()
    (tmp_path / "aside").rename(store_dir)
    for _ in range(40):
        if (r := await erasures.receipt(removed.erasure_id, None)) is not None and r.complete:
            break
        await asyncio.sleep(0.1)
        await sweeper.sweep_once()
    receipt = await erasures.receipt(removed.erasure_id, "default")
    assert receipt is not None and receipt.complete and receipt.requested_by == "k1"
    assert receipt.removed["rows"] == {"faces": 3, "subjects": 1, "feedback": 1}
    assert {c.copy: c.removed for c in receipt.copies} == {"postgres": 5, "crops": 3, "snapshots": 1, "cache": 0}
    assert objects.list_keys(f"crops/{col.id}/{ada.id}") == [] and len(objects.list_keys(f"crops/{col.id}")) == 1
    async with repo.pool.acquire() as conn:
        audit = await conn.fetchrow("SELECT * FROM audit_log WHERE action = 'erasure.complete'")
        left = await conn.fetchval("SELECT count(*) FROM feedback WHERE subject_id = $1", ada.id)
    assert audit["target"] == str(removed.erasure_id) and left == 0
    assert await repo.snapshot_floor(col.id) == (True, removed.seq)


async def test_a_failed_delete_leaves_no_outbox(repo: GalleryRepository) -> None:
    col = await repo.create_collection("c", "m", 8)
    with pytest.raises(Exception):
        await repo.delete_subject(col, uuid.uuid4())
    async with repo.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM object_outbox") == 0
        assert await conn.fetchval("SELECT count(*) FROM erasures") == 0


async def test_claims_are_shared_without_overlap(repo: GalleryRepository, tmp_path: Path) -> None:
    objects = ObjectStore(f"file://{tmp_path}")
    erasures = ErasureRepository(repo.pool)
    col = await repo.create_collection("c", "m", 8)
    subjects = [await repo.create_subject(col, f"s{i}") for i in range(5)]
    for s in subjects:
        await repo.delete_subject(col, s.id)
    a, b = await asyncio.gather(erasures.claim(limit=7, lease_s=60), erasures.claim(limit=7, lease_s=60))
    ids_a, ids_b = {i.id for i in a}, {i.id for i in b}
    assert not ids_a & ids_b and len(ids_a | ids_b) == 14  # 5 x (prefix, snapshots, cache), capped at 7 + 7
    assert await erasures.claim(limit=10, lease_s=60) != []  # the last one
    assert await erasures.claim(limit=10, lease_s=60) == []  # leased: none due now
    assert objects.list_keys("crops") == []


async def test_enrolment_guard(repo: GalleryRepository, tmp_path: Path) -> None:
    objects = ObjectStore(f"file://{tmp_path}")
    erasures = ErasureRepository(repo.pool)
    col = await repo.create_collection("c", "m", 8)
    ada = await repo.create_subject(col, "ada")
    # Committed: the row consumed its guard.
    g1 = await erasures.guard(f"crops/{col.id}/{ada.id}/1.jpg", grace_s=600)
    await _face(repo, col, ada.id, 1, objects, guard_id=g1)
    # Never committed, grace passed: the sweeper removes the crop and the guard.
    objects.put(f"crops/{col.id}/{ada.id}/2.jpg", b"orphan")
    await erasures.guard(f"crops/{col.id}/{ada.id}/2.jpg", grace_s=0)
    # Claimed by the sweeper before a late commit: the commit fails and writes nothing.
    g3 = await erasures.guard(f"crops/{col.id}/{ada.id}/3.jpg", grace_s=0)
    claimed = await erasures.claim(limit=10, lease_s=60)
    assert {i.target for i in claimed} == {f"crops/{col.id}/{ada.id}/2.jpg", f"crops/{col.id}/{ada.id}/3.jpg"}
    with pytest.raises(ServiceUnavailable):
        await _face(repo, col, ada.id, 3, objects, guard_id=g3)
    sweeper = ErasureService(erasures, objects)
    for item in claimed:
        await sweeper._work(item)
    assert objects.list_keys(f"crops/{col.id}/{ada.id}") == [f"crops/{col.id}/{ada.id}/1.jpg"]
    async with repo.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM object_outbox") == 0
        assert await conn.fetchval("SELECT count(*) FROM faces") == 1


async def test_collection_erasure_lists_whole_prefixes(repo: GalleryRepository, tmp_path: Path) -> None:
    objects = ObjectStore(f"file://{tmp_path}")
    erasures = ErasureRepository(repo.pool)
    col = await repo.create_collection("c", "m", 8)
    other = await repo.create_collection("c10", "m", 8)
    ada = await repo.create_subject(col, "ada")
    await _face(repo, col, ada.id, 1, objects)
    objects.put(f"crops/{col.id}/unknown/x.jpg", b"x")
    objects.put(f"index-snapshots/{col.id}/{5:020d}.snap", b"x")
    objects.put(f"crops/{other.id}/keep.jpg", b"x")
    removed = await repo.delete_collection(col, requested_by="k")
    sweeper = ErasureService(erasures, objects)
    await sweeper.settle(removed.erasure_id)
    receipt = await erasures.receipt(removed.erasure_id, "default")
    assert receipt is not None and receipt.complete and receipt.kind == "collection"
    assert objects.list_keys("crops") == [f"crops/{other.id}/keep.jpg"] and objects.list_keys("index-snapshots") == []
    assert await repo.snapshot_floor(col.id) == (False, removed.seq)


async def test_backlog_counts_owed_rows_and_the_oldest_age(repo: GalleryRepository, tmp_path: Path) -> None:
    """What the ErasureBacklog alert reads: unfinished erasure rows since they
    were written (also while backing off after failures), guards only past
    their grace; nothing once the sweeper is done."""
    objects = ObjectStore(f"file://{tmp_path}")
    erasures = ErasureRepository(repo.pool)
    seen: list[tuple[int, float]] = []
    sweeper = ErasureService(erasures, objects, config=SweeperConfig(base_backoff_s=0.05, max_backoff_s=0.2),
                             on_backlog=lambda n, age: seen.append((n, age)))
    assert await erasures.backlog(600) == (0, 0.0)
    col = await repo.create_collection("c", "m", 8)
    ada = await repo.create_subject(col, "ada")
    g = await erasures.guard(f"crops/{col.id}/{ada.id}/1.jpg", grace_s=600)  # an enrolment in flight
    assert (await erasures.backlog(600))[0] == 0
    await _face(repo, col, ada.id, 1, objects, guard_id=g)
    await _face(repo, col, ada.id, 2, objects)
    # Storage broken: the erasure's rows fail and back off, and stay owed.
    (tmp_path / "crops").rename(tmp_path / "aside")
    (tmp_path / "crops").write_bytes(b"not a directory")
    await repo.delete_subject(col, ada.id, requested_by="k1")
    await sweeper.sweep_once()
    async with repo.pool.acquire() as conn:
        await conn.execute("UPDATE object_outbox SET created_at = now() - interval '1 hour'")
    n, oldest = await erasures.backlog(600)
    assert n >= 2 and 3590 < oldest < 3700  # the two crops, the prefix at least
    got = await sweeper.report_backlog()  # the first report is not throttled
    assert got is not None and got[0] == n and seen == [got] and got[1] >= oldest
    assert await sweeper.report_backlog() is None and len(seen) == 1  # throttled to interval_s
    # An orphaned crop's guard counts from the end of its grace.
    await erasures.guard(f"crops/{col.id}/x/9.jpg", grace_s=0)
    assert (await erasures.backlog(0))[0] == n + 1
    # Storage back: the sweeper finishes, nothing is owed.
    (tmp_path / "crops").unlink()
    (tmp_path / "aside").rename(tmp_path / "crops")
    for _ in range(60):
        await asyncio.sleep(0.1)
        await sweeper.sweep_once()
        if (await erasures.backlog(0))[0] == 0:
            break
    assert await erasures.backlog(0) == (0, 0.0)
    assert await sweeper.report_backlog(force=True) == (0, 0.0) and seen[-1] == (0, 0.0)
