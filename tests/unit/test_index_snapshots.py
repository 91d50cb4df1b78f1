"""Collection snapshots over a local file:// ObjectStore (no Ray, no servers)."""
from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from index.collection_index import CollectionIndex
from index.framing import IndexCorrupt
from serve_app.gallery.index_snapshots import (
    CollectionSnapshot,
    SnapshotStore,
    decode,
    encode,
)
from serve_app.gallery.objects import ObjectStore

DIM = 16


def _snapshot(seq: int, n: int = 50, cid: int = 7, seed: int = 0) -> CollectionSnapshot:
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(100, 100 + n, dtype=np.int64)
    index = CollectionIndex(dim=DIM)
    index.add(ids, vecs)
    subjects = [uuid.UUID(bytes=rng.bytes(16)) for _ in range(5)]
    subject_of = {int(i): subjects[j % 5] for j, i in enumerate(ids)}
    anchor = (cid, "add", int(ids[-1]), str(subject_of[int(ids[-1])])) if seq else None
    return CollectionSnapshot(cid, seq, index, subject_of, anchor)


@pytest.fixture()
def store(tmp_path: Path) -> SnapshotStore:
    return SnapshotStore(ObjectStore(f"file://{tmp_path}/objects"))


def _same(a: CollectionSnapshot, b: CollectionSnapshot) -> None:
    assert (a.collection_id, a.seq, a.anchor) == (b.collection_id, b.seq, b.anchor)
    assert a.subject_of == b.subject_of
    q = np.random.default_rng(9).standard_normal((4, DIM)).astype(np.float32)
    for x, y in zip(a.index.search(q, 10), b.index.search(q, 10)):
        np.testing.assert_array_equal(x, y)


def test_round_trip(store: SnapshotStore) -> None:
    snap = _snapshot(seq=42)
    key = store.write(snap)
    assert key == "index-snapshots/7/00000000000000000042.snap"
    assert store.list_all() == {7: [42]}
    back = store.read(7, 42)
    _same(snap, back)
    # Subjects are shared objects, not one UUID per face.
    assert len({id(s) for s in back.subject_of.values()}) == 5


def test_empty_collection_at_seq_zero(store: SnapshotStore) -> None:
    snap = CollectionSnapshot(3, 0, CollectionIndex(dim=DIM), {}, None)
    store.write(snap)
    back = store.load_newest(3)
    assert back is not None and len(back.index) == 0 and back.anchor is None


def test_newest_is_chosen_and_only_two_are_kept(store: SnapshotStore) -> None:
    for seq in (5, 9, 12):
        store.write(_snapshot(seq=seq, seed=seq))
    assert store.list_seqs(7) == [12, 9]
    got = store.load_newest(7)
    assert got is not None and got.seq == 12
    _same(got, _snapshot(seq=12, seed=12))


def test_corrupt_newest_falls_back_to_older(store: SnapshotStore) -> None:
    store.write(_snapshot(seq=5, seed=5))
    store.write(_snapshot(seq=9, seed=9))
    key = store.key(7, 9)
    blob = bytearray(store.objects.get(key))
    blob[-3] ^= 0xFF  # flip a byte in the body
    store.objects.put(key, bytes(blob))
    got = store.load_newest(7)
    assert got is not None and got.seq == 5


def test_half_written_snapshot_is_ignored(store: SnapshotStore) -> None:
    store.write(_snapshot(seq=5, seed=5))
    blob = encode(7, 9, None, _snapshot(seq=9).index, _snapshot(seq=9).subject_of)
    # A torn write at the final name (a crash on a store without atomic puts)...
    store.objects.put(store.key(7, 9), blob[: len(blob) // 2])
    # ...and a temp file of a write in progress, which is not listed at all.
    store.objects.put(store.key(7, 11) + ".tmp-abc123", blob)
    assert store.list_seqs(7) == [9, 5]
    got = store.load_newest(7)
    assert got is not None and got.seq == 5


def test_foreign_or_misplaced_blobs_are_refused(store: SnapshotStore) -> None:
    snap = _snapshot(seq=9)
    blob = encode(snap.collection_id, snap.seq, snap.anchor, snap.index, snap.subject_of)
    with pytest.raises(IndexCorrupt):
        decode(blob, collection_id=8)  # another collection's snapshot under this name
    with pytest.raises(IndexCorrupt):
        decode(blob, seq=10)
    with pytest.raises(IndexCorrupt):
        decode(snap.index.snapshot(9))  # a bare index snapshot: no mapping
    with pytest.raises(IndexCorrupt):
        decode(b"")
    # accept() can reject a whole snapshot (e.g. anchor not in this database's log).
    store.write(snap)
    assert store.load_newest(7, accept=lambda s: "foreign") is None


def test_prune_removes_stale_temp_files(store: SnapshotStore) -> None:
    store.objects.put(store.key(7, 1) + ".tmp-dead", b"x")
    for seq in (5, 9, 12):
        store.write(_snapshot(seq=seq))
    assert store.objects.list_keys("index-snapshots/7") == [
        "index-snapshots/7/00000000000000000009.snap",
        "index-snapshots/7/00000000000000000012.snap",
    ]


def test_put_atomic_leaves_no_temp_file(tmp_path: Path) -> None:
    objects = ObjectStore(f"file://{tmp_path}")
    objects.put_atomic("a/b.bin", b"one")
    objects.put_atomic("a/b.bin", b"two")
    assert objects.get("a/b.bin") == b"two"
    assert objects.list_keys("a") == ["a/b.bin"]


def test_signed_snapshots_refuse_unsigned_and_forged_ones(tmp_path: Path) -> None:
    """With a snapshot key, only snapshots signed with it load: whoever can
    write the bucket cannot inject identities by writing a valid-looking blob."""
    import json

    key = b"k" * 32
    snap = _snapshot(5)
    signed = encode(snap.collection_id, snap.seq, snap.anchor, snap.index, snap.subject_of, key)
    _same(decode(signed, signing_key=key), snap)
    unsigned = encode(snap.collection_id, snap.seq, snap.anchor, snap.index, snap.subject_of)
    with pytest.raises(IndexCorrupt, match="not signed"):
        decode(unsigned, signing_key=key)
    with pytest.raises(IndexCorrupt, match="not signed"):
        decode(encode(snap.collection_id, snap.seq, snap.anchor, snap.index, snap.subject_of, b"x" * 32),
               signing_key=key)
    # a forger who rewrites an unsigned stream's header to claim it is signed
    # cannot produce the HMACs its frames then need
    unsigned_v = bytearray(unsigned)
    at = unsigned_v.index(b'"signed": false')
    unsigned_v[at : at + 15] = b'"signed":  true'
    with pytest.raises(IndexCorrupt):
        decode(bytes(unsigned_v), signing_key=key)
    # format 1 (one blob, HMAC in its header): still read, still checked
    from index import framing
    from serve_app.gallery import index_snapshots as S

    other = _snapshot(5, seed=3)
    forged = S.encode_v1(other.collection_id, other.seq, other.anchor, other.index, other.subject_of)
    signed_v1 = S.encode_v1(snap.collection_id, snap.seq, snap.anchor, snap.index, snap.subject_of, key)
    _same(decode(signed_v1, signing_key=key), snap)
    header, body = framing.unpack(forged, magic=S._MAGIC, version=S.FORMAT_V1, what="x")
    header["hmac"] = framing.unpack(signed_v1, magic=S._MAGIC, version=S.FORMAT_V1, what="x")[0]["hmac"]
    with pytest.raises(IndexCorrupt):
        decode(framing.pack(S._MAGIC, S.FORMAT_V1, header, bytes(body)), signing_key=key)
    # the store signs what it writes and falls back past what it cannot verify
    store = SnapshotStore(ObjectStore(f"file://{tmp_path}/objects"), signing_key=key)
    store.write(snap)
    _same(store.read(snap.collection_id, snap.seq), snap)
    store.objects.put(store.key(snap.collection_id, 9), unsigned)
    with pytest.raises(IndexCorrupt):
        store.read(snap.collection_id, 9)
