"""The matcher's load path (snapshots + log replay) against real Postgres, without Ray."""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from serve_app.gallery.gallery_index import GalleryIndex
from serve_app.gallery.index_snapshots import SnapshotStore
from serve_app.gallery.objects import ObjectStore
from serve_app.gallery.repository import Collection, GalleryRepository

DIM = 8




@pytest.fixture()
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(ObjectStore(f"file://{tmp_path}/objects"))


def _vec(rng: np.random.Generator, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


async def _enrol(
    repo: GalleryRepository, col: Collection, rng: np.random.Generator, subjects: int, faces: int
) -> list[tuple[uuid.UUID, int]]:
    out = []
    for _ in range(subjects):
        sub = await repo.create_subject(col, f"s{uuid.uuid4().hex[:8]}")
        for _ in range(faces):
            face, _seq = await repo.add_face(
                col, sub.id, embedding=_vec(rng, col.dim), model=col.embedder, image_sha256="0" * 64,
                crop_key=None, box={"x1": 0, "y1": 0, "x2": 1, "y2": 1}, det_score=0.9,
            )
            out.append((sub.id, face.id))
    return out


def _assert_same(a: GalleryIndex, b: GalleryIndex, dims: dict[int, int]) -> None:
    assert a.seq == b.seq
    assert a.subject_of == b.subject_of
    assert {c: sorted(ix.ids().tolist()) for c, ix in a.indexes.items() if len(ix)} == {
        c: sorted(ix.ids().tolist()) for c, ix in b.indexes.items() if len(ix)
    }
    rng = np.random.default_rng(123)
    for cid, dim in dims.items():
        q = np.stack([_vec(rng, dim) for _ in range(5)])
        assert a.search(cid, q, 5) == b.search(cid, q, 5)


async def test_snapshot_plus_log_equals_full_load(repo: GalleryRepository, store: SnapshotStore) -> None:
    rng = np.random.default_rng(1)
    c1 = await repo.ensure_collection("c1", "test", DIM)
    c2 = await repo.ensure_collection("c2", "test", DIM)
    f1 = await _enrol(repo, c1, rng, subjects=6, faces=3)
    await _enrol(repo, c2, rng, subjects=4, faces=2)

    first = GalleryIndex(repo, store, snapshot_every=1)
    report = await first.load()
    assert report.full_load and report.faces == 26
    written = await first.write_snapshots()
    assert sorted(written) == [store.key(c1.id, first.seq), store.key(c2.id, first.seq)]
    assert first.snapshot_due() == []

    # After the snapshot: adds, a face removed, a subject removed, a new collection.
    c3 = await repo.ensure_collection("c3", "other", 4)
    await _enrol(repo, c3, rng, subjects=2, faces=2)
    await _enrol(repo, c1, rng, subjects=2, faces=2)
    sub, face = f1[0]
    await repo.delete_face(c1, sub, face)
    await repo.delete_subject(c1, f1[5][0])
    c4 = await repo.ensure_collection("c4", "test", DIM)  # exists, never gets a face

    restored = GalleryIndex(repo, store)
    report = await restored.load()
    assert report.from_snapshot == {c1.id: first.seq, c2.id: first.seq}
    assert sorted(report.from_postgres) == [c3.id, c4.id] and not report.full_load
    full = GalleryIndex(repo, None)
    await full.load()
    dims = {c1.id: DIM, c2.id: DIM, c3.id: 4}
    _assert_same(restored, full, dims)
    assert face not in restored.subject_of

    # Following the log after a snapshot load stays in step too.
    await _enrol(repo, c2, rng, subjects=1, faces=2)
    await restored.sync()
    await full.sync()
    _assert_same(restored, full, dims)


async def test_bad_snapshots_fall_back(repo: GalleryRepository, store: SnapshotStore) -> None:
    rng = np.random.default_rng(2)
    col = await repo.ensure_collection("c", "test", DIM)
    await _enrol(repo, col, rng, subjects=3, faces=2)
    writer = GalleryIndex(repo, store, snapshot_every=1)
    await writer.load()
    await writer.write_snapshots()
    older = writer.seq
    await _enrol(repo, col, rng, subjects=1, faces=2)
    await writer.sync()
    assert writer.snapshot_due() == [col.id]
    await writer.write_snapshots()
    newer = writer.seq
    assert store.list_seqs(col.id) == [newer, older]

    # Corrupt newest: the older one is used and the log replayed from it.
    key = store.key(col.id, newer)
    blob = bytearray(store.objects.get(key))
    blob[len(blob) // 2] ^= 0x55
    store.objects.put(key, bytes(blob))
    full = GalleryIndex(repo, None)
    await full.load()
    g = GalleryIndex(repo, store)
    report = await g.load()
    assert report.from_snapshot == {col.id: older} and report.replayed >= 2
    _assert_same(g, full, {col.id: DIM})

    # Both unusable (older one "from another database": its log entry differs) -> Postgres.
    old = store.read(col.id, older)
    old.anchor = (col.id, "add", 999999, str(uuid.uuid4()))
    store.write(old)
    g = GalleryIndex(repo, store)
    report = await g.load()
    assert report.from_snapshot == {} and report.from_postgres == [col.id]
    _assert_same(g, full, {col.id: DIM})

    # A snapshot ahead of the log (a restored database) is ignored as well.
    ahead = store.read(col.id, older)
    ahead.seq = full.seq + 100
    store.write(ahead)
    report = await GalleryIndex(repo, store).load()
    assert report.from_snapshot == {}


class _BrokenStore(ObjectStore):
    def put(self, key: str, data: bytes) -> None:
        raise OSError("storage is down")


async def test_snapshot_write_failure_is_retried_later(repo: GalleryRepository, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    col = await repo.ensure_collection("c", "test", DIM)
    await _enrol(repo, col, rng, subjects=2, faces=1)
    g = GalleryIndex(repo, SnapshotStore(_BrokenStore(f"file://{tmp_path}/o")), snapshot_every=1, retry_s=60)
    await g.load()
    assert await g.write_snapshots() == []
    assert g.snapshot_due() == []  # backing off
    assert len(g.search(col.id, np.stack([_vec(rng)]), 1)[0]) == 1  # still serving
    assert g.pending[col.id] == 2


async def test_load_time_snapshot_vs_postgres(repo: GalleryRepository, store: SnapshotStore) -> None:
    """Not an assertion on time: prints the figures (run with -s)."""
    rng = np.random.default_rng(4)
    col = await repo.ensure_collection("sface", "sface", 128)
    n_subjects, per = 1000, 3
    await _enrol(repo, col, rng, subjects=n_subjects, faces=per)
    t = time.perf_counter()
    full = GalleryIndex(repo, store, snapshot_every=1)
    await full.load()
    t_full = time.perf_counter() - t
    await full.write_snapshots()
    t = time.perf_counter()
    snap = GalleryIndex(repo, store)
    report = await snap.load()
    t_snap = time.perf_counter() - t
    assert report.from_snapshot == {col.id: full.seq}
    _assert_same(snap, full, {col.id: 128})
    print(f"\n{n_subjects * per} faces x 128-d: load_all {t_full:.3f}s, snapshot {t_snap:.3f}s")


async def test_rebuild_by_size_then_snapshot_keeps_the_kind(repo: GalleryRepository, store: SnapshotStore) -> None:
    from index.policy import IndexPolicy

    rng = np.random.default_rng(5)
    big = await repo.ensure_collection("big", "test", DIM)
    small = await repo.ensure_collection("small", "test", DIM)
    await _enrol(repo, big, rng, subjects=40, faces=3)
    await _enrol(repo, small, rng, subjects=5, faces=1)
    policy = IndexPolicy(exact_max=60, calibration_queries=50)
    g = GalleryIndex(repo, store, snapshot_every=1000, policy=policy)
    await g.load()
    exact = GalleryIndex(repo, None)
    await exact.load()
    assert g.rebuild_due() == [big.id]
    reports = await g.rebuild_indexes()
    assert list(reports) == [big.id] and reports[big.id].kind == "ivf"
    assert g.indexes[big.id].kind == "ivf" and g.indexes[small.id].kind == "flat"
    assert g.rebuild_due() == []
    # Changes after the swap land in the new index; removed faces never come back.
    await _enrol(repo, big, rng, subjects=2, faces=2)
    gone = next(iter(g.subject_of))
    subject = g.subject_of[gone]
    await repo.delete_subject(big, subject)
    await g.sync()
    await exact.sync()
    _assert_same(g, exact, {big.id: DIM, small.id: DIM})
    assert subject not in set(g.subject_of.values())
    # The rebuilt kind is due for a snapshot, and a restart restores it.
    assert big.id in g.snapshot_due()
    await g.write_snapshots()
    again = GalleryIndex(repo, store, policy=policy)
    report = await again.load()
    assert big.id in report.from_snapshot and again.indexes[big.id].kind == "ivf"
    _assert_same(again, exact, {big.id: DIM, small.id: DIM})
