"""Where the bulk enrolment job's time goes: its model actor in one process, no Ray.

Makes N photos the way benchmarks/bulk_enroll.py does, then:
  1. each stage of the actor's work alone (decode, detect, crops + quality +
     JPEG, embedding and liveness a batch at a time), in CPU time of this thread,
     liveness both on torch and on OpenCV's DNN (what the job and the
     Liveness deployment run);
  2. the whole EnrolWorker (its gates, database and crop writes included)
     over the same photos in batches, against a throwaway database.

    python benchmarks/bulk_worker_profile.py [--images 48] [--batch-size 16]

CPU time, not wall time, so other work on a shared machine skews it less.
It starts no Ray cluster: fine to run beside others' work.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("FACE_MODELS_DIR", str(ROOT.parent / "shared" / "models"))


def stages(paths: list[Path], batch: int) -> dict[str, float]:
    import cv2
    import numpy as np
    import torch

    from models.detection import DetectedFace, make_detector
    from models.embedding import make_embedder
    from models.liveness import LivenessModel
    from models.working_image import decode_working
    from serve_app.deployment_config import DetectorConfig
    from serve_app.detection_path import cut_face

    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    cfg = DetectorConfig()
    det = make_detector(cfg.detector, score_threshold=cfg.score_threshold, min_face_size=cfg.min_face_size,
                        max_side=cfg.max_side)
    emb, live = make_embedder("sface", intra_op_threads=1), LivenessModel(num_threads=1)
    live_cv = LivenessModel(num_threads=1, runtime="opencv")
    spent: dict[str, float] = defaultdict(float)

    def clock(name: str, f: Callable[[], Any]) -> Any:
        t = time.thread_time()
        out = f()
        spent[name] += time.thread_time() - t
        return out

    aligned, crops = [], []
    for p in paths:
        data = p.read_bytes()
        work = clock("decode", lambda: decode_working(
            data, max_side=cfg.max_side, max_bytes=cfg.max_image_bytes, max_pixels=cfg.max_image_pixels,
            full_decode_bytes=cfg.full_decode_bytes))
        found = clock("detect", lambda: det.detect(work.pixels))
        if not found:
            continue
        f, inv = found[0], 1.0 / work.scale
        face = DetectedFace((f.box[0] * inv, f.box[1] * inv, f.box[2] * inv, f.box[3] * inv),
                            f.landmarks * np.float32(inv), float(f.score))
        c = clock("crops+quality+jpeg", lambda: cut_face(work, face, liveness=True, enrol=True, bars=cfg.bars))
        aligned.append(c.aligned)
        crops.append(c.liveness)
    a = np.stack(aligned)
    clock("embed", lambda: [emb.embed(a[i:i + batch]) for i in range(0, len(a), batch)])
    clock("embed one face a call", lambda: [emb.embed(a[i:i + 1]) for i in range(len(a))])
    lv = {s: np.stack([c[s] for c in crops]) for s in crops[0]}
    clock("liveness (torch)", lambda: [live.predict({s: v[i:i + batch] for s, v in lv.items()})
                                       for i in range(0, len(a), batch)])
    clock("liveness (opencv)", lambda: [live_cv.predict({s: v[i:i + batch] for s, v in lv.items()})
                                        for i in range(0, len(a), batch)])
    return dict(spent)


def whole_worker(folder: Path, batch: int) -> tuple[int, float, float]:
    from serve_app.gallery.repository import GalleryRepository, create_pool
    from serve_app.jobs.sources import list_items
    from serve_app.jobs.worker import EnrolWorker, read_batch
    from tests.pgtools import create_database, drop_database

    rows = [it.to_row() for it in list_items(str(folder / "people"))]
    dbname, dsn = create_database("faceserve_profile")
    try:
        async def make() -> None:
            pool = await create_pool(dsn, min_size=1, max_size=1)
            await GalleryRepository(pool).create_collection("profile", "sface", 128)
            await pool.close()

        asyncio.run(make())
        worker = EnrolWorker(database_url=dsn, object_store_url=f"file://{folder}/objects", collection="profile",
                             tenant="default", liveness="block", largest=False, min_quality=0.5, dry_run=False,
                             models_dir=None, threads=1)
        batches = [read_batch({k: [r[k] for r in rows[i:i + batch]] for k in rows[0]})
                   for i in range(0, len(rows), batch)]
        c0, w0 = time.thread_time(), time.perf_counter()
        for b in batches:
            worker(b)
        return len(rows), time.thread_time() - c0, time.perf_counter() - w0
    finally:
        drop_database(dbname)


def main() -> None:
    from benchmarks.bulk_enroll import make_images

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="faceserve-profile-"))
    try:
        paths = make_images(folder / "people", args.images, per_subject=4)
        spent = stages(paths, args.batch_size)
        one = spent.pop("embed one face a call")
        print(f"SFace one face a forward: {1000 * one / len(paths):.1f} ms of CPU a photo "
              f"(batches of {args.batch_size}: {1000 * spent['embed'] / len(paths):.1f})")
        for runtime, other in (("torch", "opencv"), ("opencv", "torch")):
            part = {k: v for k, v in spent.items() if other not in k}
            total = sum(part.values())
            print(f"stages alone, liveness on {runtime}: {1000 * total / len(paths):.1f} ms of CPU a photo")
            for name, s in part.items():
                print(f"  {name:20s} {1000 * s / len(paths):6.1f} ms  {100 * s / total:4.1f} %")
        n, cpu, wall = whole_worker(folder, args.batch_size)
        print(f"EnrolWorker (gates, database and crop writes included): {1000 * cpu / n:.1f} ms of CPU a photo, "
              f"{1000 * wall / n:.1f} ms wall")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
