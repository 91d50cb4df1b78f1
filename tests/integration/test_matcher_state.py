"""The matcher's state (snapshots + log replay, index rebuilds, following the
log, staleness, rewound logs) against real Postgres, without Ray."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg

import numpy as np
import pytest

from serve_app.errors import InvalidRequest, ServiceUnavailable
from serve_app.gallery.gallery_index import GalleryIndex, LogFollower, StaleIndex
from serve_app.gallery.index_snapshots import SnapshotStore
from serve_app.gallery.objects import ObjectStore
from serve_app.gallery.repository import Collection, GalleryRepository, create_pool
from tests.pgtools import acreate_database, admin, adrop_database, dsn_for

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

    def open_write_atomic(self, key: str, block_size: int = 8 << 20):  # type: ignore[override]
        raise OSError("storage is down")  # snapshots are streamed through this


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



# ------------------------------------------------------------------ freshness
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _wait_for(cond, timeout: float = 20.0) -> bool:
    """Poll cond() until true; False after timeout (a failure bound, not a speed check)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.05)
    return cond()


async def test_notify_wakes_the_follower_long_before_its_poll(repo: GalleryRepository) -> None:
    rng = np.random.default_rng(6)
    col = await repo.ensure_collection("c", "test", DIM)
    g = GalleryIndex(repo, None)
    await g.load()

    async def connect() -> asyncpg.Connection:
        return await repo.pool.acquire()  # a connection of its own for LISTEN

    # Polling once an hour: only a NOTIFY can bring the change within the test.
    follower = LogFollower(g, interval_s=3600, listen_connect=connect)
    await follower._ensure_listening()
    assert follower.listening
    follower._wake.clear()
    task = asyncio.create_task(follower.run())
    try:
        (sub, face), = await _enrol(repo, col, rng, subjects=1, faces=1)
        assert await _wait_for(lambda: face in g.subject_of)
        assert follower.notifications >= 1 and g.lag().seq_behind == 0
        await repo.delete_face(col, sub, face)
        assert await _wait_for(lambda: face not in g.subject_of)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_polling_carries_on_without_a_listener(repo: GalleryRepository) -> None:
    rng = np.random.default_rng(7)
    col = await repo.ensure_collection("c", "test", DIM)
    g = GalleryIndex(repo, None)
    await g.load()

    async def refuse() -> asyncpg.Connection:
        raise OSError("listener connection refused")

    follower = LogFollower(g, interval_s=0.05, listen_connect=refuse)
    (_, face), = await _enrol(repo, col, rng, subjects=1, faces=1)
    assert await follower.step()
    assert not follower.listening and follower.notifications == 0
    assert face in g.subject_of


@pytest.fixture()
async def cut_off() -> AsyncIterator[tuple[GalleryRepository, GalleryRepository, str]]:
    """(writer repo, matcher repo, matcher role): the matcher logs in as a role
    of its own, so it alone can be cut off from Postgres."""
    name, dsn = await acreate_database("faceserve_cut")
    role = f"matcher_{uuid.uuid4().hex[:8]}"
    await admin(f'CREATE ROLE "{role}" LOGIN SUPERUSER')
    writer = await create_pool(dsn, min_size=1, max_size=4)
    base, _, _ = dsn.partition("@")
    matcher_dsn = dsn.replace(base, f"postgresql://{role}", 1)
    reader = await create_pool(matcher_dsn, min_size=1, max_size=2)
    try:
        yield GalleryRepository(writer), GalleryRepository(reader), role
    finally:
        reader.terminate()
        await writer.close()
        await adrop_database(name)
        await admin(f'DROP ROLE IF EXISTS "{role}"')


async def test_cut_off_replica_turns_stale_then_recovers(
    cut_off: tuple[GalleryRepository, GalleryRepository, str],
) -> None:
    writer, reader, role = cut_off
    rng = np.random.default_rng(8)
    col = await writer.ensure_collection("c", "test", DIM)
    await _enrol(writer, col, rng, subjects=2, faces=1)
    clock = FakeClock()
    g = GalleryIndex(reader, None)
    g.clock = clock
    await g.load()
    g.check_fresh(30)
    assert g.lag().seq_behind == 0 and g.lag().sync_age_s == 0

    # Cut the matcher's role off: no new logins, its sessions killed.
    await admin(f'ALTER ROLE "{role}" NOLOGIN')
    await admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
    added = await _enrol(writer, col, rng, subjects=1, faces=2)
    follower = LogFollower(g, interval_s=0.01)
    clock.now += 45
    assert not await follower.step()
    assert follower.sync_errors == 1
    assert g.lag().sync_age_s == 45
    with pytest.raises(StaleIndex, match="45"):
        g.check_fresh(30)
    g.observe_seq(await writer.latest_seq())  # e.g. a NOTIFY seen before the cut
    assert g.lag().seq_behind == 2
    assert all(face not in g.subject_of for _, face in added)

    # read-your-writes cannot be served while cut off: 503, never a stale answer
    with pytest.raises(ServiceUnavailable):
        await g.reach(await writer.latest_seq(), timeout_s=5)

    await admin(f'ALTER ROLE "{role}" LOGIN')
    assert await follower.step()
    g.check_fresh(30)
    assert g.lag() .seq_behind == 0 and g.lag().sync_age_s == 0
    assert all(face in g.subject_of for _, face in added)


async def _truncate_log(repo: GalleryRepository, keep_seq: int) -> None:
    """What a failover to a lagging replica or a point-in-time restore does:
    the log (and the faces it added) end at keep_seq, and the sequences
    hand out the lost numbers again."""
    async with repo.pool.acquire() as conn, conn.transaction():
        lost = await conn.fetch("SELECT face_id FROM changes WHERE seq > $1 AND op = 'add'", keep_seq)
        await conn.execute("DELETE FROM faces WHERE id = ANY($1::bigint[])", [r["face_id"] for r in lost])
        await conn.execute("DELETE FROM changes WHERE seq > $1", keep_seq)
        await conn.execute("SELECT setval('changes_seq_seq', $1)", keep_seq)
        top = await conn.fetchval("SELECT coalesce(max(id), 0) FROM faces")
        if top:
            await conn.execute("SELECT setval('faces_id_seq', $1)", top)


async def test_rewound_log_is_detected_and_reloaded(repo: GalleryRepository, store: SnapshotStore) -> None:
    rng = np.random.default_rng(9)
    col = await repo.ensure_collection("c", "test", DIM)
    await _enrol(repo, col, rng, subjects=3, faces=1)
    keep = await repo.latest_seq()
    lost = await _enrol(repo, col, rng, subjects=2, faces=1)
    g = GalleryIndex(repo, store, snapshot_every=1)
    await g.load()
    await g.write_snapshots()  # a snapshot from the log that is about to be lost
    assert g.seq == keep + 2

    await _truncate_log(repo, keep)
    assert await repo.latest_seq() < g.seq
    await g.sync()
    assert g.reloads == 1 and g.seq == keep
    full = GalleryIndex(repo, None)
    await full.load()
    _assert_same(g, full, {col.id: DIM})
    assert all(face not in g.subject_of for _, face in lost)

    # Rewritten: the log is cut back again and then grows past the seq this
    # replica holds with other entries, so only the entry at its seq tells.
    held = g.seq
    await _truncate_log(repo, held - 1)
    await _enrol(repo, col, rng, subjects=3, faces=1)
    assert await repo.latest_seq() > held
    await g.sync()
    assert g.reloads == 2
    full = GalleryIndex(repo, None)
    await full.load()
    _assert_same(g, full, {col.id: DIM})
    # An unchanged log never reloads.
    await g.sync()
    assert g.reloads == 2


async def test_min_seq_is_reached_or_refused(repo: GalleryRepository) -> None:
    rng = np.random.default_rng(10)
    col = await repo.ensure_collection("c", "test", DIM)
    g = GalleryIndex(repo, None)
    await g.load()
    (_, face), = await _enrol(repo, col, rng, subjects=1, faces=1)
    latest = await repo.latest_seq()
    assert face not in g.subject_of
    assert await g.reach(latest, timeout_s=10) == latest  # read-your-writes
    assert face in g.subject_of
    with pytest.raises(InvalidRequest, match="beyond"):
        await g.reach(latest + 1, timeout_s=10)  # a seq no write has reached
    assert g.seq == latest


# ------------------------------------------------ what identify answers with
async def test_names_and_feedback_follow_the_log(repo: GalleryRepository, store: SnapshotStore) -> None:
    """The matcher answers identify's names and "not this person" demotions
    from its own state: renames and feedback are change-log entries, and a
    restart (snapshot + replay) or a plain load comes back to the same."""
    rng = np.random.default_rng(11)
    col = await repo.ensure_collection("c", "test", DIM)
    (ada, ada_face), (bob, _) = await _enrol(repo, col, rng, subjects=2, faces=1)
    g = GalleryIndex(repo, store, snapshot_every=1)
    await g.load()
    await g.write_snapshots()
    (hit,), = [h[:1] for h in g.search(col.id, _probe_of(await repo.changes_since(0), ada_face), 1, 0.5)]
    name0 = (await repo.get_subject(col, ada)).name
    assert hit.subject_id == str(ada) and hit.name == name0 and not hit.demoted

    before = await repo.latest_seq()
    renamed, seq = await repo.rename_subject(col, ada, "Ada Lovelace")
    assert renamed.name == "Ada Lovelace" and seq == before + 1
    assert [c.op for c in await repo.changes_since(before)] == ["rename"]
    vec = _probe_of(await repo.changes_since(0), ada_face)
    made = await repo.add_feedback(col, ada, vec[0], model="test", source="image", actor="t")
    assert made["seq"] == seq + 1
    await g.sync()
    (hit,), = [h[:1] for h in g.search(col.id, vec, 1, 0.5)]
    assert hit.name == "Ada Lovelace" and hit.demoted
    (hit,), = [h[:1] for h in g.search(col.id, vec, 1, None)]
    assert not hit.demoted  # no margin asked: nothing is demoted

    # A restart from the snapshot (taken before both) replays them.
    again = GalleryIndex(repo, store)
    report = await again.load()
    assert report.from_snapshot == {col.id: g.snapshot_seq[col.id]}
    assert again.names == g.names and again.feedback.keys() == g.feedback.keys()
    assert again.search(col.id, vec, 2, 0.5) == g.search(col.id, vec, 2, 0.5)

    # Feedback withdrawn, then the subject erased: nothing of it stays.
    assert await repo.delete_feedback(col, made["id"]) > made["seq"]
    await g.sync()
    assert ada not in g.feedback and not g.search(col.id, vec, 1, 0.5)[0][0].demoted
    await repo.add_feedback(col, ada, vec[0], model="test", source="image", actor="t")
    await repo.delete_subject(col, ada)
    await g.sync()
    assert ada not in g.names and ada not in g.feedback and bob in g.names
    assert str(ada) not in {h.subject_id for h in g.search(col.id, vec, 5, 0.5)[0]}


def _probe_of(changes: list, face_id: int) -> np.ndarray:
    return np.stack([next(c.embedding for c in changes if c.op == "add" and c.face_id == face_id)])


# ------------------------------------------------------- two Matcher replicas
# The Matcher deployment's own class (search, check_health, the lag gauges),
# two instances in this process against the real Postgres: the cut-off one
# logs in as a role of its own. Serve itself is not needed to show what a
# replica does; what Serve does with an unhealthy one is its own business.
class RecordingGauge:
    def __init__(self) -> None:
        self.values: list[float] = []

    def set(self, value: float, *_: object, **__: object) -> None:
        self.values.append(float(value))


async def _matcher(dsn: str, objects_url: str) -> Any:
    from serve_app.deployments.matcher import Matcher
    from serve_app.settings import Settings

    cls = Matcher.func_or_class
    m = cls.__new__(cls)
    await cls.__init__(m, Settings(database_url=dsn, object_store_url=objects_url, metrics_enabled=False))
    m.reconfigure({"sync_interval_s": 0.1, "max_staleness_s": 2.0, "min_seq_timeout_s": 5.0, "snapshot_every": 0})
    m._metrics.matcher_seq_behind = RecordingGauge()
    m._metrics.matcher_sync_age = RecordingGauge()
    return m


async def _close(m: Any) -> None:
    for task in (m._follow_task, m._lag_task):
        task.cancel()
    await asyncio.gather(m._follow_task, m._lag_task, return_exceptions=True)
    m._executor.shutdown(wait=False)
    m._gallery.repo.pool.terminate()


@pytest.fixture()
async def replicas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Any, Any, Any, str]]:
    """(writer repo, replica A, replica B, A's role): A can be cut off alone."""
    import serve_app.deployments.matcher as matcher_module

    monkeypatch.setattr(matcher_module, "_LAG_REPORT_S", 0.1)
    name, dsn = await acreate_database("faceserve_two")
    role = f"matcher_{uuid.uuid4().hex[:8]}"
    await admin(f'CREATE ROLE "{role}" LOGIN SUPERUSER')
    writer = GalleryRepository(await create_pool(dsn, min_size=1, max_size=4))
    base, _, _ = dsn.partition("@")
    made = []
    try:
        made.append(await _matcher(dsn.replace(base, f"postgresql://{role}", 1), f"file://{tmp_path}/objects"))
        made.append(await _matcher(dsn, f"file://{tmp_path}/objects"))
        yield writer, made[0], made[1], role
    finally:
        for m in made:
            await _close(m)
        await writer.pool.close()
        await adrop_database(name)
        await admin(f'DROP ROLE IF EXISTS "{role}"')


def _emb(vec: np.ndarray) -> Any:
    from serve_app.messages import EmbeddingResult

    return EmbeddingResult("test", len(vec), vec[None, :].astype(np.float32))


async def test_two_replicas_find_an_enrolment_once_its_seq_is_reached(replicas: tuple) -> None:
    writer, a, b, _ = replicas
    rng = np.random.default_rng(12)
    col = await writer.ensure_collection("c", "test", DIM)
    sub = await writer.create_subject(col, "ada")
    vec = _vec(rng)
    face, seq = await writer.add_face(col, sub.id, embedding=vec, model="test", image_sha256="1" * 64,
                                      crop_key=None, box={"x1": 0, "y1": 0, "x2": 1, "y2": 1}, det_score=0.9)
    for m in (a, b):
        res = await m.search(_emb(vec), col.id, 1, min_seq=seq)
        assert res.seq >= seq
        (hit,) = res.hits[0]
        assert (hit.face_id, hit.subject_id, hit.name) == (face.id, str(sub.id), "ada")
    _, renamed = await writer.rename_subject(col, sub.id, "Ada L.")
    for m in (a, b):  # names follow the log on every replica
        assert (await m.search(_emb(vec), col.id, 1, min_seq=renamed)).hits[0][0].name == "Ada L."
    for m in (a, b):  # a seq no write has reached is the caller's error (400), on every replica
        with pytest.raises(InvalidRequest, match="beyond"):
            await m.search(_emb(vec), col.id, 1, min_seq=renamed + 1)
    for m in (a, b):
        m.check_health()


async def test_a_replica_cut_off_turns_unhealthy_and_its_lag_gauge_shows_it(replicas: tuple) -> None:
    writer, a, b, role = replicas
    rng = np.random.default_rng(13)
    col = await writer.ensure_collection("c", "test", DIM)
    await _enrol(writer, col, rng, subjects=2, faces=1)
    await admin(f'ALTER ROLE "{role}" NOLOGIN')
    await admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'")
    (_, face), = await _enrol(writer, col, rng, subjects=1, faces=1)
    latest = await writer.latest_seq()

    def a_unhealthy() -> bool:
        try:
            a.check_health()
        except StaleIndex:
            return True
        return False

    assert await _wait_for(a_unhealthy)  # past max_staleness_s (2 s) with no good sync
    b.check_health()
    assert await _wait_for(lambda: face in b._gallery.subject_of)
    assert face not in a._gallery.subject_of  # A still answers, from what it holds
    assert await _wait_for(lambda: a._metrics.matcher_sync_age.values[-1] > 2.0)
    assert b._metrics.matcher_sync_age.values[-1] < 2.0
    assert a.stats()["sync_age_s"] > 2.0 and a._follower.sync_errors > 0
    with pytest.raises(ServiceUnavailable):  # read-your-writes cannot be served cut off: 503, not stale
        await a.search(_emb(_vec(rng)), col.id, 1, min_seq=latest)

    await admin(f'ALTER ROLE "{role}" LOGIN')
    assert await _wait_for(lambda: not a_unhealthy() and face in a._gallery.subject_of)
    assert await _wait_for(lambda: a._metrics.matcher_sync_age.values[-1] < 2.0
                           and a._metrics.matcher_seq_behind.values[-1] == 0)


async def test_a_rewound_log_is_detected_and_reloaded_by_both_replicas(replicas: tuple) -> None:
    writer, a, b, _ = replicas
    rng = np.random.default_rng(14)
    col = await writer.ensure_collection("c", "test", DIM)
    await _enrol(writer, col, rng, subjects=3, faces=1)
    keep = await writer.latest_seq()
    lost = await _enrol(writer, col, rng, subjects=2, faces=1)
    for m in (a, b):
        await m.sync()
        assert all(face in m._gallery.subject_of for _, face in lost)

    await _truncate_log(writer, keep)  # a failover to a lagging replica / a point-in-time restore
    assert await _wait_for(lambda: a._gallery.reloads >= 1 and b._gallery.reloads >= 1)
    full = GalleryIndex(writer, None)
    await full.load()
    for m in (a, b):
        assert m.stats()["reloads"] >= 1
        _assert_same(m._gallery, full, {col.id: DIM})
        assert all(face not in m._gallery.subject_of for _, face in lost)
        m.check_health()
