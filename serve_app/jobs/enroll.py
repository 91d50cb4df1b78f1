"""Bulk enrolment as a Ray job.

    ray job submit --address http://127.0.0.1:8265 -- \\
        python -m serve_app.jobs.enroll --source /data/people --collection staff

Sources: a folder `<subject>/<images>` (local or an fsspec URL such as
s3://bucket/prefix), or a CSV/JSONL manifest (serve_app/jobs/sources.py).
The listing is cut into segments; each segment runs as a streaming Ray Data
pipeline: read_batch tasks (bytes, sha256, format) -> EnrolWorker actors
(skip what is enrolled, detect, gates, embed, write crops and rows). Memory
is bounded by the segment's listing plus Ray Data's in-flight blocks.
Idempotent and resumable (serve_app/jobs/keys.py); the report goes to the
job's output and to object storage. Exit 1 when some images failed (storage
or database trouble): submitting again retries just those.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time

from serve_app.jobs.report import Report, store_report
from serve_app.jobs.sources import SourceError, list_items, segments

log = logging.getLogger("faceserve.jobs.enroll")
READ_CPUS = 0.25


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve_app.jobs.enroll", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="folder/prefix of <subject>/<images>, or a .csv/.jsonl manifest")
    p.add_argument("--collection", required=True)
    p.add_argument("--tenant", default="default")
    p.add_argument("--model", default="sface",
                   help="the embedder of a collection this job creates; an existing one is enrolled with its own")
    p.add_argument("--liveness", choices=["off", "flag", "block"], default="off")
    p.add_argument("--largest", action="store_true", help="enrol the largest face of a group photo")
    p.add_argument("--min-quality", type=float, default=0.5,
                   help="refuse faces below this quality score (0.5 = no quality reasons; 0 = off)")
    p.add_argument("--dry-run", action="store_true", help="run every check, write nothing but the report")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=0,
                   help="model actors (default: as many as the cluster's free CPUs hold, leaving room to read)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--segment-size", type=int, default=20000, help="source items listed at a time")
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    p.add_argument("--object-store-url", default=os.environ.get("FACESERVE_OBJECT_STORE_URL"))
    p.add_argument("--models-dir", default=os.environ.get("FACE_MODELS_DIR"))
    p.add_argument("--report-key", default=None, help="object key of the report (default reports/enroll/...)")
    p.add_argument("--data-dir", default=None,
                   help="with neither URL given: the data folder of `faceserve start` (embedded PostgreSQL, "
                        "objects under it), as an absolute path; the job's working folder is not yours")
    args = p.parse_args(argv)
    from serve_app.deployment_config import EMBEDDER_NAMES

    if args.model not in EMBEDDER_NAMES:
        p.error(f"--model must be one of {', '.join(EMBEDDER_NAMES)}")
    if args.batch_size < 1 or args.concurrency < 0 or args.segment_size < 1 or args.cpus_per_worker <= 0:
        p.error("--batch-size and --segment-size must be >= 1, --concurrency >= 0, --cpus-per-worker > 0")
    if not 0.0 <= args.min_quality <= 1.0:
        p.error("--min-quality must be in [0, 1]")
    return args


def _defaults_from_data_dir(args: argparse.Namespace) -> None:
    """What `faceserve start` uses when DATABASE_URL / the object store are not set.

    May start the embedded PostgreSQL, so main() calls it, not parse_args():
    checking a command line must not start a server."""
    if args.database_url and args.object_store_url:
        return
    from pathlib import Path

    from serve_app.settings import load_settings

    settings = load_settings()
    data_dir = Path(args.data_dir or settings.data_dir).resolve()
    if not args.database_url:
        if settings.database_url is not None:
            args.database_url = settings.database_dsn()
        else:
            from serve_app.embedded_pg import start_embedded_postgres

            args.database_url = start_embedded_postgres(data_dir)  # attaches to the running one
    if not args.object_store_url:
        url = settings.object_store_url
        args.object_store_url = f"file://{data_dir / 'objects'}" if url == "file://./data/objects" else url


async def _ensure_collection(args: argparse.Namespace) -> None:
    """Create the collection if missing; the workers embed with its model."""
    from models.embedding import EMBEDDERS
    from serve_app.gallery.repository import GalleryRepository, create_pool

    pool = await create_pool(args.database_url, min_size=1, max_size=1)
    try:
        repo = GalleryRepository(pool)
        found = await repo.get_collection(args.collection, args.tenant)
        if found is None:
            if args.dry_run:
                return
            found = await repo.create_collection(args.collection, args.model, EMBEDDERS[args.model].dim, args.tenant)
        args.model = found.embedder
    finally:
        await pool.close()


def run(args: argparse.Namespace) -> Report:
    import ray
    import ray.data

    from serve_app.jobs.worker import EnrolWorker, read_batch

    options = {k: v for k, v in vars(args).items() if k not in ("database_url",)}
    report = Report(options=options)
    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own progress lines read better in a job log
    asyncio.run(_ensure_collection(args))
    if not args.concurrency:
        # Leave READ_CPUS free: actors holding every CPU would starve the read tasks.
        free = float(ray.available_resources().get("CPU", 1.0))
        args.concurrency = max(1, min(8, int((free - READ_CPUS) // args.cpus_per_worker)))
    print(f"{args.concurrency} model actors x {args.cpus_per_worker} CPU", flush=True)
    worker_kwargs = dict(database_url=args.database_url, object_store_url=args.object_store_url,
                         collection=args.collection, tenant=args.tenant, model=args.model, liveness=args.liveness,
                         largest=args.largest, min_quality=args.min_quality, dry_run=args.dry_run,
                         models_dir=args.models_dir, threads=max(1, int(args.cpus_per_worker)))
    last = time.monotonic()
    print(f"enrolling {args.source} into {args.tenant}/{args.collection} ({args.model})"
          + (" (dry run: nothing is written)" if args.dry_run else ""), flush=True)
    for n, chunk in enumerate(segments(list_items(args.source), args.segment_size)):
        print(f"segment {n}: {len(chunk)} images listed", flush=True)
        blocks = max(1, min(-(-len(chunk) // args.batch_size), 1000))
        ds = (ray.data.from_items([it.to_row() for it in chunk], override_num_blocks=blocks)
              .map_batches(read_batch, batch_size=args.batch_size, num_cpus=READ_CPUS)
              .map_batches(EnrolWorker, fn_constructor_kwargs=worker_kwargs, batch_size=args.batch_size,
                           compute=ray.data.ActorPoolStrategy(size=args.concurrency),
                           num_cpus=args.cpus_per_worker))
        del chunk
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            for row in batch.to_dict("records"):
                report.add(row)
            if time.monotonic() - last >= 5.0:
                print(report.progress_line(), flush=True)
                last = time.monotonic()
    return report


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    _defaults_from_data_dir(args)
    try:
        report = run(args)
    except SourceError as exc:
        print(f"bad source: {exc}", file=sys.stderr)
        return 2
    print(report.progress_line(), flush=True)
    key = store_report(report, args, "enroll")
    summary = report.summary()
    for row in report.problems()[:50]:
        print(f"  {row['status']} {row['reason']}: {row['uri']} {row['detail']}".rstrip())
    print(f"report: {args.object_store_url.rstrip('/')}/{key}")
    print("REPORT " + json.dumps({"report_key": key, **summary}), flush=True)
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
