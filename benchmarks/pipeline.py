"""Pipeline benchmark: per-stage latency in-process, and HTTP vs in-process.

    python benchmarks/pipeline.py [--url http://127.0.0.1:8000] [--requests 40]

The in-process side runs the service's own code in this process (the
detector's path: reduced decode -> detect -> crops; SFace; the matcher's
index over the same enrolled faces) over the photos in ../shared/faces:
sequentially for per-stage latency, and with one such pipeline per core for
throughput. The HTTP side sends the same identify work through the real Serve
app (started here unless --url is given), sequentially and at --concurrency.
The two sides alternate for --rounds rounds, so both see the same machine,
and the ratios are medians over the rounds. No assertions: figures only.
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


class LocalBaseline:
    """The in-process side: one service path for latency, ``cores`` paths side
    by side for throughput (one per core; cv2 and onnxruntime release the GIL),
    the fair baseline for HTTP at concurrency: the same photos on the same cores."""

    def __init__(self, enrol: list[bytes], threads: int, cores: int) -> None:
        import cv2

        cv2.setNumThreads(threads)
        self.paths = [ServicePath(enrol, threads) for _ in range(max(1, cores))]
        self.pool = cf.ThreadPoolExecutor(len(self.paths))

    def latency(self, images: list[bytes], stages: dict[str, list[float]]) -> list[float]:
        path, out = self.paths[0], []
        for data in images:
            t0 = time.perf_counter()
            _, timings = path.run(data)
            out.append((time.perf_counter() - t0) * 1000)
            for k in ("decode", "detect", "align", "embed", "search"):
                stages.setdefault(k, []).append(float(timings.get(k, 0.0)))
        stages.setdefault("total", []).extend(out)
        return out

    def throughput(self, images: list[bytes]) -> float:
        n = len(self.paths)
        chunks = [images[i::n] for i in range(n)]
        t0 = time.perf_counter()
        list(self.pool.map(lambda pc: [pc[0].run(d) for d in pc[1]], zip(self.paths, chunks)))
        return len(images) / (time.perf_counter() - t0)


class HttpSide:
    """The same identify work through the real Serve app. Raw image/jpeg
    bodies: the client shares the cores, and multipart encoding would be
    counted as serving overhead."""

    def __init__(self, url: str, enrol: dict[str, bytes], concurrency: int) -> None:
        import httpx

        self.client = httpx.Client(base_url=url, timeout=120,
                                   limits=httpx.Limits(max_connections=concurrency + 2))
        self.concurrency = concurrency
        self.pool = cf.ThreadPoolExecutor(concurrency)
        self.seq = 0
        for name, data in enrol.items():
            r = self.client.post("/v1/subjects", json={"name": f"bench-{name}-{time.time_ns()}"})
            r.raise_for_status()
            r = self.client.post(f"/v1/subjects/{r.json()['id']}/faces", files={"image": ("e.jpg", data)})
            r.raise_for_status()
            self.seq = max(self.seq, r.json()["seq"])

    def one(self, data: bytes) -> tuple[float, dict[str, float]]:
        t0 = time.perf_counter()
        r = self.client.post("/v1/identify", params={"min_seq": self.seq}, content=data,
                             headers={"content-type": "image/jpeg"})
        r.raise_for_status()
        return (time.perf_counter() - t0) * 1000, r.json()["timings_ms"]

    def latency(self, images: list[bytes], stages: dict[str, list[float]]) -> list[float]:
        out = []
        for data in images:
            ms, server = self.one(data)
            out.append(ms)
            for k, v in server.items():
                stages.setdefault(k, []).append(v)
        return out

    def throughput(self, images: list[bytes], latencies: list[float]) -> float:
        t0 = time.perf_counter()
        latencies.extend(ms for ms, _ in self.pool.map(self.one, images))
        return len(images) / (time.perf_counter() - t0)


def _table(title: str, stages: dict[str, list[float]]) -> None:
    print(title)
    print(f"{'stage':8} {'p50 ms':>9} {'p95 ms':>9}")
    for k, v in stages.items():
        print(f"{k:8} {_pct(v, 50):9.2f} {_pct(v, 95):9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=None, help="an already running faceserve")
    ap.add_argument("--requests", type=int, default=40, help="identify requests per phase")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating in-process/HTTP rounds: both sides see the same machine load")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="inference threads in-process (replicas use 1)")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 2,
                    help="parallel in-process pipelines for the throughput baseline")
    args = ap.parse_args()

    photos = _photos()
    pool = [p.read_bytes() for ps in photos.values() for p in ps if p.suffix.lower() in (".jpg", ".jpeg")]
    work = [pool[i % len(pool)] for i in range(args.requests)]
    enrol = {name: ps[0].read_bytes() for name, ps in photos.items()}

    print(f"# faceserve pipeline benchmark — {args.requests} identify requests per phase, "
          f"{len(pool)} distinct photos, {args.rounds} alternating rounds")
    local = LocalBaseline(list(enrol.values()), args.threads, args.cores)
    local.latency(work[:3], {})  # warm-up

    from benchmarks import cpu_account
    from benchmarks.live_app import running_app

    local_stages: dict[str, list[float]] = {}
    http_stages: dict[str, list[float]] = {}
    rounds: list[tuple[float, float, float, float]] = []
    conc_lat: list[float] = []
    cpu_local = cpu_client = 0.0
    cpu_cluster: dict[str, float] = {}
    with running_app(args.url) as url:
        http = HttpSide(url, enrol, args.concurrency)
        http.latency(work[:3], {})  # warm-up
        procs = [] if args.url else cpu_account.cluster_processes("/tmp/ray-faceserve-bench")
        for _ in range(args.rounds):
            # Each round measures both sides back to back, so a busy spell on a
            # shared machine weighs on both rather than on one.
            l_lat = _pct(local.latency(work, local_stages), 50)
            h_lat = _pct(http.latency(work, http_stages), 50)
            c0 = cpu_account.self_cpu()
            l_tp = local.throughput(work)
            c1 = cpu_account.self_cpu()
            before = cpu_account.snapshot(procs)
            h_tp = http.throughput(work, conc_lat)
            c2 = cpu_account.self_cpu()
            for k, v in cpu_account.diff(cpu_account.snapshot(procs), before).items():
                cpu_cluster[k] = cpu_cluster.get(k, 0.0) + v
            cpu_local += c1 - c0
            cpu_client += c2 - c1
            rounds.append((l_lat, h_lat, l_tp, h_tp))
            print(f"round: in-process p50 {l_lat:.1f} ms, {l_tp:.2f}/s ({args.cores} pipelines); "
                  f"HTTP p50 {h_lat:.1f} ms, {h_tp:.2f}/s (concurrency {args.concurrency}); "
                  f"ratio {h_tp / l_tp:.2f}, overhead {h_lat - l_lat:.1f} ms")
        print(f"\nHTTP at concurrency {args.concurrency}: p50 {_pct(conc_lat, 50):.1f} ms, "
              f"p95 {_pct(conc_lat, 95):.1f} ms  ({url})")
    _table(f"\n## in-process (the service's code in one process, {args.threads} thread, "
           f"gallery of {len(enrol)} enrolled faces), sequential", local_stages)
    _table("\n## over HTTP through Ray Serve, sequential (server-reported timings_ms)", http_stages)
    n = len(work) * len(rounds)
    if cpu_cluster:
        print(f"\n## CPU per identify at concurrency {args.concurrency} (ms, all rounds; load-independent)")
        for k, v in sorted(cpu_cluster.items(), key=lambda kv: -kv[1]):
            print(f"{k:28} {v * 1000 / n:8.2f}")
        served = sum(cpu_cluster.values()) * 1000 / n
        print(f"{'serving total':28} {served:8.2f}")
        print(f"{'benchmark client':28} {cpu_client * 1000 / n:8.2f}")
        print(f"{'in-process pipeline':28} {cpu_local * 1000 / n:8.2f}")
        print(f"CPU ratio in-process/served: {cpu_local / max(1e-9, sum(cpu_cluster.values())):.2f}")
    ratio = float(np.median([h / l for _, _, l, h in rounds]))
    overhead = float(np.median([h - l for l, h, _, _ in rounds]))
    print("\n## ratios (HTTP / in-process, medians over the rounds of this run)")
    print(f"HTTP/in-process: throughput ratio {ratio:.2f} at concurrency {args.concurrency}, "
          f"p50 overhead {overhead:.1f} ms")


if __name__ == "__main__":
    main()
