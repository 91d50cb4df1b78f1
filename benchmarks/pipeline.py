"""Pipeline benchmark: per-stage latency in-process, and HTTP vs in-process.

    python benchmarks/pipeline.py [--url http://127.0.0.1:8000] [--requests 40]

Part 1 runs decode -> detect -> align -> embed -> search in this process
(models/ and index/ only) over the photos in ../shared/faces and prints
p50/p95 per stage. Part 2 sends the same identify work through the real
Serve app over HTTP (started here unless --url is given), sequentially for
latency and with concurrency for throughput, and prints the ratios against
part 1 from this one run. No assertions: figures only.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
os.environ.setdefault("FACE_MODELS_DIR", str(SHARED / "models"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _photos() -> dict[str, list[Path]]:
    root = SHARED / "faces" / "people"
    return {d.name: sorted(d.iterdir()) for d in sorted(root.iterdir()) if d.is_dir()}


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def in_process_throughput(images: list[bytes], workers: int, threads: int) -> float:
    """Images/s with ``workers`` pipelines side by side (one per core), the
    fair baseline for HTTP at concurrency: the same photos on the same cores."""
    from models.detection import YuNetDetector
    from models.embedding import SFaceEmbedder
    from models.pipeline import FacePipeline

    pipes = [FacePipeline(YuNetDetector(), SFaceEmbedder(intra_op_threads=threads)) for _ in range(workers)]
    for p in pipes:
        p.run(images[0])
    chunks = [images[i::workers] for i in range(workers)]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as pool:  # cv2 and onnxruntime release the GIL
        list(pool.map(lambda pc: [pc[0].run(d) for d in pc[1]], zip(pipes, chunks)))
    return len(images) / (time.perf_counter() - t0)


def in_process(images: list[bytes], gallery_size: int, threads: int) -> dict[str, object]:
    import cv2

    from index.collection_index import CollectionIndex
    from models.detection import YuNetDetector
    from models.embedding import SFaceEmbedder
    from models.pipeline import FacePipeline

    cv2.setNumThreads(threads)
    pipe = FacePipeline(YuNetDetector(), SFaceEmbedder(intra_op_threads=threads))
    # A gallery: the real enrolled faces plus random unit vectors as filler.
    index = CollectionIndex(dim=128)
    filler = np.random.default_rng(0).standard_normal((gallery_size, 128)).astype(np.float32)
    filler /= np.linalg.norm(filler, axis=1, keepdims=True)
    index.add(np.arange(1000, 1000 + gallery_size, dtype=np.int64), filler)
    for data in images[:3]:  # warm-up
        pipe.run(data)
    stages: dict[str, list[float]] = {k: [] for k in ("decode", "detect", "align", "embed", "search", "total")}
    t_all = time.perf_counter()
    for data in images:
        t0 = time.perf_counter()
        result = pipe.run(data)
        t1 = time.perf_counter()
        index.search(result.embeddings, 5)
        t2 = time.perf_counter()
        for k in ("decode", "detect", "align", "embed"):
            stages[k].append(float(result.timings_ms.get(k, 0.0)))
        stages["search"].append((t2 - t1) * 1000)
        stages["total"].append((t2 - t0) * 1000)
    wall = time.perf_counter() - t_all
    return {"stages": stages, "throughput": len(images) / wall}


def over_http(url: str, images: list[tuple[str, bytes]], enrol: dict[str, bytes], concurrency: int) -> dict[str, object]:
    import httpx

    with httpx.Client(base_url=url, timeout=120) as client:
        seq = 0
        for name, data in enrol.items():
            r = client.post("/v1/subjects", json={"name": f"bench-{name}-{time.time_ns()}"})
            r.raise_for_status()
            r = client.post(f"/v1/subjects/{r.json()['id']}/faces", files={"image": ("e.jpg", data)})
            r.raise_for_status()
            seq = max(seq, r.json()["seq"])

        def one(item: tuple[str, bytes]) -> tuple[float, dict[str, float]]:
            t0 = time.perf_counter()
            r = client.post("/v1/identify", params={"min_seq": seq}, files={"image": (item[0], item[1])})
            r.raise_for_status()
            return (time.perf_counter() - t0) * 1000, r.json()["timings_ms"]

        for item in images[:3]:
            one(item)
        seq_lat, server_stages = [], {}
        for item in images:
            ms, stages = one(item)
            seq_lat.append(ms)
            for k, v in stages.items():
                server_stages.setdefault(k, []).append(v)
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(concurrency) as pool:
            conc_lat = [ms for ms, _ in pool.map(one, images)]
        wall = time.perf_counter() - t0
    return {"latency": seq_lat, "server_stages": server_stages, "throughput": len(images) / wall,
            "concurrent_latency": conc_lat}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=None, help="an already running faceserve")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--gallery", type=int, default=10_000, help="filler vectors in the in-process index")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="inference threads in-process (replicas use 1)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2,
                    help="parallel in-process pipelines for the throughput baseline")
    args = ap.parse_args()

    photos = _photos()
    pool = [(p.name, p.read_bytes()) for ps in photos.values() for p in ps]
    work = [pool[i % len(pool)] for i in range(args.requests)]
    enrol = {name: ps[0].read_bytes() for name, ps in photos.items()}

    print(f"# faceserve pipeline benchmark — {args.requests} identify requests, {len(pool)} distinct photos")
    local = in_process([d for _, d in work], args.gallery, args.threads)
    print(f"\n## in-process (models/ + index/, {args.threads} thread, gallery {args.gallery} vectors)")
    print(f"{'stage':8} {'p50 ms':>9} {'p95 ms':>9}")
    for k, v in local["stages"].items():
        print(f"{k:8} {_pct(v, 50):9.2f} {_pct(v, 95):9.2f}")
    print(f"throughput: {local['throughput']:.2f} images/s (1 pipeline)")
    local_tp = in_process_throughput([d for _, d in work], args.cores, args.threads)
    print(f"throughput: {local_tp:.2f} images/s ({args.cores} pipelines side by side: the baseline)")

    from benchmarks.live_app import running_app

    with running_app(args.url) as url:
        remote = over_http(url, work, enrol, args.concurrency)
    print(f"\n## over HTTP through Ray Serve ({url})")
    print(f"{'stage':8} {'p50 ms':>9} {'p95 ms':>9}   (server-reported timings_ms)")
    for k, v in remote["server_stages"].items():
        print(f"{k:8} {_pct(v, 50):9.2f} {_pct(v, 95):9.2f}")
    lat = remote["latency"]
    print(f"client latency sequential: p50 {_pct(lat, 50):.2f} ms, p95 {_pct(lat, 95):.2f} ms")
    cl = remote["concurrent_latency"]
    print(f"concurrency {args.concurrency}: throughput {remote['throughput']:.2f} req/s, "
          f"p50 {_pct(cl, 50):.2f} ms, p95 {_pct(cl, 95):.2f} ms")
    base = _pct(local["stages"]["total"], 50)
    print("\n## ratios (HTTP / in-process, same run)")
    print(f"p50 latency: {_pct(lat, 50) / base:.2f}x  ({_pct(lat, 50):.1f} ms vs {base:.1f} ms)")
    ratio = remote["throughput"] / local_tp
    overhead = _pct(lat, 50) - base
    print(f"throughput:  {ratio:.2f}x  ({remote['throughput']:.2f} vs {local_tp:.2f} per s)")
    print(f"serving overhead at p50: {overhead:.1f} ms per request")
    print(f"HTTP/in-process: throughput ratio {ratio:.2f} at concurrency {args.concurrency}, "
          f"p50 overhead {overhead:.1f} ms")


if __name__ == "__main__":
    main()
