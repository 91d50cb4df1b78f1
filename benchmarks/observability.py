"""What metrics and tracing cost: identify latency with them ON against OFF.

    python benchmarks/observability.py [--blocks 8] [--per-block 20] [--warmup N] [--wait S]

ON  = metrics_enabled=True,  trace_exporter="otlp" (to an OTLP/HTTP receiver
      started here on loopback, tests/integration/otlp_receiver.py)
OFF = metrics_enabled=False, trace_exporter="none"

Both configurations run at the same time as two applications of one Ray
cluster (the benchmark ports of benchmarks/live_app.py): "faceserve" (ON) at
/ and "faceserve-off" (OFF) at /off, one replica per deployment each, one
database. Sequential identify requests go in blocks that alternate ON, OFF,
ON, OFF ... (the first block of each pair alternating too), so drift of the
machine (other load, caches, CPU frequency) falls on both alike. After every
block the client waits a little longer than the span exporter's schedule
delay, so spans batched in an ON block are exported before the next block
starts and do not land on an OFF block. A few people are enrolled first
(through each app in turn), then each app gets warm-up requests.

What OFF still has: Ray Serve's own metrics (ray_serve_*, always on) and
the JSON access log. So the difference is faceserve's own metrics and the
OpenTelemetry spans (creation, context propagation in every message, export).
The receiver runs on this machine, so its protobuf parsing competes for the
same CPUs as the ON app; a real collector would sit elsewhere.

Prints p50/p95/mean per configuration and the ON/OFF ratios. Figures only.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("FACESERVE_SHARED_DIR", ROOT.parent / "shared"))
os.environ.setdefault("FACE_MODELS_DIR", str(SHARED / "models"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from benchmarks.live_app import ADMIN_DSN, PORTS  # noqa: E402
from serve_app import cluster  # noqa: E402
from tests.pgtools import create_database, drop_database  # noqa: E402
from tests.integration.otlp_receiver import OTLPReceiver  # noqa: E402

TEMP_DIR = "/tmp/ray-faceserve-bench"
ON, OFF = "on", "off"
PREFIX = {ON: "", OFF: "/off"}
APP_NAME = {ON: "faceserve", OFF: "faceserve-off"}
SCHEDULE_DELAY_MS = 2000  # the app's default trace_schedule_delay_ms
# One replica each, so both apps are the same shape and nothing autoscales.
FIXED = {
    name: {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    for name in ("Ingress", "Detector", "Embedder", "Liveness", "Matcher")
}


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def _port_busy(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_for_ports(wait_s: float) -> None:
    """Never deploy over somebody else's benchmark cluster on these ports."""
    deadline = time.monotonic() + wait_s
    while any(_port_busy(p) for p in (PORTS.http, PORTS.gcs, PORTS.dashboard)):
        if time.monotonic() > deadline:
            sys.exit(f"ports {PORTS.http}/{PORTS.gcs}/{PORTS.dashboard} are in use (another benchmark?); "
                     "try again later or pass --wait")
        print(f"benchmark ports in use, waiting ... ({int(deadline - time.monotonic())} s left)", flush=True)
        time.sleep(30)


@contextlib.contextmanager
def both_apps(receiver: OTLPReceiver) -> Iterator[str]:
    """A Ray head with the ON and OFF apps deployed side by side; yields the base URL."""
    dbname, dsn = create_database("faceserve_bench", ADMIN_DSN)
    workdir = Path(tempfile.mkdtemp(prefix="faceserve-bench-"))
    common = {
        "database_url": dsn,
        "object_store_url": f"file://{workdir / 'objects'}",
        "models_dir": str(SHARED / "models"),
    }
    args = {
        ON: {**common, "metrics_enabled": True, "trace_exporter": "otlp",
             "otlp_endpoint": receiver.endpoint, "trace_schedule_delay_ms": SCHEDULE_DELAY_MS},
        OFF: {**common, "metrics_enabled": False, "trace_exporter": "none"},
    }
    config = cluster.deploy_config(args[ON], PORTS, overrides=FIXED)
    off_app = cluster.deploy_config(args[OFF], PORTS, overrides=FIXED)["applications"][0]
    off_app.update(name=APP_NAME[OFF], route_prefix=PREFIX[OFF])
    config["applications"].append(off_app)
    try:
        t0 = time.perf_counter()
        cluster.start_ray_head(PORTS, num_cpus=4, temp_dir=TEMP_DIR)
        cluster.serve_deploy(config, PORTS, workdir)
        for mode in (ON, OFF):
            cluster.wait_ready(PORTS.http_url + PREFIX[mode], timeout_s=420)
        print(f"both apps ready after {time.perf_counter() - t0:.0f} s", flush=True)
        yield PORTS.http_url
    finally:
        cluster.serve_shutdown(PORTS)
        cluster.stop_ray(TEMP_DIR)
        drop_database(dbname, ADMIN_DSN)
        shutil.rmtree(workdir, ignore_errors=True)


def _photos() -> dict[str, list[Path]]:
    root = SHARED / "faces" / "people"
    return {d.name: sorted(p for p in d.iterdir() if p.is_file()) for d in sorted(root.iterdir()) if d.is_dir()}


def _metric_apps(text: str, name: str) -> set[str]:
    import re

    return set(re.findall(rf'^{name}{{[^}}]*application="([^"]*)"', text, re.M))


def run(args: argparse.Namespace) -> None:
    import httpx

    photos = _photos()
    work = [(p.name, p.read_bytes()) for ps in photos.values() for p in ps]
    enrol = {name: ps[0].read_bytes() for name, ps in photos.items()}
    receiver = OTLPReceiver().start()
    lat: dict[str, list[float]] = {ON: [], OFF: []}
    blocks: list[tuple[str, float]] = []
    try:
        with both_apps(receiver) as url, httpx.Client(base_url=url, timeout=120) as client:
            # Enrol, alternating the app that does it; one database, so both
            # apps' matchers see the same gallery.
            seq = 0
            for i, (name, data) in enumerate(enrol.items()):
                prefix = PREFIX[(ON, OFF)[i % 2]]
                r = client.post(f"{prefix}/v1/subjects", json={"name": f"bench-{name}-{uuid.uuid4().hex[:6]}"})
                r.raise_for_status()
                r = client.post(f"{prefix}/v1/subjects/{r.json()['id']}/faces", files={"image": ("e.jpg", data)})
                r.raise_for_status()
                seq = max(seq, r.json()["seq"])

            def identify(mode: str, item: tuple[str, bytes]) -> float:
                t0 = time.perf_counter()
                r = client.post(f"{PREFIX[mode]}/v1/identify", params={"min_seq": seq},
                                files={"image": (item[0], item[1])})
                ms = (time.perf_counter() - t0) * 1000.0
                r.raise_for_status()
                assert r.json()["faces"], item[0]
                return ms

            for mode in (ON, OFF):
                for i in range(len(work) if args.warmup is None else args.warmup):
                    identify(mode, work[i % len(work)])
            time.sleep(SCHEDULE_DELAY_MS / 1000 + 0.5)
            spans_before = len(receiver.spans)
            t_start = time.perf_counter()
            for b in range(args.blocks):
                order = (ON, OFF) if b % 2 == 0 else (OFF, ON)
                first = b * args.per_block  # both blocks of a pair send the same photos
                for mode in order:
                    values = []
                    for k in range(first, first + args.per_block):
                        values.append(identify(mode, work[k % len(work)]))
                    lat[mode] += values
                    blocks.append((mode, statistics.median(values)))
                    time.sleep(SCHEDULE_DELAY_MS / 1000 + 0.5)
            measured_s = time.perf_counter() - t_start
            time.sleep(SCHEDULE_DELAY_MS / 1000 + 0.5)
            spans = receiver.spans[spans_before:]
            # Ray's metrics export lags; give the app's first series a moment.
            text = ""
            for _ in range(15):
                with urllib.request.urlopen(f"http://127.0.0.1:{PORTS.metrics}/metrics", timeout=10) as resp:
                    text = resp.read().decode()
                if "ray_faceserve_stage_latency_ms_count" in text:
                    break
                time.sleep(2)
    finally:
        receiver.stop()

    services = sorted({s.service for s in spans})
    print(f"\n# identify latency, observability ON vs OFF - {args.blocks} block pairs x {args.per_block} "
          f"sequential requests per configuration ({measured_s:.0f} s measured)")
    print(f"ON : metrics_enabled=True, trace_exporter=otlp -> {len(spans)} spans received "
          f"from {services}")
    print("OFF: metrics_enabled=False, trace_exporter=none")
    print("faceserve metrics exported for applications: "
          f"{sorted(_metric_apps(text, 'ray_faceserve_stage_latency_ms_count'))} "
          "(ray_serve_* exported for both: "
          f"{sorted(_metric_apps(text, 'ray_serve_num_http_requests_total'))})")
    print(f"\n{'config':6} {'n':>4} {'p50 ms':>9} {'p95 ms':>9} {'mean ms':>9}")
    for mode in (ON, OFF):
        v = lat[mode]
        print(f"{mode.upper():6} {len(v):4d} {_pct(v, 50):9.1f} {_pct(v, 95):9.1f} {statistics.fmean(v):9.1f}")
    on, off = lat[ON], lat[OFF]
    print(f"\nratio ON/OFF: p50 {_pct(on, 50) / _pct(off, 50):.3f}x, p95 {_pct(on, 95) / _pct(off, 95):.3f}x, "
          f"mean {statistics.fmean(on) / statistics.fmean(off):.3f}x")
    print(f"difference ON-OFF: p50 {_pct(on, 50) - _pct(off, 50):+.1f} ms, "
          f"mean {statistics.fmean(on) - statistics.fmean(off):+.1f} ms")
    pairs = [(blocks[i], blocks[i + 1]) for i in range(0, len(blocks), 2)]
    diffs = []
    for a, b in pairs:
        d = dict([a, b])
        diffs.append(d[ON] - d[OFF])
    print("block medians (ms), ON/OFF per pair: "
          + ", ".join(f"{dict([a, b])[ON]:.0f}/{dict([a, b])[OFF]:.0f}" for a, b in pairs))
    print(f"per-pair median difference ON-OFF: median {statistics.median(diffs):+.1f} ms, "
          f"range {min(diffs):+.1f} .. {max(diffs):+.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=8, help="ON/OFF block pairs")
    ap.add_argument("--per-block", type=int, default=20, help="sequential requests per block")
    ap.add_argument("--warmup", type=int, default=None,
                    help="warm-up requests per app (default: each photo once)")
    ap.add_argument("--wait", type=float, default=0, help="seconds to wait for busy benchmark ports")
    args = ap.parse_args()
    _wait_for_ports(args.wait)
    run(args)


if __name__ == "__main__":
    main()
