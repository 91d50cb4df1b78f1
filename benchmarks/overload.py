"""Overload benchmark: does the service shed load instead of queueing it?

    python benchmarks/overload.py [--url URL] [--base 4] [--factor 12] [--seconds 20]

Runs identify at a comfortable concurrency (--base) for --seconds, then at
--factor times that for as long, against a real app (started here unless
--url is given), and prints for each level: answers by status, goodput
(200s per second), p50/p95 of the admitted (200) requests and of the shed
(503/429) ones, and any 500s. Clients send raw image/jpeg bodies and honour
Retry-After, as a well-behaved client does. Ends with the ratios against the comfortable
level measured in the same run. Figures only, no assertions.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
os.environ.setdefault("FACE_MODELS_DIR", str(SHARED / "models"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def _level(url: str, photos: list[bytes], concurrency: int, seconds: float) -> dict[str, object]:
    import httpx

    statuses: Counter[int] = Counter()
    ok_ms: list[float] = []
    shed_ms: list[float] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker(w: int) -> None:
            i = w
            while time.perf_counter() < deadline:
                data = photos[i % len(photos)]
                i += concurrency
                t0 = time.perf_counter()
                try:
                    # Raw image/jpeg bodies: the client spends no CPU on multipart
                    # encoding, which on a 2-core machine would be measured as latency.
                    r = await client.post("/v1/identify", content=data, headers={"content-type": "image/jpeg"})
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0  # no answer at all (connection error, client timeout)
                ms = (time.perf_counter() - t0) * 1000
                statuses[status] += 1
                if status == 200:
                    ok_ms.append(ms)
                elif status in (429, 503):
                    shed_ms.append(ms)
                    # A well-behaved client honours Retry-After.
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    return {"statuses": dict(statuses), "ok": ok_ms, "shed": shed_ms, "goodput": len(ok_ms) / wall,
            "wall": wall}


def _print(name: str, concurrency: int, r: dict[str, object]) -> None:
    ok, shed = r["ok"], r["shed"]
    print(f"\n## {name}: concurrency {concurrency}, {r['wall']:.1f} s")
    print(f"answers by status: {r['statuses']}")
    print(f"goodput: {r['goodput']:.2f} identify/s")
    print(f"admitted (200): p50 {_pct(ok, 50):.1f} ms, p95 {_pct(ok, 95):.1f} ms, n={len(ok)}")
    if shed:
        print(f"shed (503/429): p50 {_pct(shed, 50):.1f} ms, p95 {_pct(shed, 95):.1f} ms, n={len(shed)}")
    print(f"500s: {sum(v for k, v in r['statuses'].items() if k >= 500 and k != 503)}, "
          f"no answer: {r['statuses'].get(0, 0)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=None)
    ap.add_argument("--base", type=int, default=4, help="comfortable concurrency")
    ap.add_argument("--factor", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=20.0)
    args = ap.parse_args()

    root = SHARED / "faces" / "people"
    photos = [p.read_bytes() for p in sorted(root.rglob("*")) if p.suffix.lower() == ".jpg"]
    from benchmarks.live_app import running_app

    with running_app(args.url) as url:
        import httpx

        with httpx.Client(base_url=url, timeout=120) as c:  # a small gallery, and warm replicas
            for i, data in enumerate(photos[:6]):
                sid = c.post("/v1/subjects", json={"name": f"overload-{i}-{time.time_ns()}"}).json()["id"]
                c.post(f"/v1/subjects/{sid}/faces", files={"image": ("e.jpg", data)}, data={"largest": "true"})
            for data in photos[:4]:
                c.post("/v1/identify", files={"image": ("w.jpg", data)})
        base = asyncio.run(_level(url, photos, args.base, args.seconds))
        high_c = args.base * args.factor
        high = asyncio.run(_level(url, photos, high_c, args.seconds))
    print(f"# faceserve overload benchmark — identify, {len(photos)} photos")
    _print("comfortable", args.base, base)
    _print(f"{args.factor}x overload", high_c, high)
    p95_base = _pct(base["ok"], 95)
    print("\n## at overload, against the comfortable level (same run)")
    print(f"admitted p95: {_pct(high['ok'], 95) / p95_base:.2f}x  ({_pct(high['ok'], 95):.1f} vs {p95_base:.1f} ms)")
    ratio = high["goodput"] / base["goodput"] if base["goodput"] else float("nan")
    print(f"goodput: {ratio:.2f}x  ({high['goodput']:.2f} vs {base['goodput']:.2f} /s)")
    print(f"shed p95: {_pct(high['shed'], 95):.1f} ms over {len(high['shed'])} shed requests")


if __name__ == "__main__":
    main()
