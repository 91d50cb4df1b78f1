"""Bulk enrolment job vs one-by-one HTTP enrolment, on the same images, in one run.

Makes a few thousand distinct photos from ../shared/faces/people by
augmentation (flip, crop, scale, brightness, JPEG quality; each a new sha256),
laid out as <subject>/<images>, starts a real faceserve (Ray head + serve
deploy + a throwaway database), then:

  - job: `ray job submit` of serve_app.jobs.enroll over all of them; the rate
    is images / wall time of the submission (startup of the driver and the
    model actors included);
  - HTTP: `faceserve enroll-folder` (the CLI, one request per photo) over the
    first --http-images of them, into another collection; rate = images / wall.

Both use the same gates (liveness block, quality bar 0.5). Ends with
    bulk/one-by-one: ratio R (job X img/s, HTTP Y img/s)

    python benchmarks/bulk_enroll.py [--images 2000] [--http-images 200]
Run it under the shared Ray lock on a shared machine.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageEnhance

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from serve_app import cluster  # noqa: E402
from tests.pgtools import create_database, drop_database  # noqa: E402

SHARED = ROOT.parent / "shared"
PORTS = cluster.ClusterPorts(gcs=6396, dashboard=8286, metrics=8096, http=18110)
TEMP = "/tmp/ray-faceserve-bench-bulk"


def augment(src: Image.Image, rng: random.Random) -> bytes:
    im = src
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    w, h = im.size
    f = rng.uniform(0.85, 1.0)  # crop that keeps the (roughly central) face
    cw, ch = int(w * f), int(h * f)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    im = im.crop((x, y, x + cw, y + ch))
    side = rng.randint(360, 900)  # scale: long side in pixels
    s = side / max(im.size)
    im = im.resize((max(1, int(im.width * s)), max(1, int(im.height * s))), Image.Resampling.BILINEAR)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.75, 1.25))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=rng.randint(55, 95))
    return buf.getvalue()


def make_images(dest: Path, n: int, per_subject: int, seed: int = 7) -> list[Path]:
    rng = random.Random(seed)
    people = sorted(p for p in (SHARED / "faces" / "people").iterdir() if p.is_dir())
    sources = [(p.name, Image.open(f).convert("RGB")) for p in people for f in sorted(p.iterdir())]
    out: list[Path] = []
    for i in range(n):
        name, im = sources[(i // per_subject) % len(sources)]
        subject = dest / f"{name}_{i // per_subject:04d}"
        subject.mkdir(parents=True, exist_ok=True)
        path = subject / f"{i:05d}.jpg"
        path.write_bytes(augment(im, rng))
        out.append(path)
    return out


@contextlib.contextmanager
def app(workdir: Path) -> Iterator[tuple[str, str]]:
    dbname, dsn = create_database("faceserve_bench_bulk")
    try:
        if not cluster.ray_running(PORTS):
            cluster.start_ray_head(PORTS, num_cpus=4, temp_dir=TEMP)
        config = cluster.deploy_config({"database_url": dsn, "object_store_url": f"file://{workdir / 'objects'}",
                                        "models_dir": str(SHARED / "models")}, PORTS)
        cluster.serve_deploy(config, PORTS, workdir)
        cluster.wait_ready(PORTS.http_url, timeout_s=420)
        yield dsn, f"file://{workdir / 'objects'}"
    finally:
        cluster.serve_shutdown(PORTS)
        cluster.stop_ray(TEMP, gcs_port=PORTS.gcs)
        drop_database(dbname)


def run_job(folder: Path, dsn: str, objects: str, args: argparse.Namespace) -> tuple[float, dict]:
    cmd = [cluster._bin("ray"), "job", "submit", "--address", PORTS.dashboard_url,
           "--submission-id", f"bench-{uuid.uuid4().hex[:6]}", "--",
           sys.executable, "-m", "serve_app.jobs.enroll", "--source", str(folder), "--collection", "bench_job",
           "--liveness", "block", "--database-url", dsn, "--object-store-url", objects,
           "--models-dir", str(SHARED / "models"), "--report-key", "reports/bench.json",
           "--batch-size", str(args.batch_size)]
    if args.concurrency:
        cmd += ["--concurrency", str(args.concurrency)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=cluster.ray_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("REPORT ")), None)
    if line is None:
        sys.exit(f"the job printed no report:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return wall, json.loads(line[len("REPORT "):])


def run_http(folder: Path, n: int) -> tuple[float, int]:
    # The same photos, the first n of them, in the same layout.
    sub = folder.parent / "http"
    done = 0
    for subject in sorted(folder.iterdir()):
        for photo in sorted(subject.iterdir()):
            if done == n:
                break
            (sub / subject.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, sub / subject.name / photo.name)
            done += 1
    import httpx

    r = httpx.post(f"{PORTS.http_url}/v1/collections", json={"name": "bench_http"}, timeout=30)
    if r.status_code != 201:
        sys.exit(f"could not create the HTTP collection: {r.status_code} {r.text}")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "serve_app.cli", "enroll-folder", str(sub), "--url", PORTS.http_url,
                          "--collection", "bench_http", "--liveness", "block"], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    summary = (out.stdout.strip().splitlines() or [""])[-1]
    if not summary.startswith("enrolled "):
        sys.exit(f"enroll-folder failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    print("  HTTP:", summary)
    return wall, done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--http-images", type=int, default=200)
    p.add_argument("--per-subject", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=0)
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="faceserve-bench-bulk-"))
    try:
        folder = workdir / "images"
        t0 = time.perf_counter()
        paths = make_images(folder, args.images, args.per_subject)
        print(f"made {len(paths)} augmented images ({sum(p.stat().st_size for p in paths) / 1e6:.1f} MB) "
              f"in {time.perf_counter() - t0:.0f}s")
        with app(workdir) as (dsn, objects):
            wall, rep = run_job(folder, dsn, objects, args)
            job_rate = rep["total"] / wall
            print(f"  job: {rep['total']} images in {wall:.1f}s wall ({rep['enrolled']} enrolled, "
                  f"{rep['rejected']} rejected {rep['rejected_by_reason']}, {rep['failed']} failed); "
                  f"the job's own rate after startup of its driver: {rep['images_per_s']} img/s")
            http_wall, n_http = run_http(folder, args.http_images)
            http_rate = n_http / http_wall
            print(f"  HTTP: {n_http} images in {http_wall:.1f}s wall")
        print(f"bulk/one-by-one: ratio {job_rate / http_rate:.2f} (job {job_rate:.2f} img/s, HTTP {http_rate:.2f} img/s)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
