"""Identify's search stage with 1 vs 2 matcher shards, through the real Serve app.

One Ray cluster and one database; the app is deployed alternately with
matcher_shards 1 and 2 (rounds 1, 2, 1, 2, ...), so a busy spell on a shared
machine weighs on both. The same photo is identified over and over: after
the first request its detection and vectors come from the embedding cache
(Redis), so only the ingress and the matcher(s) run, and the request's wall
time is the search stage plus the HTTP/ingress overhead. Printed per shard
count: p50/p95 of the wall time and of the matchers' own `search` timing
(the slowest shard's), and the ratios 2 shards / 1 shard.

    flock /tmp/faceserve-ray.lock python -m benchmarks.matcher_shards [--requests 200 --rounds 2]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.live_app import ADMIN_DSN, PORTS, SHARED
from serve_app import cluster
from tests.pgtools import create_database, drop_database

REDIS_URL = "redis://127.0.0.1:6379/0"
FIXED = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}


def _deploy(dsn: str, workdir: Path, shards: int) -> None:
    config = cluster.deploy_config(
        {"database_url": dsn, "object_store_url": f"file://{workdir / 'objects'}",
         "models_dir": str(SHARED / "models"), "redis_url": REDIS_URL,
         "redis_prefix": f"bench-shards-{workdir.name}", "matcher_shards": shards},
        PORTS, overrides={name: FIXED for name in ("Ingress", "Detector", "Embedder", "Liveness", "Matcher")})
    cluster.serve_deploy(config, PORTS, workdir)
    want = {"matcher"} if shards == 1 else {"matcher", *(f"matcher-{s}" for s in range(shards))}
    deadline = time.monotonic() + 420
    while time.monotonic() < deadline:  # ready, and the graph with this many shards answers
        try:
            with urllib.request.urlopen(f"{PORTS.http_url}/readyz", timeout=5) as resp:
                body = json.loads(resp.read())
            if body.get("ready") and {k for k in body["checks"] if k.startswith("matcher")} == want:
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the app with {shards} matcher shard(s) did not become ready")


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _enrol(client: httpx.Client) -> tuple[Path, int]:
    people = {d.name: sorted(d.iterdir()) for d in sorted((SHARED / "faces" / "people").iterdir()) if d.is_dir()}
    seq = 0
    for name, photos in people.items():
        sid = client.post("/v1/subjects", json={"name": name}).raise_for_status().json()["id"]
        for photo in photos[:1]:
            r = client.post(f"/v1/subjects/{sid}/faces", files={"image": (photo.name, photo.read_bytes())})
            seq = max(seq, r.raise_for_status().json()["seq"])
    return people["obama"][1], seq


def _measure(client: httpx.Client, probe: Path, seq: int, n: int, wall: list[float], search: list[float]) -> None:
    data = probe.read_bytes()
    for i in range(n + 5):
        t0 = time.perf_counter()
        r = client.post("/v1/identify", params={"min_seq": seq}, files={"image": (probe.name, data)})
        ms = (time.perf_counter() - t0) * 1000.0
        body = r.raise_for_status().json()
        if i < 5:  # warm-up: fills the cache, wakes the new replicas
            continue
        if "cache" not in body["timings_ms"]:  # the ingress had not learnt the model identity yet
            print(f"  (not a cache hit, left out: stages {sorted(body['timings_ms'])})")
            continue
        wall.append(ms)
        search.append(float(body["timings_ms"]["search"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200, help="identify requests per round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per shard count, alternating")
    args = ap.parse_args()
    dbname, dsn = create_database("faceserve_bench_shards", ADMIN_DSN)
    workdir = Path(tempfile.mkdtemp(prefix="faceserve-bench-shards-"))
    started = False
    results: dict[int, tuple[list[float], list[float]]] = {1: ([], []), 2: ([], [])}
    try:
        if not cluster.ray_running(PORTS):
            cluster.start_ray_head(PORTS, num_cpus=4, temp_dir="/tmp/ray-faceserve-bench")
            started = True
        probe, seq = Path(), 0
        for r in range(args.rounds):
            for shards in (1, 2):
                _deploy(dsn, workdir, shards)
                with httpx.Client(base_url=PORTS.http_url, timeout=60) as client:
                    if not seq:
                        probe, seq = _enrol(client)
                    _measure(client, probe, seq, args.requests, *results[shards])
                print(f"round {r + 1}, {shards} shard(s): wall p50 {_pct(results[shards][0][-args.requests:], 50):.2f} ms",
                      flush=True)
    finally:
        cluster.serve_shutdown(PORTS)
        if started:
            cluster.stop_ray("/tmp/ray-faceserve-bench", gcs_port=PORTS.gcs)
        drop_database(dbname, ADMIN_DSN)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n# identify, embedding-cache hits (ingress + matcher search only), {args.requests} requests "
          f"x {args.rounds} rounds per shard count, sequential")
    print(f"{'shards':6} {'wall p50':>9} {'wall p95':>9} {'search p50':>11} {'search p95':>11}")
    for shards, (wall, search) in results.items():
        print(f"{shards:6} {_pct(wall, 50):9.2f} {_pct(wall, 95):9.2f} {_pct(search, 50):11.3f} {_pct(search, 95):11.3f}")
    (w1, s1), (w2, s2) = results[1], results[2]
    print(f"2 shards / 1 shard: wall p50 x{_pct(w2, 50) / _pct(w1, 50):.2f}, wall p95 x{_pct(w2, 95) / _pct(w1, 95):.2f}, "
          f"added wall p50 {_pct(w2, 50) - _pct(w1, 50):+.2f} ms")


if __name__ == "__main__":
    main()
