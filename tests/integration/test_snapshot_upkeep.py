"""Snapshot upkeep on the real Postgres (no Ray): an erasure makes the matcher
rewrite the collection's snapshot at once and drop every older one, a quiet
collection's snapshot is rewritten once it is far behind the log (bounded
replay), and the change log is pruned below what every newest snapshot needs
without any replica ever applying a log with a hole in it."""
from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import numpy as np
import pytest

from serve_app.gallery.gallery_index import GalleryIndex, LogPruned
from serve_app.gallery.index_snapshots import SnapshotStore, decode
from serve_app.gallery.objects import ObjectStore
from serve_app.gallery.repository import Collection, GalleryRepository

DIM = 8


@pytest.fixture()
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(ObjectStore(f"file://{tmp_path}/objects"))


async def _enrol(repo: GalleryRepository, col: Collection, rng: np.random.Generator, faces: int) -> uuid.UUID:
    sub = await repo.create_subject(col, f"s{uuid.uuid4().hex[:8]}")
    for _ in range(faces):
        v = rng.standard_normal(DIM).astype(np.float32)
        await repo.add_face(col, sub.id, embedding=v / np.linalg.norm(v), model=col.embedder, image_sha256="0" * 64,
                            crop_key=None, box={"x1": 0}, det_score=0.9)
    return sub.id


def _state(g: GalleryIndex) -> tuple[int, dict[int, uuid.UUID], dict[int, list[int]]]:
    return g.seq, dict(g.subject_of), {c: sorted(ix.ids().tolist()) for c, ix in g.indexes.items() if len(ix)}


async def test_an_erasure_rewrites_the_snapshot_and_drops_older_ones(repo: GalleryRepository,
                                                                   store: SnapshotStore) -> None:
    rng = np.random.default_rng(1)
    col = await repo.ensure_collection("c", "test", DIM)
    gone = await _enrol(repo, col, rng, 3)
    await _enrol(repo, col, rng, 2)
    writer = GalleryIndex(repo, store, snapshot_every=1)
    await writer.load()
    await writer.write_snapshots()
    await _enrol(repo, col, rng, 1)
    await writer.sync()
    await writer.write_snapshots()
    assert len(store.list_seqs(col.id)) == 2  # keep 2
    writer.snapshot_every = 1000  # from here on only the erasure makes a snapshot due

    lagging = GalleryIndex(repo, store, snapshot_every=1000)
    await lagging.load()
    removed = await repo.delete_subject(col, gone)
    # A replica that has not applied the erasure writes no snapshot below it.
    lagging.erased[col.id] = lagging.seq + 1  # as if a removal were due; its seq is below the floor
    lagging.snapshot_seq[col.id] = 0
    assert await lagging._write_one(col.id) is None and max(store.list_seqs(col.id)) < removed.seq

    await writer.sync()
    assert writer.snapshot_due() == [col.id]
    written = await writer.write_snapshots()
    assert written == [store.key(col.id, writer.seq)] and store.list_seqs(col.id) == [writer.seq]
    snap = decode(store.objects.get(written[0]))
    assert gone not in snap.subject_of.values() and writer.snapshot_due() == []
    assert writer.seq >= removed.seq


async def test_bounded_replay_and_log_pruning(repo: GalleryRepository, store: SnapshotStore) -> None:
    rng = np.random.default_rng(2)
    busy = await repo.ensure_collection("busy", "test", DIM)
    quiet = await repo.ensure_collection("quiet", "test", DIM)
    await _enrol(repo, busy, rng, 2)
    await _enrol(repo, quiet, rng, 2)
    writer = GalleryIndex(repo, store, snapshot_every=1)
    await writer.load()
    await writer.write_snapshots()
    early = GalleryIndex(repo, None)  # a replica left behind (it stops following here)
    await early.load()
    first = writer.seq

    writer.snapshot_every, writer.snapshot_max_behind = 1000, 10
    for _ in range(4):
        await _enrol(repo, busy, rng, 3)
    await writer.sync()
    # Neither collection has 1000 changes, but both snapshots are over 10 entries behind.
    assert sorted(writer.snapshot_due()) == sorted([busy.id, quiet.id])
    await writer.write_snapshots()
    assert store.list_seqs(quiet.id)[0] == writer.seq > first + 10

    await asyncio.sleep(0.3)
    pruned = await writer.prune_log(retention_s=0.1)
    assert pruned > 0 and await repo.log_pruned_through() == writer.seq - 1
    assert set(await repo.log_entries([writer.seq])) == {writer.seq}  # the snapshots' anchor stays

    full = GalleryIndex(repo, None)
    await full.load()
    restored = GalleryIndex(repo, store)
    report = await restored.load()
    assert report.from_snapshot == {busy.id: writer.seq, quiet.id: writer.seq}
    assert _state(restored) == _state(full)

    # The replica left behind finds its position pruned and reloads instead of applying a holed log.
    await early.sync()
    assert early.reloads == 1 and _state(early) == _state(full)

    # A replay that read across a prune it did not see coming (its anchor check ran first) notices too.
    racer = GalleryIndex(repo, None)
    await racer.load()
    racer.seq = first  # as if it had applied up to here, then read on after the prune
    with pytest.raises(LogPruned):
        await racer._catch_up()

    async def unchanged() -> None:
        return None

    racer._log_changed = unchanged  # type: ignore[method-assign]
    racer.seq = first
    await racer.sync()
    assert racer.reloads == 1 and _state(racer) == _state(full)
    # Snapshots below the pruned log are no use: a load falls back to Postgres for them.
    for seq in store.list_seqs(busy.id):
        store.objects.delete(store.key(busy.id, seq))
    store.objects.put(store.key(busy.id, first), b"not really")
    again = GalleryIndex(repo, store)
    report = await again.load()
    assert busy.id in report.from_postgres and _state(again) == _state(full)
