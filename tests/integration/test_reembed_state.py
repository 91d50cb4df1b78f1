"""Re-embedding at the data layer, against real Postgres, without Ray:
ReembedRepository (stage, switch, abort) and the matcher's state
(GalleryIndex builds the new index aside and swaps it in at the switch).
The live job is tests/integration/test_reembed.py."""
from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import numpy as np
import pytest

from serve_app.errors import Conflict
from serve_app.gallery.gallery_index import GalleryIndex
from serve_app.gallery.index_snapshots import SnapshotStore
from serve_app.gallery.objects import ObjectStore
from serve_app.gallery.reembeds import ReembedRepository
from serve_app.gallery.repository import Collection, GalleryRepository

OLD_DIM, NEW_DIM = 8, 4


@pytest.fixture()
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(ObjectStore(f"file://{tmp_path}/objects"))


def _unit(seed: int, dim: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


def _new_vec(face_id: int) -> np.ndarray:
    """The "new model's" vector of a face (a function of the face, as a real re-embed is)."""
    return _unit(10_000 + face_id, NEW_DIM)


async def _face(repo: GalleryRepository, col: Collection, sid: uuid.UUID, seed: int) -> int:
    face, _ = await repo.add_face(col, sid, embedding=_unit(seed, OLD_DIM), model=col.embedder,
                                  image_sha256=f"{seed:064x}", crop_key=None,
                                  box={"x1": 0, "y1": 0, "x2": 1, "y2": 1}, det_score=0.9)
    return face.id


def _ids(index: GalleryIndex, cid: int, staging: bool = False) -> list[int]:
    ix = (index.staging if staging else index.indexes).get(cid)
    return sorted(ix.ids().tolist()) if ix is not None else []


def _top(index: GalleryIndex, cid: int, probe: np.ndarray) -> str:
    return index.search(cid, probe[None], 1)[0][0].subject_id


async def test_staging_is_built_aside_then_switched_whole(repo: GalleryRepository, store: SnapshotStore) -> None:
    reembeds = ReembedRepository(repo.pool)
    col = await repo.ensure_collection("c", "old", OLD_DIM)
    other = await repo.ensure_collection("other", "old", OLD_DIM)
    subjects = [(await repo.create_subject(col, f"s{i}")).id for i in range(4)]
    faces = {fid: sid for i, sid in enumerate(subjects) for fid in
             [await _face(repo, col, sid, 2 * i), await _face(repo, col, sid, 2 * i + 1)]}
    await _face(repo, other, (await repo.create_subject(other, "x")).id, 99)
    fb = await repo.add_feedback(col, subjects[0], _unit(7, OLD_DIM), model="old", source="image", actor="t")

    live = GalleryIndex(repo, store, snapshot_every=3)
    await live.load()
    staging = await reembeds.begin(col, "new", NEW_DIM)
    assert staging is not None and staging.from_model == "old"
    with pytest.raises(Conflict):
        await reembeds.begin(col, "newer", NEW_DIM)

    first = sorted(faces)[:5]
    staged, seq = await reembeds.stage(col, staging, {f: _new_vec(f) for f in first})
    assert staged == set(first) and seq > 0
    assert (await reembeds.stage(col, staging, {f: _new_vec(f) for f in first}))[0] == set()  # a rerun
    await live.sync()
    await live.write_snapshots()  # a snapshot of the old index, taken during the re-embed
    assert _ids(live, col.id, staging=True) == first
    assert _ids(live, col.id) == sorted(faces)
    # Searches still run on the old vectors, with the old model only.
    fid = sorted(faces)[6]
    assert _top(live, col.id, _unit(6, OLD_DIM)) == str(faces[fid])
    assert live.model_fits(col.id, "old") and not live.model_fits(col.id, "new")

    # Meanwhile: a staged face is erased, a face is enrolled with the old model.
    gone = first[0]
    await repo.delete_face(col, faces.pop(gone), gone)
    late = await _face(repo, col, subjects[3], 50)
    faces[late] = subjects[3]
    mid = GalleryIndex(repo, store)  # a replica started half-way
    await mid.load()
    await live.sync()
    assert _ids(live, col.id, staging=True) == _ids(mid, col.id, staging=True) == first[1:]

    # The switch refuses while a face has no new vector, and changes nothing.
    rest = [f for f in faces if f not in first]
    done = await reembeds.switch(col, staging)
    assert not done.complete and done.missing == len(rest)
    await reembeds.stage(col, staging, {f: _new_vec(f) for f in rest})
    assert await reembeds.pending(col) == []
    done = await reembeds.switch(col, staging)
    assert done.complete and done.faces == len(faces) and done.feedback_dropped == 1

    for replica in (live, mid):
        await replica.sync()
        assert _ids(replica, col.id) == sorted(faces) and col.id not in replica.staging
        assert replica.indexes[col.id].dim == NEW_DIM
        assert replica.model_fits(col.id, "new") and not replica.model_fits(col.id, "old")
        assert replica.model_fits(other.id, "old")
        assert _top(replica, col.id, _new_vec(late)) == str(subjects[3])
        assert subjects[0] not in replica.feedback  # the old model's probe is gone
    # Fresh replicas agree: the pre-switch snapshot is not restored.
    for fresh in (GalleryIndex(repo, store), GalleryIndex(repo, None)):
        report = await fresh.load()
        assert col.id not in report.from_snapshot
        assert _ids(fresh, col.id) == sorted(faces) and fresh.models[col.id] == "new"
        assert np.allclose(fresh.indexes[col.id].get_vectors(np.array([late])), _new_vec(late)[None])

    # A snapshot written after the switch is restored, with the new vectors.
    assert col.id in live.snapshot_due()
    await live.write_snapshots()
    restored = GalleryIndex(repo, store)
    report = await restored.load()
    assert report.from_snapshot.get(col.id, 0) >= done.seq
    assert _ids(restored, col.id) == sorted(faces) and restored.indexes[col.id].dim == NEW_DIM

    # Postgres holds the new vectors under the same face ids; a second run has nothing to do.
    new_col = await repo.get_collection("c")
    assert (new_col.embedder, new_col.dim) == ("new", NEW_DIM)
    models, vecs = await repo.subject_embeddings(new_col, subjects[3])
    assert set(models) == {"new"} and vecs.shape[1] == NEW_DIM
    assert await reembeds.begin(new_col, "new", NEW_DIM) is None
    assert await repo.list_feedback(new_col) == [] and fb["id"]

    # A writer still holding the collection as it was before the switch cannot
    # slip an old-model vector in: the database refuses it (retry).
    with pytest.raises(asyncpg.SerializationError):
        await _face(repo, col, subjects[1], 77)


async def test_abort_drops_the_staging(repo: GalleryRepository) -> None:
    reembeds = ReembedRepository(repo.pool)
    col = await repo.ensure_collection("c", "old", OLD_DIM)
    sid = (await repo.create_subject(col, "a")).id
    fids = [await _face(repo, col, sid, i) for i in range(3)]
    live = GalleryIndex(repo, None)
    await live.load()
    staging = await reembeds.begin(col, "new", NEW_DIM)
    await reembeds.stage(col, staging, {f: _new_vec(f) for f in fids[:2]})
    await live.sync()
    assert _ids(live, col.id, staging=True) == fids[:2]
    assert await reembeds.abort(col) > 0
    await live.sync()
    assert col.id not in live.staging and _ids(live, col.id) == fids
    with pytest.raises(Conflict):  # a job still running on the aborted staging stops
        await reembeds.stage(col, staging, {fids[2]: _new_vec(fids[2])})
    assert await reembeds.abort(col) == 0
    # Starting over stages from scratch.
    again = await reembeds.begin(col, "new", NEW_DIM)
    assert again is not None and len(await reembeds.pending(col)) == 3
