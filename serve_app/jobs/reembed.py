"""Re-embed a collection with another model, as a Ray job.

    ray job submit --address http://127.0.0.1:8265 -- \\
        python -m serve_app.jobs.reembed --collection staff --model sface_flip

Every face's vector is computed again from its stored crop with the new
model and staged beside the live ones (ReembedRepository.stage, a `stage`
log entry per face), so the matchers build the new index aside while
identify keeps answering from the old one. When every face has a staged
vector the collection is switched in one transaction (`switch`): same face
ids, the new model, the new vectors; each matcher swaps the prebuilt index
in at that log entry. Faces enrolled while the job ran are picked up in
another round before the switch. Killed at any point, submitted again, it
stages only what is missing; once switched, a rerun has nothing to do.
docs/BULK.md has the details and the report.

Exit status: 0 switched (or nothing to do), 1 not switched (faces that could
not be re-embedded or failed: see the report), 2 a bad request.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from typing import Any

from serve_app.jobs.report import ReembedReport, store_report

log = logging.getLogger("faceserve.jobs.reembed")
READ_CPUS = 0.25


class JobError(Exception):
    """A request the job cannot carry out (exit status 2)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from serve_app.deployment_config import EMBEDDER_NAMES

    p = argparse.ArgumentParser(prog="python -m serve_app.jobs.reembed", description=__doc__.split("\n\n")[0])
    p.add_argument("--collection", required=True)
    p.add_argument("--tenant", default="default")
    p.add_argument("--model", choices=EMBEDDER_NAMES, help="the embedder to move the collection to")
    p.add_argument("--no-switch", action="store_true", help="stage every face, but leave the switch to a later run")
    p.add_argument("--abort", action="store_true", help="drop the collection's staged re-embed and stop")
    p.add_argument("--max-rounds", type=int, default=5,
                   help="staging rounds for faces enrolled while the job runs, before giving up on the switch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=0,
                   help="model actors (default: as many as the cluster's free CPUs hold)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--segment-size", type=int, default=20000, help="faces listed at a time")
    p.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    p.add_argument("--object-store-url", default=os.environ.get("FACESERVE_OBJECT_STORE_URL"))
    p.add_argument("--models-dir", default=os.environ.get("FACE_MODELS_DIR"))
    p.add_argument("--report-key", default=None, help="object key of the report (default reports/reembed/...)")
    p.add_argument("--data-dir", default=None,
                   help="with neither URL given: the data folder of `faceserve start`, as an absolute path")
    args = p.parse_args(argv)
    if not args.abort and not args.model:
        p.error("--model is required (or --abort)")
    if args.batch_size < 1 or args.concurrency < 0 or args.segment_size < 1 or args.cpus_per_worker <= 0 \
            or args.max_rounds < 1:
        p.error("--batch-size, --segment-size and --max-rounds must be >= 1, --concurrency >= 0, "
                "--cpus-per-worker > 0")
    return args


class Driver:
    """The driver's own database work (listing, begin, switch), on one small pool."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = asyncio.new_event_loop()
        self.pool: Any = None

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def __enter__(self) -> "Driver":
        from serve_app.gallery.reembeds import ReembedRepository
        from serve_app.gallery.repository import GalleryRepository, create_pool

        self.pool = self.run(create_pool(self.args.database_url, min_size=1, max_size=2))
        self.repo, self.reembeds = GalleryRepository(self.pool), ReembedRepository(self.pool)
        return self

    def __exit__(self, *exc: object) -> None:
        self.run(self.pool.close())
        self.loop.close()

    def collection(self) -> Any:
        col = self.run(self.repo.get_collection(self.args.collection, self.args.tenant))
        if col is None:
            raise JobError(f"no collection {self.args.collection!r} in tenant {self.args.tenant!r}")
        return col


def _model_dim(name: str) -> int:
    from models.embedding import EMBEDDERS

    return int(EMBEDDERS[name].dim)


def run(args: argparse.Namespace) -> ReembedReport:
    from serve_app.errors import CollectionNotFound, Conflict

    options = {k: v for k, v in vars(args).items() if k != "database_url"}
    report = ReembedReport(options=options)
    with Driver(args) as d:
        col = d.collection()
        report.switch.update(collection=col.name, tenant=col.tenant, from_model=col.embedder)
        if args.abort:
            seq = d.run(d.reembeds.abort(col))
            report.switch.update(aborted=bool(seq), seq=seq, switched=False)
            print(f"staged re-embed of {col.tenant}/{col.name} dropped" if seq else "nothing staged to drop",
                  flush=True)
            return report
        try:
            staging = d.run(d.reembeds.begin(col, args.model, _model_dim(args.model)))
        except Conflict as exc:
            raise JobError(str(exc)) from None
        report.switch["to_model"] = args.model
        if staging is None:
            report.switch.update(switched=False, already=True, faces=d.run(d.reembeds.progress(col))[0])
            print(f"{col.tenant}/{col.name} holds {args.model} embeddings already: nothing to do", flush=True)
            return report
        report.switch["from_model"] = staging.from_model
        faces, staged = d.run(d.reembeds.progress(col))
        report.counts["skipped"] += staged  # staged by an earlier, interrupted run
        print(f"re-embedding {col.tenant}/{col.name}: {faces} faces, {staging.from_model} -> {args.model}"
              + (f" ({staged} staged by an earlier run)" if staged else ""), flush=True)
        seen: set[int] = set()  # faces with an outcome in this job: each is tried once
        for round_no in range(1, args.max_rounds + 1):
            before = report.counts["reembedded"]
            _stage_round(d, col, args, report, seen)
            report.switch["rounds"] = round_no
            if args.no_switch:
                report.switch["switched"] = False
                return report
            try:
                done = d.run(d.reembeds.switch(col, staging))
            except (CollectionNotFound, Conflict) as exc:  # deleted, or aborted by someone else meanwhile
                raise JobError(str(exc)) from None
            if done.complete:
                report.switch.update(switched=True, seq=done.seq, faces=done.faces,
                                     feedback_dropped=done.feedback_dropped)
                print(f"switched {col.tenant}/{col.name} to {args.model} at seq {done.seq}: {done.faces} faces"
                      + (f", {done.feedback_dropped} 'not this person' reports of the old model dropped"
                         if done.feedback_dropped else ""), flush=True)
                return report
            report.switch.update(switched=False, missing=done.missing)
            if report.counts["reembedded"] == before:  # this round staged nothing new: the rest is stuck
                break
            print(f"{done.missing} faces still without a {args.model} vector: another round for those "
                  "enrolled meanwhile", flush=True)
        print(f"not switched: {report.switch.get('missing')} faces have no {args.model} vector "
              "(see the report; delete or re-enrol them, then run the job again)", flush=True)
        return report


def _stage_round(d: Driver, col: Any, args: argparse.Namespace, report: ReembedReport, seen: set[int]) -> None:
    """Stage every face without a staged vector and not tried yet in this job,
    through the actor pool, one listed segment at a time (a face that failed
    is retried by the next submission, not counted twice in this report)."""
    import ray
    import ray.data

    from serve_app.jobs.reembed_worker import ReembedWorker

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    if not args.concurrency:
        free = float(ray.available_resources().get("CPU", 1.0))
        args.concurrency = max(1, min(8, int((free - READ_CPUS) // args.cpus_per_worker)))
        print(f"{args.concurrency} model actors x {args.cpus_per_worker} CPU", flush=True)
    kwargs = dict(database_url=args.database_url, object_store_url=args.object_store_url, collection_id=col.id,
                  model=args.model, dim=_model_dim(args.model), models_dir=args.models_dir,
                  threads=max(1, int(args.cpus_per_worker)))
    last, after = time.monotonic(), 0
    while True:
        chunk = d.run(d.reembeds.pending(col, after_id=after, limit=args.segment_size))
        if not chunk:
            return
        after = chunk[-1].id
        rows = [{"face_id": f.id, "subject_id": str(f.subject_id), "crop_key": f.crop_key or ""}
                for f in chunk if f.id not in seen]
        seen.update(f.id for f in chunk)
        if not rows:
            continue
        blocks = max(1, min(-(-len(rows) // args.batch_size), 1000))
        ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            ReembedWorker, fn_constructor_kwargs=kwargs, batch_size=args.batch_size,
            compute=ray.data.ActorPoolStrategy(size=args.concurrency), num_cpus=args.cpus_per_worker)
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            for row in batch.to_dict("records"):
                report.add(row)
            if time.monotonic() - last >= 5.0:
                print(report.progress_line(), flush=True)
                last = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from serve_app.jobs.enroll import _defaults_from_data_dir

    _defaults_from_data_dir(args)  # may start the embedded PostgreSQL: not in parse_args
    try:
        report = run(args)
    except JobError as exc:
        print(f"re-embed refused: {exc}", file=sys.stderr)
        return 2
    print(report.progress_line(), flush=True)
    key = store_report(report, args, "reembed")
    summary = report.summary()
    for row in report.problems()[:50]:
        print(f"  {row['status']} {row['reason']}: face {row['uri']} {row['detail']}".rstrip())
    print(f"report: {args.object_store_url.rstrip('/')}/{key}")
    print("REPORT " + json.dumps({"report_key": key, **summary}), flush=True)
    if summary["failed"]:
        return 1
    return 0 if summary.get("switched") or summary.get("already") or args.no_switch or args.abort else 1


if __name__ == "__main__":
    raise SystemExit(main())
