"""Gallery scale benchmark: the matcher's own index code on a synthetic gallery.

    nice -n 10 python benchmarks/gallery_scale.py --faces 1000000 [--kinds flat,ivf,ivfsq8]

SYNTHETIC data, not faces: clustered, L2-normalised 128-d vectors shaped like
face embeddings. 1000 groups of look-alike identities; each identity is its
group's centre plus noise (tau), each face its identity plus noise (sigma),
3 faces per identity. Probes are new "photos" of enrolled identities (the
workload whose top-1 decides a match); impostor probes are identities that
were never enrolled. The script prints the mean top-1 similarity of both so
the difficulty is visible (SFace: a genuine pair scores ~0.6-0.8).

For every index kind the matcher can choose (index.policy) it builds the
index with index.policy.build_index -- the same call a matcher replica makes,
nprobe calibrated there to recall@1 >= 0.99 -- and prints build time,
memory, p50/p95 latency of single-query searches for k=1 and k=10, and
recall@1 against exact (brute-force) search on held-out probes. It then
times the matcher's search path itself (GalleryIndex.search, which asks the
index for 64 faces and keeps the best per subject) on the kind the policy
picks for this size, and ends with

    matcher 1M: p95 X ms recall@1 Y (index TYPE)

Vectors are generated chunk by chunk from a seed, so 10M faces never sit in
memory at once. No assertions: figures only. FAISS runs with one OpenMP
thread for searches (a matcher replica gets a fraction of a core) and
--build-threads for builds.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402

from index.adaptive import AdaptiveIndex  # noqa: E402
from index.collection_index import CollectionIndex  # noqa: E402
from index.policy import IndexPolicy, build_index  # noqa: E402

DIM = 128
FACES_PER_ID = 3
CHUNK = 99_999  # a multiple of FACES_PER_ID: an identity never spans chunks
GROUPS = 1000
TAU = 0.09  # identity spread around its group's centre
SIGMA = 0.058  # face spread around its identity (genuine pairs ~0.72)


def _norm(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Synthetic:
    """A deterministic synthetic gallery of n faces, regenerated chunk by chunk."""

    def __init__(self, n: int, seed: int = 1) -> None:
        self.n = n
        self.seed = seed
        self.centres = _norm(np.random.default_rng([seed, 1 << 30]).standard_normal((GROUPS, DIM)))
        self.chunks = math.ceil(n / CHUNK)

    def chunk(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(face ids, faces, identity vectors) of chunk c."""
        lo, hi = c * CHUNK, min(self.n, (c + 1) * CHUNK)
        rng = np.random.default_rng([self.seed, c])
        n_id = math.ceil((hi - lo) / FACES_PER_ID)
        group = rng.integers(0, GROUPS, n_id)
        ident = _norm(self.centres[group] + TAU * rng.standard_normal((n_id, DIM), dtype=np.float32))
        noise = SIGMA * rng.standard_normal((hi - lo, DIM), dtype=np.float32)
        faces = _norm(np.repeat(ident, FACES_PER_ID, axis=0)[: hi - lo] + noise)
        return np.arange(lo, hi, dtype=np.int64), faces, ident

    def source(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for c in range(self.chunks):
            ids, faces, _ = self.chunk(c)
            yield ids, faces

    def probes(self, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(genuine probes of enrolled identities, impostor probes)."""
        rng = np.random.default_rng([self.seed, seed])
        chunks = rng.integers(0, self.chunks, m)
        genuine = np.empty((m, DIM), np.float32)
        for c in np.unique(chunks):
            rows = np.flatnonzero(chunks == c)
            _, _, ident = self.chunk(int(c))
            pick = ident[rng.integers(0, len(ident), len(rows))]
            genuine[rows] = _norm(pick + SIGMA * rng.standard_normal(pick.shape, dtype=np.float32))
        group = rng.integers(0, GROUPS, m)
        ident = _norm(self.centres[group] + TAU * rng.standard_normal((m, DIM), dtype=np.float32))
        impostor = _norm(ident + SIGMA * rng.standard_normal((m, DIM), dtype=np.float32))
        return _norm(genuine), impostor

    def exact_top1(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over every chunk: (best similarity, best id) per query."""
        best = np.full(len(q), -np.inf, np.float32)
        best_id = np.full(len(q), -1, np.int64)
        for ids, x in self.source():
            sims = q @ x.T
            j = sims.argmax(axis=1)
            top = sims[np.arange(len(q)), j]
            better = top > best
            best[better], best_id[better] = top[better], ids[j[better]]
        return best, best_id


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def latency_ms(search, queries: np.ndarray, warmup: int = 20) -> tuple[float, float, float]:
    """(p50, p95) of wall-clock ms per single-query search, and the p95 of
    the CPU time the search thread used (wall minus waiting for a core)."""
    for q in queries[:warmup]:
        search(q[None])
    wall, cpu = [], []
    for q in queries:
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        search(q[None])
        wall.append((time.perf_counter_ns() - t0) / 1e6)
        cpu.append((time.thread_time_ns() - c0) / 1e6)
    return pct(wall, 50), pct(wall, 95), pct(cpu, 95)


def recall_at_1(index: CollectionIndex, q: np.ndarray, best_id: np.ndarray) -> tuple[float, float]:
    """(recall@1 by face id, by subject): the same face as exact search, or
    another face of the same synthetic identity (ids // FACES_PER_ID)."""
    _, found = index.search(q, 1)
    return (
        float((found[:, 0] == best_id).mean()),
        float((found[:, 0] // FACES_PER_ID == best_id // FACES_PER_ID).mean()),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--faces", type=int, default=1_000_000)
    ap.add_argument("--kinds", default="", help="comma-separated subset of flat,ivf,ivfsq8 (default: all "
                    "that fit; flat is skipped above 2M faces)")
    ap.add_argument("--queries", type=int, default=1000, help="held-out probes for recall")
    ap.add_argument("--timed", type=int, default=500, help="single-query searches timed per k")
    ap.add_argument("--build-threads", type=int, default=2)
    ap.add_argument("--memory-budget-mb", type=float, default=4096.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    n = args.faces
    label = f"{n // 1_000_000}M" if n % 1_000_000 == 0 else (f"{n // 1000}k" if n % 1000 == 0 else str(n))
    policy = IndexPolicy(memory_budget_bytes=int(args.memory_budget_mb * 2**20))
    chosen = policy.kind_for(n, DIM)
    kinds = [k for k in args.kinds.split(",") if k] or (
        ["flat", "ivf", "ivfsq8"] if n <= 2_000_000 else [chosen]
    )
    if chosen not in kinds:
        kinds.append(chosen)
    gal = Synthetic(n, args.seed)
    print(f"SYNTHETIC gallery: {n} faces, {DIM}-d, L2-normalised; {GROUPS} groups, {FACES_PER_ID} faces per "
          f"identity, tau {TAU}, sigma {SIGMA}, seed {args.seed}")
    print(f"policy: exact_max {policy.exact_max}, memory budget {args.memory_budget_mb:.0f} MB, "
          f"target recall@1 {policy.target_recall} -> the matcher picks '{chosen}' at this size")
    print(f"machine: {os.cpu_count()} cores, faiss {faiss.__version__}; searches on 1 thread, builds on "
          f"{args.build_threads}; load average {os.getloadavg()[0]:.1f} (shared machine: latencies include "
          f"time this process waited for a core)")

    t0 = time.perf_counter()
    genuine, impostor = gal.probes(args.queries, seed=101)
    g_best, g_id = gal.exact_top1(genuine)
    i_best, i_id = gal.exact_top1(impostor)
    print(f"exact top-1 by brute force for {2 * args.queries} probes: {time.perf_counter() - t0:.1f}s; "
          f"mean top-1 similarity genuine {g_best.mean():.3f}, impostor {i_best.mean():.3f}")
    timed = genuine[: args.timed]

    results: dict[str, dict[str, float]] = {}
    final_index: CollectionIndex | None = None
    for kind in kinds:
        gc.collect()
        rss0 = rss_mb()
        faiss.omp_set_num_threads(args.build_threads)
        t0 = time.perf_counter()
        index, report = build_index(DIM, gal.source, n, policy, kind=kind)
        build_s = time.perf_counter() - t0
        faiss.omp_set_num_threads(1)
        rss1 = rss_mb()
        r_gen, r_gen_subject = recall_at_1(index, genuine, g_id)
        r_imp, _ = recall_at_1(index, impostor, i_id)
        p50_1, p95_1, cpu_1 = latency_ms(lambda q: index.search(q, 1), timed)
        p50_10, p95_10, cpu_10 = latency_ms(lambda q: index.search(q, 10), timed)
        results[kind] = {"p95_1": p95_1, "recall": r_gen}
        params = f"nlist {report.nlist} nprobe {report.nprobe} " if kind != "flat" else ""
        print(
            f"{kind:7s} {params}build {build_s:.1f}s (train {report.train_s:.1f}s, add {report.add_s:.1f}s, "
            f"calibrate {report.calibrate_s:.1f}s, calibration recall@1 {report.recall_at_1:.3f} on "
            f"{report.calibration_queries} queries) | memory: index {report.nbytes / 2**20:.0f} MB, "
            f"RSS +{rss1 - rss0:.0f} MB"
        )
        print(
            f"        k=1 p50 {p50_1:.3f} ms p95 {p95_1:.3f} ms (cpu p95 {cpu_1:.3f}) | k=10 p50 {p50_10:.3f} ms "
            f"p95 {p95_10:.3f} ms (cpu p95 {cpu_10:.3f}) "
            f"| recall@1 vs exact: genuine {r_gen:.4f} (same subject {r_gen_subject:.4f}), impostor {r_imp:.4f} "
            f"({args.queries} held-out each)"
        )
        if kind == chosen:
            final_index = index
        else:
            del index
    assert final_index is not None
    flat_p95 = results.get("flat", {}).get("p95_1")
    if flat_p95 is not None and chosen != "flat":
        print(f"speed-up of {chosen} over exact flat search (k=1 p95): {flat_p95 / results[chosen]['p95_1']:.1f}x")

    # The matcher's own search path: GalleryIndex.search over this index.
    from serve_app.gallery.gallery_index import GalleryIndex
    from serve_app.gallery.reembeds import ReembedRepository

    # No database: only the in-memory search path is timed, nothing is loaded.
    gallery = GalleryIndex(repo=None, snapshots=None, policy=policy,  # type: ignore[arg-type]
                           reembeds=ReembedRepository(None))  # type: ignore[arg-type]
    gallery.indexes[1] = AdaptiveIndex.wrap(final_index, policy)
    rss0 = rss_mb()
    subjects = [uuid.UUID(int=i + 1) for i in range(math.ceil(n / FACES_PER_ID))]
    gallery.subject_of = {f: subjects[f // FACES_PER_ID] for f in range(n)}
    print(f"matcher face -> subject map (Python dict, {FACES_PER_ID} faces per subject): "
          f"RSS +{rss_mb() - rss0:.0f} MB")
    p50_m, p95_m, cpu_m = latency_ms(lambda q: gallery.search(1, q, 1), timed)
    hits = [gallery.search(1, q[None], 1)[0] for q in genuine]
    r_m = float(np.mean([h[0].face_id == want if h else False for h, want in zip(hits, g_id)]))
    print(f"matcher search path (GalleryIndex.search, k=1 subject from 64 faces): p50 {p50_m:.3f} ms "
          f"p95 {p95_m:.3f} ms (cpu p95 {cpu_m:.3f} ms), recall@1 {r_m:.4f}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"matcher {label}: p95 {p95_m:.3f} ms recall@1 {r_m:.4f} (index {chosen})")


if __name__ == "__main__":
    main()
