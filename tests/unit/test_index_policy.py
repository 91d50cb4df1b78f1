"""Index by size: policy decisions, measured-recall builds, background rebuilds with a swap."""
from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from index import AdaptiveIndex, CollectionIndex, IndexPolicy, array_source, build_index
InvalidRequest = ValueError  # index code raises ValueError for bad input

DIM = 32


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _norm(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Gallery:
    """Clustered faces: groups of look-alike identities, a few faces each;
    probes are new photos of enrolled identities."""

    def __init__(self, seed: int, n: int, groups: int = 40, dim: int = DIM) -> None:
        self.rng = np.random.default_rng(seed)
        self.centres = _norm(self.rng.standard_normal((groups, dim)))
        self.identities = _norm(
            self.centres[self.rng.integers(0, groups, n // 2)] + 0.25 * self.rng.standard_normal((n // 2, dim))
        )
        owner = np.arange(n) % len(self.identities)
        self.x = self.faces(owner)
        self.ids = self.rng.choice(10 * n, size=n, replace=False).astype(np.int64)

    def faces(self, owner: np.ndarray) -> np.ndarray:
        return _norm(self.identities[owner] + 0.12 * self.rng.standard_normal((len(owner), self.identities.shape[1])))

    def probes(self, m: int) -> np.ndarray:
        return self.faces(self.rng.integers(0, len(self.identities), m))


def exact_top1(ids: np.ndarray, x: np.ndarray, q: np.ndarray) -> np.ndarray:
    return ids[(q @ x.T).argmax(axis=1)]


# ----------------------------------------------------------------- decisions
def test_kind_by_size_and_memory_with_hysteresis() -> None:
    p = IndexPolicy(exact_max=1000, memory_budget_bytes=IndexPolicy.bytes_for("ivf", 10_000, DIM))
    assert p.kind_for(1000, DIM) == "flat"
    assert p.kind_for(1001, DIM) == "ivf"
    assert p.kind_for(10_000, DIM) == "ivf"
    assert p.kind_for(10_001, DIM) == "ivfsq8"
    # Going down needs the size to fall by the hysteresis factor (0.5).
    assert p.kind_for(900, DIM, current="ivf") == "ivf"
    assert p.kind_for(500, DIM, current="ivf") == "flat"
    assert p.kind_for(9000, DIM, current="ivfsq8") == "ivfsq8"
    assert p.kind_for(4000, DIM, current="ivfsq8") == "ivf"
    assert p.rebuild_reason("flat", 1001, DIM, 0) is not None
    assert p.rebuild_reason("ivf", 3000, DIM, 2000) is None
    assert "retrain" in (p.rebuild_reason("ivf", 4000, DIM, 2000) or "")
    # 8-bit codes are a quarter of the float vectors.
    assert IndexPolicy.bytes_for("ivfsq8", 10**6, 128) < IndexPolicy.bytes_for("ivf", 10**6, 128) / 2.5


def test_nlist_grows_with_size_and_keeps_lists_full() -> None:
    assert IndexPolicy.nlist_for(1_000_000) == 4096
    assert IndexPolicy.nlist_for(10_000_000) == 16384
    for n in (700, 5000, 60_000, 3_000_000):
        nlist = IndexPolicy.nlist_for(n)
        assert nlist & (nlist - 1) == 0 and n / nlist >= 39


def test_policy_validation() -> None:
    for bad in ({"exact_max": 0}, {"target_recall": 1.5}, {"probe_cosine": 0}, {"calibration_queries": 3}):
        with pytest.raises(InvalidRequest):
            IndexPolicy(**bad)  # type: ignore[arg-type]


# -------------------------------------------------------------- built indexes
@pytest.mark.parametrize("kind", ["ivf", "ivfsq8"])
def test_built_index_recall_against_exact_on_new_probes(kind: str) -> None:
    g = Gallery(1, 20_000)
    policy = IndexPolicy(exact_max=1000, calibration_queries=300, seed=3)
    index, report = build_index(DIM, array_source(g.ids, g.x, 3000), len(g.ids), policy, kind=kind)
    assert (report.kind, report.n, index.kind, len(index)) == (kind, 20_000, kind, 20_000)
    assert report.nlist == IndexPolicy.nlist_for(20_000) and 1 <= report.nprobe <= report.nlist
    assert report.nprobe < report.nlist  # calibration did not just fall back to exhaustive search
    # Held-out probes (not the calibration queries) against brute force.
    q = g.probes(1000)
    want = exact_top1(g.ids, g.x, q)
    _, got = index.search(q, 1)
    recall = float((got[:, 0] == want).mean())
    assert recall >= 0.98, (recall, report)
    assert report.recall_at_1 >= (0.99 if kind == "ivf" else 0.97)


def test_calibration_reaches_the_target_and_picks_the_smallest_nprobe() -> None:
    g = Gallery(2, 10_000)
    loose = IndexPolicy(exact_max=100, target_recall=0.5, calibration_queries=200)
    strict = IndexPolicy(exact_max=100, target_recall=1.0, calibration_queries=200)
    _, r_loose = build_index(DIM, array_source(g.ids, g.x), 10_000, loose, kind="ivf")
    _, r_strict = build_index(DIM, array_source(g.ids, g.x), 10_000, strict, kind="ivf")
    assert r_loose.nprobe <= r_strict.nprobe
    assert r_loose.recall_at_1 >= 0.5 and r_strict.recall_at_1 == 1.0


def test_build_flat_is_exact() -> None:
    g = Gallery(3, 500)
    index, report = build_index(DIM, array_source(g.ids, g.x, 128), 500, IndexPolicy())
    assert report.kind == "flat" and report.recall_at_1 == 1.0
    q = g.probes(50)
    np.testing.assert_array_equal(index.search(q, 1)[1][:, 0], exact_top1(g.ids, g.x, q))


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfsq8"])
def test_remove_and_readd_in_every_kind(kind: str) -> None:
    g = Gallery(4, 4000)
    policy = IndexPolicy(exact_max=100, calibration_queries=100)
    index, _ = build_index(DIM, array_source(g.ids, g.x, 1000), 4000, policy, kind=kind)
    gone = g.ids[::4]
    assert index.remove(gone) == len(gone)
    assert index.remove(gone) == 0
    # Queries equal to the removed vectors: their own ids would rank first.
    _, found = index.search(g.x[::4], 20)
    assert not np.isin(found, gone).any()
    assert not any(index.contains(int(i)) for i in gone[:50])
    assert set(index.ids().tolist()) == set(g.ids.tolist()) - set(gone.tolist())
    index.add(gone[:10], g.x[::4][:10])  # ids may come back (re-add), once each
    assert len(index) == 3010
    _, found = index.search(g.x[::4][:10], 1)
    np.testing.assert_array_equal(found[:, 0], gone[:10])


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfsq8"])
def test_snapshot_restore_every_kind(kind: str) -> None:
    g = Gallery(5, 3000)
    index, report = build_index(
        DIM, array_source(g.ids, g.x), 3000, IndexPolicy(exact_max=100, calibration_queries=100), kind=kind
    )
    index.remove(g.ids[:30])
    q = g.probes(40)
    restored, seq = CollectionIndex.restore(index.snapshot(seq=17))
    assert seq == 17 and restored.kind == kind and restored.nprobe == index.nprobe == (report.nprobe or 16)
    for a, b in zip(index.search(q, 5), restored.search(q, 5)):
        np.testing.assert_array_equal(a, b)
    wrapped = AdaptiveIndex.wrap(restored)
    assert wrapped.kind == kind and wrapped.built_n == 2970
    assert wrapped.remove(g.ids[30:40]) == 10 and not wrapped.contains(int(g.ids[35]))


# ------------------------------------------------------------ rebuild + swap
def test_adaptive_grows_from_flat_to_ivf_and_back() -> None:
    g = Gallery(6, 6000)
    a = AdaptiveIndex(DIM, IndexPolicy(exact_max=2000, calibration_queries=200))
    a.add(g.ids[:1500], g.x[:1500])
    assert a.kind == "flat" and a.rebuild_reason() is None
    a.add(g.ids[1500:], g.x[1500:])
    assert a.rebuild_reason() is not None
    report = a.rebuild()
    assert a.kind == "ivf" and report.kind == "ivf" and len(a) == 6000 and a.rebuild_reason() is None
    q = g.probes(500)
    _, got = a.search(q, 1)
    assert float((got[:, 0] == exact_top1(g.ids, g.x, q)).mean()) >= 0.98
    # Shrinking below exact_max * hysteresis goes back to exact search.
    a.remove(g.ids[:5500])
    assert a.rebuild_reason() is not None
    a.rebuild()
    assert a.kind == "flat" and sorted(a.ids().tolist()) == sorted(g.ids[5500:].tolist())


def test_mutations_during_a_rebuild_are_kept_and_removed_ids_never_return() -> None:
    g = Gallery(7, 8000)
    a = AdaptiveIndex(DIM, IndexPolicy(exact_max=1000, calibration_queries=100))
    a.add(g.ids[:6000], g.x[:6000])
    exporting = threading.Event()
    mutated = threading.Event()
    base = a.current

    exported: list = []

    def slow_source():
        # Both build passes see the vectors as they were before the
        # mutations below: only the journal can bring those in.
        if not exported:
            exported.extend(base.export(chunk=700))
            exporting.set()
            assert mutated.wait(30)
        return exported

    errors: list[BaseException] = []
    reports = []

    def run() -> None:
        try:
            reports.append(a.rebuild(source=slow_source))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    assert exporting.wait(30)
    # While the replacement is built: adds, removes, a re-add with a new vector.
    gone = g.ids[:2000]
    a.remove(gone)
    a.add(g.ids[6000:], g.x[6000:])
    moved = g.ids[2000]
    a.add(np.array([moved]), g.x[7999:8000])
    with pytest.raises(InvalidRequest, match="already running"):
        a.rebuild()
    mutated.set()
    stop = threading.Event()
    leaked: list[np.ndarray] = []

    def searcher() -> None:  # searches across the swap
        while not stop.is_set():
            _, found = a.search(g.x[:200], 5)
            if np.isin(found, gone).any():
                leaked.append(found)

    s = threading.Thread(target=searcher)
    s.start()
    t.join(120)
    stop.set()
    s.join()
    assert not errors and reports and a.kind == "ivf"
    assert not leaked
    assert set(a.ids().tolist()) == set(g.ids[2000:].tolist())
    np.testing.assert_allclose(a.get_vectors(np.array([moved]))[0], g.x[7999], atol=1e-6)
    _, found = a.search(g.x[:2000], 10)
    assert not np.isin(found, gone).any()
    # the journal is gone: later mutations go to the new index only
    assert not a.rebuilding
    a.remove(g.ids[2000:2010])
    assert len(a) == 5990


def test_failed_rebuild_keeps_serving_the_old_index() -> None:
    g = Gallery(8, 3000)
    a = AdaptiveIndex(DIM, IndexPolicy(exact_max=1000, calibration_queries=100))
    a.add(g.ids, g.x)
    old = a.current

    def broken():
        raise OSError("source went away")

    with pytest.raises(OSError):
        a.rebuild(source=broken)
    assert a.current is old and not a.rebuilding
    a.rebuild()
    assert a.kind == "ivf"
