"""Which index a collection gets for its size, and building it with measured recall.

Below ``exact_max`` vectors a collection is searched exactly (flat inner
product). Above it, an IVF index: IVF-flat while its estimated memory fits
``memory_budget_bytes``, IVF with 8-bit scalar-quantised codes (a quarter of
the memory) beyond that. HNSW is not offered: faiss cannot remove from it, and
on the 2-core build machine it built 80x slower than IVF (165 s against 2.1 s
for 200k vectors). IVF-PQ was measured too and lost (recall@1 0.62 at 32
bytes, 0.89 at 64 bytes per vector on clustered data). docs/SCALING.md has
the figures.

``nprobe`` is never assumed: ``build_index`` draws calibration queries from
the collection itself (stored vectors perturbed to ``probe_cosine``, like a
new photo of an enrolled person), finds their exact top-1 by brute force over
the same vectors, and takes the smallest power-of-two nprobe whose measured
recall@1 reaches ``target_recall``.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np


from .collection_index import CollectionIndex

__all__ = ["BuildReport", "IndexPolicy", "Source", "array_source", "build_index"]

# A re-iterable source of (ids, vectors) chunks: each call starts over.
Source = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]

_VEC_OVERHEAD = 48  # id (8) + hash-table direct map entry (~40), per vector


@dataclass(frozen=True)
class IndexPolicy:
    exact_max: int = 50_000  # exact search up to this many vectors
    memory_budget_bytes: int = 4 << 30  # IVF-flat above this -> ivfsq8
    target_recall: float = 0.99  # recall@1 against exact search
    calibration_queries: int = 500
    probe_cosine: float = 0.7  # calibration queries vs the stored vector they come from
    train_per_list: int = 40  # faiss warns below 39 training points per list
    max_train: int = 200_000
    # Going back down needs the size to fall this far below a threshold, so
    # a collection near one does not rebuild back and forth.
    hysteresis: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.exact_max < 1 or self.memory_budget_bytes < 1:
            raise ValueError("exact_max and memory_budget_bytes must be positive")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")
        if not 0.0 < self.probe_cosine <= 1.0 or not 0.0 < self.hysteresis <= 1.0:
            raise ValueError("probe_cosine and hysteresis must be in (0, 1]")
        if self.calibration_queries < 10:
            raise ValueError("calibration_queries must be at least 10")

    # ---------------------------------------------------------- decisions
    @staticmethod
    def nlist_for(n: int) -> int:
        """About 4 sqrt(n) lists, a power of two, at least 39 vectors each."""
        if n < 39 * 16:
            return max(1, n // 39)
        target = 4 * math.sqrt(n)
        nlist = 1 << max(4, round(math.log2(target)))
        while nlist > 16 and n / nlist < 39:
            nlist //= 2
        return min(nlist, 1 << 16)

    @staticmethod
    def bytes_for(kind: str, n: int, dim: int) -> int:
        """Estimated memory of an index of ``kind`` holding n vectors."""
        if kind == "flat":
            return n * (4 * dim + 8)
        code = 4 * dim if kind == "ivf" else dim
        return n * (code + _VEC_OVERHEAD) + IndexPolicy.nlist_for(n) * 4 * dim

    def kind_for(self, n: int, dim: int, current: str | None = None) -> str:
        """The kind for n vectors; with ``current`` given, a step down only
        happens once n is ``hysteresis`` below the threshold."""
        h = self.hysteresis
        exact_limit = self.exact_max if current in (None, "flat") else self.exact_max * h
        if n <= exact_limit:
            return "flat"
        budget = self.memory_budget_bytes * (h if current == "ivfsq8" else 1.0)
        return "ivf" if self.bytes_for("ivf", n, dim) <= budget else "ivfsq8"

    def rebuild_reason(self, kind: str, n: int, dim: int, built_n: int) -> str | None:
        """Why an index of ``kind`` built for ``built_n`` vectors and now
        holding n should be rebuilt, or None."""
        want = self.kind_for(n, dim, current=kind)
        if want != kind:
            return f"{n} vectors want {want}, index is {kind}"
        if kind != "flat" and built_n > 0 and (n >= 2 * built_n or 2 * n <= built_n):
            return f"{kind} trained for {built_n} vectors now holds {n}: retrain"
        return None


@dataclass
class BuildReport:
    kind: str
    n: int
    nlist: int = 0
    nprobe: int = 0
    recall_at_1: float = 1.0  # measured on the calibration queries (exact: 1.0)
    calibration_queries: int = 0
    train_s: float = 0.0
    add_s: float = 0.0
    calibrate_s: float = 0.0
    nbytes: int = 0


def array_source(ids: np.ndarray, vectors: np.ndarray, chunk: int = 100_000) -> Source:
    def chunks() -> Iterable[tuple[np.ndarray, np.ndarray]]:
        for s in range(0, len(ids), chunk):
            yield ids[s : s + chunk], vectors[s : s + chunk]

    return chunks


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _perturb(x: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at about ``cosine`` to the (unit) rows of x."""
    noise = _normalise(rng.standard_normal(x.shape).astype(np.float32))
    noise -= (noise * x).sum(axis=1, keepdims=True) * x  # orthogonal to x
    noise = _normalise(noise)
    sin = math.sqrt(max(0.0, 1.0 - cosine * cosine))
    return _normalise(cosine * _normalise(x) + sin * noise)


def build_index(
    dim: int,
    source: Source,
    n: int,
    policy: IndexPolicy,
    *,
    metric: str = "ip",
    kind: str | None = None,
) -> tuple[CollectionIndex, BuildReport]:
    """Build the index ``policy`` picks for n vectors (or ``kind``) from
    ``source``, in two passes over it: a uniform sample to train on and to
    draw calibration queries from, then the adds while the exact top-1 of
    each calibration query is found by brute force. Heavy: call it off the
    serving path."""
    kind = kind or policy.kind_for(n, dim)
    if kind == "flat":
        index = CollectionIndex(dim, metric=metric, kind="flat")
        t0 = time.perf_counter()
        for ids, x in source():
            index.add(ids, x)
        return index, BuildReport("flat", len(index), add_s=time.perf_counter() - t0, nbytes=index.nbytes())

    nlist = policy.nlist_for(n)
    if nlist < 1:
        raise ValueError(f"{n} vectors are too few for an IVF index")
    rng = np.random.default_rng(policy.seed)
    want = min(n, max(nlist * policy.train_per_list, policy.calibration_queries * 4), policy.max_train)
    p = min(1.0, 1.3 * want / max(n, 1))
    t0 = time.perf_counter()
    picked = []
    for _, x in source():
        keep = rng.random(len(x)) < p
        if keep.any():
            picked.append(np.asarray(x[keep], dtype=np.float32))
    sample = np.concatenate(picked) if picked else np.empty((0, dim), np.float32)
    if len(sample) < nlist:
        raise ValueError(f"source gave {len(sample)} sample vectors, IVF needs {nlist}")
    sample = sample[rng.permutation(len(sample))]
    index = CollectionIndex(dim, metric=metric, kind=kind, nlist=nlist, nprobe=1)
    index.train(sample[:want])
    train_s = time.perf_counter() - t0

    nq = min(policy.calibration_queries, len(sample))
    queries = _perturb(sample[rng.choice(len(sample), nq, replace=False)], policy.probe_cosine, rng)
    best = np.full(nq, -np.inf, np.float32)
    best_id = np.full(nq, -1, np.int64)
    q_sq = (queries * queries).sum(axis=1)
    t0 = time.perf_counter()
    calib_s = 0.0
    for ids, x in source():
        index.add(ids, x)
        t1 = time.perf_counter()
        x = np.asarray(x, np.float32)
        sims = queries @ x.T
        if metric == "l2":  # higher is better: -|q - x|^2
            sims = 2 * sims - (x * x).sum(axis=1)[None, :] - q_sq[:, None]
        j = sims.argmax(axis=1)
        top = sims[np.arange(nq), j]
        better = top > best
        best[better] = top[better]
        best_id[better] = np.asarray(ids, np.int64)[j[better]]
        calib_s += time.perf_counter() - t1
    add_s = time.perf_counter() - t0 - calib_s

    t0 = time.perf_counter()
    measured: list[tuple[int, float]] = []
    for candidate in sorted({1 << i for i in range(int(math.log2(nlist)) + 1)} | {nlist}):
        index.nprobe = candidate
        scores, found = index.search(queries, 1)
        # An exact tie (a duplicate vector) under another id is not a miss.
        hit = (found[:, 0] == best_id) | (np.abs(scores[:, 0] - best) <= 1e-6)
        measured.append((candidate, float(hit.mean())))
        if measured[-1][1] >= policy.target_recall:
            break
    # If even probing every list misses the target (8-bit codes blur near
    # ties), settle for what probing can still add.
    best_recall = max(r for _, r in measured)
    goal = policy.target_recall if best_recall >= policy.target_recall else best_recall - 0.002
    nprobe, recall = next((c, r) for c, r in measured if r >= goal)
    index.nprobe = nprobe
    calib_s += time.perf_counter() - t0
    return index, BuildReport(
        kind, len(index), nlist, nprobe, recall, nq, train_s, add_s, calib_s, index.nbytes()
    )
