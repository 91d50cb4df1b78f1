"""The cost of identify's shape on Ray Serve alone, with no model work.

A stand-in app with the same hops as identify: an HTTP ingress (FastAPI,
behind the same HTTP edge the service uses, see serve_app.cluster.ray_env)
that sends the image bytes to a "detector", gets back one 112x112x3 crop,
sends it to an "embedder", gets back one 128-d vector, and sends that to a
"matcher". No stage computes anything, so what this measures is Serve's own
per-request cost for that shape on this machine: the floor under
benchmarks/pipeline.py's HTTP/in-process comparison.

    python benchmarks/serve_floor.py [--requests 300] [--concurrency 4]

Prints the sequential p50/p95, the rate at --concurrency, and the CPU each
cluster process spends per request. Run it under the shared Ray lock.
"""
import argparse
import concurrent.futures as cf
import os
import sys
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from serve_app import cluster  # noqa: E402

PORTS = cluster.ClusterPorts(gcs=6398, dashboard=8288, metrics=8098, http=18120)
TEMP = "/tmp/ray-faceserve-bench-floor"


def build_app():  # type: ignore[no-untyped-def]
    # No `from __future__ import annotations` in this file: the app is pickled
    # by value, and FastAPI must see the route's Request annotation as a class.
    from ray import serve
    from ray.serve.handle import DeploymentHandle

    @serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=8)
    class Detector:
        def analyse(self, data: bytes) -> np.ndarray:
            return np.zeros((1, 112, 112, 3), np.uint8)

    @serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=8)
    class Embedder:
        def embed(self, crops: np.ndarray) -> np.ndarray:
            return np.zeros((len(crops), 128), np.float32)

    @serve.deployment(ray_actor_options={"num_cpus": 0.2}, max_ongoing_requests=16)
    class Matcher:
        def search(self, vectors: np.ndarray) -> list[dict]:
            return [{"subject": "x", "score": 0.5} for _ in range(len(vectors))]

    web = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16)
    @serve.ingress(web)
    class Ingress:
        def __init__(self, detector: DeploymentHandle, embedder: DeploymentHandle,
                     matcher: DeploymentHandle) -> None:
            self.detector, self.embedder, self.matcher = detector, embedder, matcher

        @web.post("/v1/identify")
        async def identify(self, request: Request) -> dict:
            data = await request.body()
            crops = await self.detector.analyse.remote(data)
            vectors = await self.embedder.embed.remote(crops)
            hits = await self.matcher.search.remote(vectors)
            return {"faces": hits}

    return Ingress.bind(Detector.bind(), Embedder.bind(), Matcher.bind())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args()
    import httpx
    import ray
    from ray import serve

    from benchmarks import cpu_account

    photo = next((ROOT.parent / "shared" / "faces" / "people").rglob("*.jpg")).read_bytes()
    cluster.start_ray_head(PORTS, num_cpus=4, temp_dir=TEMP)
    try:
        ray.init(address=f"127.0.0.1:{PORTS.gcs}", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": PORTS.http})
        serve.run(build_app(), name="floor", route_prefix="/")
        client = httpx.Client(base_url=PORTS.http_url, timeout=60,
                              limits=httpx.Limits(max_connections=args.concurrency + 2))

        def one(_: int) -> float:
            t0 = time.perf_counter()
            r = client.post("/v1/identify", content=photo, headers={"content-type": "image/jpeg"})
            r.raise_for_status()
            return (time.perf_counter() - t0) * 1000

        for i in range(20):  # warm-up
            one(i)
        seq = [one(i) for i in range(args.requests)]
        procs = cpu_account.cluster_processes(TEMP)
        before = cpu_account.snapshot(procs)
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(args.concurrency) as pool:
            conc = list(pool.map(one, range(args.requests)))
        rate = args.requests / (time.perf_counter() - t0)
        cpu = cpu_account.diff(cpu_account.snapshot(procs), before)
    finally:
        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            cluster.stop_ray(TEMP, gcs_port=PORTS.gcs)
    edge = "HAProxy + direct ingress" if cluster.ray_env().get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "Python proxy"
    print(f"# identify's shape on Ray Serve with no model work ({edge}), {len(photo)} B image")
    print(f"sequential: p50 {np.percentile(seq, 50):.1f} ms, p95 {np.percentile(seq, 95):.1f} ms")
    print(f"concurrency {args.concurrency}: {rate:.1f} req/s, p50 {np.percentile(conc, 50):.1f} ms")
    print("\n## CPU per request at that concurrency (ms)")
    for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]):
        print(f"{k:28} {v * 1000 / args.requests:8.2f}")
    total = sum(cpu.values()) * 1000 / args.requests
    print(f"{'serving total':28} {total:8.2f}")
    print(f"\nServe floor for identify's shape: p50 {np.percentile(seq, 50):.1f} ms, "
          f"CPU {total:.1f} ms per request ({edge})")


if __name__ == "__main__":
    main()
