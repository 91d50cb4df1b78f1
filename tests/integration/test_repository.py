"""GalleryRepository against the real PostgreSQL (no Ray)."""
from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

from serve_app.errors import Conflict, FaceNotFound, InvalidRequest, SubjectNotFound
from serve_app.gallery.repository import GalleryRepository




def _vec(seed: int, dim: int = 8) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


async def _add(repo: GalleryRepository, col, sid, seed: int):
    return await repo.add_face(
        col, sid, embedding=_vec(seed), model="test", image_sha256="0" * 64,
        crop_key=f"crops/{seed}.jpg", box={"x1": 0, "y1": 0, "x2": 1, "y2": 1}, det_score=0.9,
    )


async def test_migrations_are_idempotent(repo: GalleryRepository) -> None:
    from serve_app.gallery.migrations import migrate

    async with repo.pool.acquire() as conn:
        assert await migrate(conn) == []
        versions = await conn.fetch("SELECT version FROM schema_migrations")
    from serve_app.gallery.migrations import migration_files

    assert [r["version"] for r in versions] == [v for v, _ in migration_files()]


async def test_change_log_replays_to_the_same_gallery(repo: GalleryRepository) -> None:
    col = await repo.ensure_collection("c", "test", 8)
    a = await repo.create_subject(col, "a")
    b = await repo.create_subject(col, "b")
    (f1, s1) = await _add(repo, col, a.id, 1)
    (f2, s2) = await _add(repo, col, a.id, 2)
    (f3, s3) = await _add(repo, col, b.id, 3)
    assert s1 < s2 < s3
    removed = await repo.delete_face(col, a.id, f1.id)
    assert removed.face_ids == [f1.id] and removed.crop_keys == ["crops/1.jpg"]
    gone = await repo.delete_subject(col, b.id)
    assert gone.face_ids == [f3.id] and gone.seq > removed.seq

    live: dict[int, np.ndarray] = {}
    for ch in await repo.changes_since(0):
        if ch.op == "add" and ch.embedding is not None:
            live[ch.face_id] = ch.embedding
        elif ch.op == "remove":
            live.pop(ch.face_id, None)
    seq, faces = await repo.load_all()
    assert seq == gone.seq
    assert sorted(live) == sorted(f.face_id for f in faces) == [f2.id]
    np.testing.assert_allclose(faces[0].embedding, _vec(2), rtol=1e-6)


async def test_errors(repo: GalleryRepository) -> None:
    col = await repo.ensure_collection("c", "test", 8)
    a = await repo.create_subject(col, "a")
    with pytest.raises(Conflict):
        await repo.create_subject(col, "a")
    with pytest.raises(InvalidRequest):
        await repo.create_subject(col, "   ")
    with pytest.raises(SubjectNotFound):
        await _add(repo, col, uuid.uuid4(), 1)
    with pytest.raises(FaceNotFound):
        await repo.delete_face(col, a.id, 12345)
    with pytest.raises(InvalidRequest):  # wrong dimension for the collection
        await repo.add_face(col, a.id, embedding=np.ones(4, np.float32), model="test",
                            image_sha256="0", crop_key=None, box={}, det_score=1.0)
    # nothing half-written: no faces, no log entries
    assert await repo.latest_seq() == 0


async def test_concurrent_writers_commit_in_log_order(repo: GalleryRepository) -> None:
    col = await repo.ensure_collection("c", "test", 8)
    subjects = [await repo.create_subject(col, f"s{i}") for i in range(4)]
    results = await asyncio.gather(*(_add(repo, col, subjects[i % 4].id, i) for i in range(40)))
    seqs = sorted(s for _, s in results)
    assert seqs == list(range(seqs[0], seqs[0] + 40))
    # a reader that follows the log sees every face exactly once
    assert len({c.face_id for c in await repo.changes_since(0)}) == 40


async def test_paging_is_stable(repo: GalleryRepository) -> None:
    col = await repo.ensure_collection("c", "test", 8)
    for i in range(7):
        await repo.create_subject(col, f"p{i}")
    seen, after = [], None
    while True:
        page = await repo.list_subjects(col, limit=3, after=after)
        seen += [s.name for s in page]
        if len(page) < 3:
            break
        after = (page[-1].created_at, page[-1].id)
    assert sorted(seen) == [f"p{i}" for i in range(7)]
