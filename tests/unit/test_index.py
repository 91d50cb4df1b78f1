"""Unit tests for index/: exact and IVF search, mutations, snapshots, sharding."""
from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from index import CollectionIndex, ShardedIndex
from index.framing import IndexCorrupt

InvalidRequest = ValueError  # index code raises ValueError for bad input

DIM = 32


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    # The build machines have 2 shared cores: keep FAISS's OpenMP to one.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit_vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered_vectors(rng: np.random.Generator, n: int, dim: int, centres: np.ndarray) -> np.ndarray:
    """Normalised points around a few centres: how face embeddings of many
    people (several photos each) are spread, unlike uniform noise."""
    labels = rng.integers(0, len(centres), n)
    x = (centres[labels] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(ids: np.ndarray, x: np.ndarray, q: np.ndarray, k: int):
    sims = q @ x.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), ids[order]


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def filled(rng):
    ids = rng.choice(10_000, size=500, replace=False).astype(np.int64)
    x = unit_vectors(rng, 500)
    index = CollectionIndex(DIM)
    index.add(ids, x)
    return index, ids, x


# --------------------------------------------------------------- exact search
def test_search_matches_brute_force(filled, rng):
    index, ids, x = filled
    q = unit_vectors(rng, 40)
    scores, found = index.search(q, 10)
    want_scores, want_ids = brute_force(ids, x, q, 10)
    assert scores.shape == found.shape == (40, 10)
    assert scores.dtype == np.float32 and found.dtype == np.int64
    np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
    # ids equal except where two scores tie within float error
    gaps = np.abs(np.diff(want_scores, axis=1)).min(axis=1)
    clear = gaps > 1e-5
    assert clear.sum() > 30
    np.testing.assert_array_equal(found[clear], want_ids[clear])


def test_scores_are_sorted_descending(filled, rng):
    index, _, _ = filled
    scores, _ = index.search(unit_vectors(rng, 5), 50)
    assert (np.diff(scores, axis=1) <= 1e-7).all()


def test_l2_metric_scores_are_negated_squared_distances(rng):
    x = rng.standard_normal((100, DIM)).astype(np.float32)
    ids = np.arange(100, dtype=np.int64)
    index = CollectionIndex(DIM, metric="l2")
    index.add(ids, x)
    q = rng.standard_normal((3, DIM)).astype(np.float32)
    scores, found = index.search(q, 5)
    d2 = ((q[:, None, :] - x[None]) ** 2).sum(-1)
    want = np.argsort(d2, axis=1)[:, :5]
    np.testing.assert_array_equal(found, want)
    np.testing.assert_allclose(scores, -np.take_along_axis(d2, want, axis=1), rtol=1e-4)


def test_empty_index_search_is_all_padding(rng):
    index = CollectionIndex(DIM)
    scores, found = index.search(unit_vectors(rng, 3), 4)
    assert found.shape == (3, 4) and (found == -1).all()
    assert np.isneginf(scores).all()
    assert len(index) == 0
    assert not index.contains(0)


def test_k_larger_than_n_pads_with_minus_one(rng):
    index = CollectionIndex(DIM)
    x = unit_vectors(rng, 3)
    index.add(np.array([7, 8, 9]), x)
    scores, found = index.search(x[:1], 6)
    assert found[0, 0] == 7
    assert sorted(found[0, :3]) == [7, 8, 9]
    assert (found[0, 3:] == -1).all()
    assert np.isfinite(scores[0, :3]).all() and np.isneginf(scores[0, 3:]).all()


def test_zero_queries(filled):
    index, _, _ = filled
    scores, found = index.search(np.empty((0, DIM), np.float32), 3)
    assert scores.shape == found.shape == (0, 3)


# ------------------------------------------------------------------ mutations
def test_remove_then_search_never_returns_removed(filled, rng):
    index, ids, x = filled
    gone = ids[::3]
    assert index.remove(gone) == len(gone)
    assert len(index) == len(ids) - len(gone)
    assert index.remove(gone) == 0  # already gone
    assert index.remove(np.array([10_001])) == 0  # never there
    # query with the removed vectors themselves: their own id would rank first
    _, found = index.search(x[::3], len(index))
    assert not np.isin(found, gone).any()
    for i in gone[:20]:
        assert not index.contains(int(i))
    assert index.contains(int(ids[1]))
    assert set(index.ids().tolist()) == set(ids.tolist()) - set(gone.tolist())


def test_readd_replaces_instead_of_duplicating(rng):
    index = CollectionIndex(DIM)
    x = unit_vectors(rng, 10)
    ids = np.arange(100, 110)
    index.add(ids, x)
    new = unit_vectors(rng, 1)
    index.add(np.array([105]), new)
    assert len(index) == 10
    np.testing.assert_allclose(index.get_vectors([105])[0], new[0])
    scores, found = index.search(new, 10)
    assert found[0, 0] == 105 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert list(found[0]).count(105) == 1
    # searching with the old vector scores 105 by its new vector
    scores_old, found_old = index.search(x[5:6], 10)
    (slot,) = np.flatnonzero(found_old[0] == 105)
    assert scores_old[0, slot] == pytest.approx(float(x[5] @ new[0]), abs=1e-5)


def test_add_validation(rng):
    index = CollectionIndex(DIM)
    with pytest.raises(InvalidRequest, match="shape"):
        index.add(np.arange(2), unit_vectors(rng, 2, DIM + 1))
    with pytest.raises(InvalidRequest, match="shape"):
        index.add(np.arange(1), unit_vectors(rng, 1)[0])  # 1-D
    with pytest.raises(InvalidRequest, match="ids"):
        index.add(np.arange(3), unit_vectors(rng, 2))
    with pytest.raises(InvalidRequest, match="unique"):
        index.add(np.array([1, 1]), unit_vectors(rng, 2))
    with pytest.raises(InvalidRequest, match="non-negative"):
        index.add(np.array([-1]), unit_vectors(rng, 1))
    with pytest.raises(InvalidRequest, match="integers"):
        index.add(np.array([1.5]), unit_vectors(rng, 1))
    with pytest.raises(InvalidRequest, match="floating"):
        index.add(np.array([1]), np.ones((1, DIM), dtype=np.int32))
    bad = unit_vectors(rng, 1)
    bad[0, 0] = np.nan
    with pytest.raises(InvalidRequest, match="NaN"):
        index.add(np.array([1]), bad)
    with pytest.raises(InvalidRequest):
        index.search(unit_vectors(rng, 1), 0)
    with pytest.raises(InvalidRequest):
        CollectionIndex(0)
    with pytest.raises(InvalidRequest):
        CollectionIndex(DIM, kind="hnsw")
    assert len(index) == 0
    # float64 input is accepted and converted
    index.add(np.array([3]), unit_vectors(rng, 1).astype(np.float64))
    assert index.contains(3)


def test_concurrent_search_and_mutation(rng):
    index = CollectionIndex(DIM)
    x = unit_vectors(rng, 400)
    index.add(np.arange(200), x[:200])
    errors: list[BaseException] = []

    def searcher():
        try:
            for _ in range(50):
                s, f = index.search(x[:4], 5)
                assert (f[:, 0] >= 0).all()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    for i in range(200, 400, 10):
        index.add(np.arange(i, i + 10), x[i : i + 10])
        index.remove(np.arange(i - 200, i - 195))
    for t in threads:
        t.join()
    assert not errors
    assert len(index) == 400 - 100


# ----------------------------------------------------------- snapshot/restore
@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfsq8"])
def test_snapshot_restore_round_trip(kind, rng):
    centres = rng.standard_normal((20, DIM))
    x = clustered_vectors(rng, 1200, DIM, centres)
    ids = np.arange(1200, dtype=np.int64) * 3
    index = CollectionIndex(DIM, kind=kind, nlist=16, nprobe=4)
    index.train(x)
    index.add(ids, x)
    index.remove(ids[:100])
    q = clustered_vectors(rng, 25, DIM, centres)
    before = index.search(q, 7)

    blob = index.snapshot(seq=4242)
    assert CollectionIndex.read_snapshot_header(blob)["seq"] == 4242
    restored, seq = CollectionIndex.restore(blob)
    assert seq == 4242
    assert (restored.kind, restored.metric, restored.dim, len(restored)) == (kind, "ip", DIM, 1100)
    assert restored.nprobe == 4
    after = restored.search(q, 7)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    # the restored index keeps working: remove and re-add behave
    assert restored.remove(ids[100:110]) == 10
    restored.add(ids[:5], x[:5])
    assert restored.contains(int(ids[0])) and not restored.contains(int(ids[105]))
    # bytearray / memoryview inputs are accepted too
    assert CollectionIndex.restore(bytearray(blob))[1] == 4242


def test_snapshot_of_empty_index(rng):
    restored, seq = CollectionIndex.restore(CollectionIndex(DIM).snapshot())
    assert seq == 0 and len(restored) == 0
    restored.add(np.array([1]), unit_vectors(rng, 1))
    assert restored.contains(1)


def test_corrupt_snapshots_are_refused(filled):
    index, _, _ = filled
    blob = index.snapshot(seq=9)
    cases = {
        "flipped payload byte": blob[:-50] + bytes([blob[-50] ^ 0xFF]) + blob[-49:],
        "truncated": blob[: len(blob) // 2],
        "trailing junk": blob + b"x",
        "foreign": b"\x89PNG\r\n\x1a\n" + b"\x00" * 100,
        "empty": b"",
        "bare faiss bytes": faiss.serialize_index(faiss.IndexFlatIP(DIM)).tobytes(),
        "header only": blob[:30],
    }
    for name, data in cases.items():
        with pytest.raises(IndexCorrupt):
            CollectionIndex.restore(data)
            pytest.fail(name)
    with pytest.raises(IndexCorrupt):
        CollectionIndex.restore("not bytes")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest):
        index.snapshot(seq=-1)


def test_snapshot_with_header_consistent_but_payload_foreign(filled):
    """A valid-looking header over a payload of another shape is refused."""
    import hashlib
    import json
    import struct

    index, _, _ = filled
    blob = index.snapshot(seq=1)
    magic = blob[:6]
    version, hlen = struct.unpack("<HI", blob[6:12])
    header = json.loads(blob[12 : 12 + hlen])
    payload = faiss.serialize_index(faiss.IndexIDMap2(faiss.IndexFlatIP(DIM + 1))).tobytes()
    header.update(payload_len=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest())
    h = json.dumps(header).encode()
    forged = magic + struct.pack("<HI", version, len(h)) + h + payload
    with pytest.raises(IndexCorrupt, match="disagrees"):
        CollectionIndex.restore(forged)


# ------------------------------------------------------------------------ IVF
def test_ivf_recall_against_exact(rng):
    dim = 64
    centres = rng.standard_normal((50, dim))
    x = clustered_vectors(rng, 5000, dim, centres)
    q = clustered_vectors(rng, 200, dim, centres)
    ids = np.arange(5000, dtype=np.int64)
    exact = CollectionIndex(dim)
    exact.add(ids, x)
    ivf = CollectionIndex(dim, kind="ivf", nlist=64, nprobe=8)
    ivf.train(x)
    ivf.add(ids, x)
    _, want = exact.search(q, 10)
    _, got = ivf.search(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got)])
    assert recall > 0.9, recall
    # the nprobe knob is live, and probing every list is exact
    ivf.nprobe = 64
    _, got_all = ivf.search(q, 10)
    recall_all = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(want, got_all)])
    assert recall_all == 1.0


def test_ivf_requires_training(rng):
    index = CollectionIndex(DIM, kind="ivf", nlist=8)
    assert not index.is_trained
    with pytest.raises(InvalidRequest, match="train"):
        index.add(np.arange(3), unit_vectors(rng, 3))
    with pytest.raises(InvalidRequest, match="nlist"):
        index.train(unit_vectors(rng, 4))
    scores, found = index.search(unit_vectors(rng, 1), 3)  # empty untrained index still answers
    assert (found == -1).all()
    index.train(unit_vectors(rng, 400))
    index.add(np.arange(3), unit_vectors(rng, 3))
    index.add(np.array([1]), unit_vectors(rng, 1))  # replace
    assert len(index) == 3
    assert index.remove([0, 1, 99]) == 2 and len(index) == 1
    assert sorted(index.ids().tolist()) == [2]


# ------------------------------------------------------------------- sharding
@pytest.mark.parametrize("n_shards", [1, 3, 4])
def test_sharded_equals_unsharded(n_shards, rng):
    ids = rng.choice(1_000_000, size=700, replace=False).astype(np.int64)
    x = unit_vectors(rng, 700)
    single = CollectionIndex(DIM)
    sharded = ShardedIndex(DIM, n_shards)
    single.add(ids, x)
    sharded.add(ids, x)
    assert len(sharded) == len(single) == 700
    gone = ids[:50]
    assert sharded.remove(gone) == single.remove(gone) == 50
    q = unit_vectors(rng, 30)
    for k in (1, 10, 1000):
        s1, i1 = single.search(q, k)
        s2, i2 = sharded.search(q, k)
        np.testing.assert_allclose(s2, s1, atol=1e-6)
        # Same ids, except that exactly tied scores may come in another order.
        tied = np.zeros_like(s1, dtype=bool)
        same = np.isclose(s1[:, 1:], s1[:, :-1], atol=1e-6, rtol=0) & np.isfinite(s1[:, 1:])
        tied[:, 1:] |= same
        tied[:, :-1] |= same
        np.testing.assert_array_equal(i2[~tied], i1[~tied])
        for row in range(len(q)):
            assert sorted(i2[row][tied[row]]) == sorted(i1[row][tied[row]])
    for i in ids[:60]:
        assert sharded.contains(int(i)) == single.contains(int(i))
    # every id sits in its routed shard
    for s, shard in enumerate(sharded.shards):
        assert (shard.ids() % n_shards == s).all()


def test_sharded_snapshot_round_trip(rng):
    ids = np.arange(300, dtype=np.int64)
    x = unit_vectors(rng, 300)
    sharded = ShardedIndex(DIM, 3)
    sharded.add(ids, x)
    blob = sharded.snapshot(seq=77)
    restored, seq = ShardedIndex.restore(blob)
    assert seq == 77 and restored.n_shards == 3 and len(restored) == 300
    q = unit_vectors(rng, 5)
    np.testing.assert_array_equal(restored.search(q, 9)[1], sharded.search(q, 9)[1])
    with pytest.raises(IndexCorrupt):
        ShardedIndex.restore(blob[:-1])
    with pytest.raises(IndexCorrupt):
        ShardedIndex.restore(sharded.shards[0].snapshot())


def test_sharded_empty_and_small(rng):
    sharded = ShardedIndex(DIM, 4)
    scores, found = sharded.search(unit_vectors(rng, 2), 5)
    assert (found == -1).all() and np.isneginf(scores).all()
    sharded.add(np.array([1, 6]), unit_vectors(rng, 2))
    _, found = sharded.search(unit_vectors(rng, 1), 5)
    assert sorted(found[0, :2]) == [1, 6] and (found[0, 2:] == -1).all()
