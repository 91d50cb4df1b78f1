"""Pipeline benchmark: per-stage latency in-process, and HTTP vs in-process.

    python benchmarks/pipeline.py [--url http://127.0.0.1:8000] [--requests 40]

Part 1 runs the service's own code in this process (the detector's path:
reduced decode -> detect -> crops; SFace; the matcher's index over the same
enrolled faces) over the photos in ../shared/faces and prints p50/p95 per
stage, then its throughput with one such pipeline per core. Part 2 sends the same identify work through the real
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


class ServicePath:
    """The service's own per-image code, in one process: the detector's path
    (serve_app/detection_path.py: reduced decode, detect, crops), SFace, and
    the matcher's index over the same enrolled faces as the HTTP gallery.
    What HTTP adds on top of this is the serving overhead."""

    def __init__(self, enrol: list[bytes], threads: int) -> None:
        from index.collection_index import CollectionIndex
        from models.detection import YuNetDetector
        from models.embedding import SFaceEmbedder
        from serve_app.deployment_config import DetectorConfig

        self.detector = YuNetDetector()
        self.embedder = SFaceEmbedder(intra_op_threads=threads)
        self.config = DetectorConfig()
        self.index = CollectionIndex(dim=128)
        for i, data in enumerate(enrol):
            vec = self.run(data)[0]
            if len(vec):
                self.index.add(np.array([i + 1], np.int64), vec[:1])

    def run(self, data: bytes) -> tuple[np.ndarray, dict[str, float]]:
        from serve_app.detection_path import run_detection
        from serve_app.messages import DetectOptions

        det = run_detection(self.detector, data, self.config, DetectOptions())
        t0 = time.perf_counter()
        vectors = self.embedder.embed(det.aligned)
        t1 = time.perf_counter()
        if len(self.index) and len(vectors):
            self.index.search(vectors, 5)
        t2 = time.perf_counter()
        return vectors, {**det.timings_ms, "embed": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3}


def in_process_throughput(images: list[bytes], enrol: list[bytes], workers: int, threads: int) -> float:
    """Images/s with ``workers`` service paths side by side (one per core), the
    fair baseline for HTTP at concurrency: the same photos on the same cores."""
    paths = [ServicePath(enrol, threads) for _ in range(workers)]
    chunks = [images[i::workers] for i in range(workers)]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(workers) as pool:  # cv2 and onnxruntime release the GIL
        list(pool.map(lambda pc: [pc[0].run(d) for d in pc[1]], zip(paths, chunks)))
    return len(images) / (time.perf_counter() - t0)


def in_process(images: list[bytes], enrol: list[bytes], threads: int) -> dict[str, object]:
    import cv2

    cv2.setNumThreads(threads)
    path = ServicePath(enrol, threads)
    for data in images[:3]:  # warm-up
        path.run(data)
    stages: dict[str, list[float]] = {k: [] for k in ("decode", "detect", "align", "embed", "search", "total")}
    t_all = time.perf_counter()
    for data in images:
        t0 = time.perf_counter()
        _, timings = path.run(data)
        for k in ("decode", "detect", "align", "embed", "search"):
            stages[k].append(float(timings.get(k, 0.0)))
        stages["total"].append((time.perf_counter() - t0) * 1000)
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
    local = in_process([d for _, d in work], list(enrol.values()), args.threads)
    print(f"\n## in-process (the service's code in one process, {args.threads} thread, "
          f"gallery of {len(enrol)} enrolled faces)")
    print(f"{'stage':8} {'p50 ms':>9} {'p95 ms':>9}")
    for k, v in local["stages"].items():
        print(f"{k:8} {_pct(v, 50):9.2f} {_pct(v, 95):9.2f}")
    print(f"throughput: {local['throughput']:.2f} images/s (1 pipeline)")
    local_tp = in_process_throughput([d for _, d in work], list(enrol.values()), args.cores, args.threads)
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
