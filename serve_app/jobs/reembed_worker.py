"""The re-embed job's model actor (Ray Data actor pool).

Per batch of faces: read each face's stored crop (the enrolment JPEG: the
face with a margin), find the face in it with the detector's own path
(serve_app/detection_path.run_detection), align it, embed the whole batch
with the new model in one call, and stage the vectors in one transaction
(ReembedRepository.stage). Only small outcome rows leave it.
"""
from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

log = logging.getLogger("faceserve.jobs")

# Test hook: fail once this actor has staged at least this many faces (a kill mid-job).
FAIL_AFTER_ENV = "FACESERVE_REEMBED_FAIL_AFTER_FACES"


def pick_face(boxes: list[tuple[float, float, float, float]], width: int, height: int,
              margin: float) -> int | None:
    """Which detected face is the one the crop was cut around: the crop is
    the face box grown by `margin` of its size on each side (less where the
    photo ended), so the face fills its middle. The box overlapping that
    middle most, if it overlaps enough; None when no face does."""
    if not boxes:
        return None
    frac = margin / (1 + 2 * margin)
    want = (width * frac, height * frac, width * (1 - frac), height * (1 - frac))
    best, best_iou = None, 0.2  # below this the face found is another one
    for i, box in enumerate(boxes):
        iou = _iou(box, want)
        if iou > best_iou:
            best, best_iou = i, iou
    return best


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


class ReembedWorker:
    def __init__(self, *, database_url: str, object_store_url: str, collection_id: int, model: str,
                 dim: int, models_dir: str | None, threads: int = 1) -> None:
        if models_dir:
            os.environ["FACE_MODELS_DIR"] = models_dir
        import cv2

        from models.detection import make_detector
        from models.embedding import make_embedder
        from serve_app.deployment_config import DetectorConfig
        from serve_app.gallery.objects import ObjectStore
        from serve_app.gallery.reembeds import ReembedRepository
        from serve_app.gallery.repository import GalleryRepository, create_pool

        cv2.setNumThreads(threads)
        self.cfg = DetectorConfig()
        self.detector = make_detector(self.cfg.detector, score_threshold=self.cfg.score_threshold,
                                      min_face_size=self.cfg.min_face_size, max_side=self.cfg.max_side)
        kwargs = {"intra_op_threads": threads} if model.startswith("sface") else {}
        self.embedder = make_embedder(model, **kwargs)
        if (self.embedder.name, self.embedder.dim) != (model, dim):
            raise RuntimeError(f"this worker runs {self.embedder.name} ({self.embedder.dim}-d), not {model}")
        self.objects = ObjectStore(object_store_url)
        self.fetch = ThreadPoolExecutor(max_workers=8, thread_name_prefix="crops")  # storage latency, not CPU
        self.loop = asyncio.new_event_loop()
        pool = self.loop.run_until_complete(create_pool(database_url, min_size=1, max_size=2))
        self.repo = GalleryRepository(pool)
        self.reembeds = ReembedRepository(pool)
        found = [c for c in self.loop.run_until_complete(self.repo.list_collections()) if c.id == collection_id]
        if not found:
            raise RuntimeError(f"collection {collection_id} does not exist")
        self.collection = found[0]
        staging = self.loop.run_until_complete(self.reembeds.staging(self.collection))
        if staging is None or staging.model != model:
            raise RuntimeError(f"collection {collection_id} has no re-embed to {model} under way")
        self.staging = staging
        self.fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
        self.staged = 0

    def _read(self, key: str) -> bytes:
        return self.objects.get(key)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        from models.images import ImageError
        from serve_app.detection_path import ENROL_MARGIN, run_detection
        from serve_app.messages import DetectOptions

        ids = [int(x) for x in batch["face_id"]]
        subjects = [str(x) for x in batch["subject_id"]]
        keys = [str(x or "") for x in batch["crop_key"]]
        outcomes: dict[int, dict[str, str]] = {}

        def done(i: int, status: str, reason: str = "", detail: str = "") -> None:
            outcomes[i] = {"uri": str(ids[i]), "subject": subjects[i], "status": status, "reason": reason,
                           "detail": detail[:300]}

        futures = {i: self.fetch.submit(self._read, k) for i, k in enumerate(keys) if k}
        aligned: dict[int, np.ndarray] = {}
        opts = DetectOptions()
        for i in range(len(ids)):
            if not keys[i]:
                done(i, "rejected", "no_crop", "the face was stored without a crop")
                continue
            try:
                data = futures[i].result()
            except FileNotFoundError:
                done(i, "rejected", "crop_missing", keys[i])
                continue
            except Exception as exc:  # storage trouble: a rerun retries it
                done(i, "failed", type(exc).__name__, str(exc))
                continue
            try:
                det = run_detection(self.detector, data, self.cfg, opts)
            except (ImageError, ValueError) as exc:
                done(i, "rejected", "unreadable", str(exc))
                continue
            except Exception as exc:
                done(i, "failed", type(exc).__name__, str(exc))
                continue
            w, h = det.image_size
            j = pick_face([f.box for f in det.faces], w, h, ENROL_MARGIN)
            if j is None:
                done(i, "rejected", "no_face", f"{len(det)} faces in the crop, none where the face was")
                continue
            aligned[i] = det.aligned[j]
        if aligned:
            order = sorted(aligned)
            vectors = self.embedder.embed(np.stack([aligned[i] for i in order]))
            try:
                staged, _seq = self.loop.run_until_complete(
                    self.reembeds.stage(self.collection, self.staging,
                                        {ids[i]: v for i, v in zip(order, vectors)}))
            except Exception as exc:
                for i in order:
                    done(i, "failed", type(exc).__name__, str(exc))
            else:
                for i in order:
                    if ids[i] in staged:
                        done(i, "reembedded")
                    else:  # deleted meanwhile, or staged by an earlier run of the job
                        done(i, "skipped", "gone_or_staged")
                self.staged += len(staged)
                if self.fail_after and self.staged >= self.fail_after:
                    raise RuntimeError(f"{FAIL_AFTER_ENV}: stopping after {self.staged} staged faces")
        rows = [outcomes[i] for i in sorted(outcomes)]
        return {k: [r[k] for r in rows] for k in ("uri", "subject", "status", "reason", "detail")}

    def __del__(self) -> None:
        try:
            self.loop.run_until_complete(self.repo.pool.close())
        except Exception:
            pass
