"""The bulk enrolment's Ray Data stages.

read_batch (tasks, I/O): the image bytes, their sha256 and sniffed format.
EnrolWorker (actor pool): holds the models and a database pool; per batch it
skips what is already enrolled, runs the detector's own per-image path
(serve_app/detection_path.py run_detection: reduced decode, detection,
quality, crops), the face-count / quality / liveness gates, one embedding
call for the whole batch, then writes the crops and one transaction of rows
(GalleryRepository.add_faces). Only small outcome rows leave it.
"""
from __future__ import annotations

import asyncio
import logging
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serve_app.jobs.keys import crop_key, image_sha256
from serve_app.jobs.sources import read_uri

log = logging.getLogger("faceserve.jobs")

# Test hook: raise after writing a batch's crops, before its rows commit,
# once this worker has written at least this many crops (a kill mid-batch).
FAIL_AFTER_ENV = "FACESERVE_ENROLL_FAIL_AFTER_OBJECTS"


def read_batch(batch: dict[str, Any]) -> dict[str, list[Any]]:
    """uri, subject, external_id, subject_id -> + data, sha256, format, error."""
    from models.images import sniff_format

    out: dict[str, list[Any]] = {k: list(batch[k]) for k in ("uri", "subject", "external_id", "subject_id")}
    out.update(data=[], sha256=[], format=[], error=[])
    for uri in out["uri"]:
        try:
            data = read_uri(str(uri))
        except FileNotFoundError:
            data, err = b"", "rejected:unreadable:file not found"
        except Exception as exc:  # storage trouble: the image may be fine, retry later
            data, err = b"", f"failed:{type(exc).__name__}:{exc}"
        else:
            err = ""
        out["data"].append(data)
        out["sha256"].append(image_sha256(data) if data else "")
        out["format"].append((sniff_format(data[:32]) or "") if data else "")
        out["error"].append(err)
    return out


@dataclass
class Pending:
    """One image on its way through a batch."""

    row: int
    uri: str
    subject: str
    external_id: str
    subject_id: uuid.UUID | None
    sha256: str
    data: bytes = field(repr=False)
    face: Any = None  # FaceInfo
    aligned: np.ndarray | None = None
    live: dict[float, np.ndarray] | None = None
    jpeg: bytes | None = None
    flagged: bool = False


class EnrolWorker:
    def __init__(self, *, database_url: str, object_store_url: str, collection: str, tenant: str,
                 liveness: str, largest: bool, min_quality: float, dry_run: bool,
                 models_dir: str | None, threads: int = 1, model: str = "sface") -> None:
        if models_dir:
            os.environ["FACE_MODELS_DIR"] = models_dir
        import cv2

        from models.detection import make_detector
        from models.embedding import make_embedder
        from models.liveness import DEFAULT_LIVE_THRESHOLD, LivenessModel
        from serve_app.deployment_config import DetectorConfig
        from serve_app.gallery.objects import ObjectStore
        from serve_app.gallery.repository import GalleryRepository, create_pool

        cv2.setNumThreads(threads)
        self.cfg = DetectorConfig()
        self.detector = make_detector(self.cfg.detector, score_threshold=self.cfg.score_threshold,
                                      min_face_size=self.cfg.min_face_size, max_side=self.cfg.max_side)
        self.liveness_policy = liveness
        # OpenCV runtime: torch's scores at a third of its CPU (models/liveness.py).
        self.liveness = LivenessModel(num_threads=threads, runtime="opencv") if liveness != "off" else None
        self.live_threshold = DEFAULT_LIVE_THRESHOLD
        self.largest, self.min_quality, self.dry_run = largest, min_quality, dry_run
        self.objects = ObjectStore(object_store_url)
        self.loop = asyncio.new_event_loop()
        self.repo = GalleryRepository(self.loop.run_until_complete(create_pool(database_url, min_size=1, max_size=2)))
        self.collection = self.loop.run_until_complete(self.repo.get_collection(collection, tenant))
        # The collection's own model (a re-embed may have moved it since the job started:
        # then add_faces is refused, the batch fails, and a resubmission uses the new one).
        name = self.collection.embedder if self.collection is not None else model
        self.embedder = make_embedder(name, **({"intra_op_threads": threads} if name.startswith("sface") else {}))
        if self.collection is not None and self.collection.dim != self.embedder.dim:
            raise RuntimeError(f"collection {collection!r} holds {self.collection.dim}-d vectors, "
                               f"{self.embedder.name}'s are {self.embedder.dim}-d")
        if self.collection is None and not dry_run:
            raise RuntimeError(f"collection {collection!r} of tenant {tenant!r} does not exist")
        self.fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
        self.crops_written = 0

    # ------------------------------------------------------------------ batch
    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        n = len(batch["uri"])
        outcomes: list[dict[str, str] | None] = [None] * n

        def done(i: int, status: str, reason: str = "", detail: str = "") -> None:
            outcomes[i] = {"uri": str(batch["uri"][i]), "subject": str(batch["subject"][i]),
                           "status": status, "reason": reason, "detail": detail[:300]}

        pending: list[Pending] = []
        for i in range(n):
            err = str(batch["error"][i])
            if err:
                status, reason, detail = err.split(":", 2)
                done(i, status, reason, detail)
                continue
            fmt = str(batch["format"][i])
            if not fmt:
                done(i, "rejected", "unreadable", "not a recognised image format")
                continue
            from models.images import SUPPORTED_FORMATS

            if fmt not in SUPPORTED_FORMATS:
                done(i, "rejected", "unsupported_format", f"{fmt} images are not supported")
                continue
            sid = str(batch["subject_id"][i])
            pending.append(Pending(i, str(batch["uri"][i]), str(batch["subject"][i]), str(batch["external_id"][i]),
                                   uuid.UUID(sid) if sid else None, str(batch["sha256"][i]), bytes(batch["data"][i])))
        seen: set[tuple[str, str]] = set()
        unique = []
        for p in pending:  # the same image listed twice for a subject: enrol it once
            key = (str(p.subject_id) if p.subject_id else f"name:{p.subject}", p.sha256)
            if key in seen:
                done(p.row, "skipped", "duplicate_in_source")
            else:
                seen.add(key)
                unique.append(p)
        pending = unique
        try:
            pending = self._known_subjects(pending, done)
            pending = self._skip_enrolled(pending, done)
        except Exception as exc:
            for p in pending:
                done(p.row, "failed", type(exc).__name__, str(exc))
            pending = []
        pending = self._analyse(pending, done)
        if pending:
            self._embed_and_write(pending, done)
        return {k: [o[k] for o in outcomes if o is not None] for k in ("uri", "subject", "status", "reason", "detail")}

    def _run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def _known_subjects(self, pending: list[Pending], done: Any) -> list[Pending]:
        """Resolve names to existing subjects (new ones are made only when a face
        is accepted); a given subject_id must exist."""
        if self.collection is None:
            return pending
        names = sorted({p.subject for p in pending if p.subject_id is None})
        found = self._run(self.repo.find_subjects(self.collection, names)) if names else {}
        ids = sorted({p.subject_id for p in pending if p.subject_id is not None})
        live = self._run(self.repo.existing_subject_ids(self.collection, ids)) if ids else set()
        keep = []
        for p in pending:
            if p.subject_id is None:
                p.subject_id = found.get(p.subject)
                keep.append(p)
            elif p.subject_id in live:
                keep.append(p)
            else:
                done(p.row, "rejected", "unknown_subject", f"no subject with id {p.subject_id}")
        return keep

    def _skip_enrolled(self, pending: list[Pending], done: Any) -> list[Pending]:
        if self.collection is None:
            return pending
        pairs = [(p.subject_id, p.sha256) for p in pending if p.subject_id is not None]
        have = self._run(self.repo.enrolled_images(self.collection, self.embedder.name, pairs)) if pairs else set()
        keep = []
        for p in pending:
            if (p.subject_id, p.sha256) in have:
                done(p.row, "skipped", "already_enrolled")
            else:
                keep.append(p)
        return keep

    def _analyse(self, pending: list[Pending], done: Any) -> list[Pending]:
        from models.images import ImageTooLarge, ImageUnsupported
        from serve_app.detection_path import run_detection
        from serve_app.messages import DetectOptions

        opts = DetectOptions(liveness_crops=self.liveness is not None, enrol_crops=True)
        keep = []
        for p in pending:
            try:
                det = run_detection(self.detector, p.data, self.cfg, opts)
            except ImageUnsupported as exc:
                done(p.row, "rejected", "unsupported_format", str(exc))
                continue
            except ImageTooLarge as exc:
                done(p.row, "rejected", "too_large", str(exc))
                continue
            except ValueError as exc:
                done(p.row, "rejected", "unreadable", str(exc))
                continue
            except Exception as exc:  # a bug or resource trouble, not the image's fault
                done(p.row, "failed", type(exc).__name__, str(exc))
                continue
            p.data = b""  # the image's bytes are no longer needed
            if len(det) == 0:
                done(p.row, "rejected", "no_face")
                continue
            if len(det) > 1 and not self.largest:
                done(p.row, "rejected", "multiple_faces", f"{len(det)} faces")
                continue
            face = det.faces[0]  # largest first
            q = face.quality
            if q is not None and float(q["score"]) < self.min_quality:  # type: ignore[arg-type]
                done(p.row, "rejected", "low_quality", ",".join(q["reasons"]) or f"score {q['score']}")  # type: ignore[arg-type]
                continue
            p.face, p.aligned = face, det.aligned[0]
            p.jpeg = det.enrol_crops[0] if det.enrol_crops else None
            p.live = {s: c[:1] for s, c in det.liveness_crops.items()} if det.liveness_crops else None
            keep.append(p)
        if self.liveness is not None and keep:
            scales = keep[0].live or {}
            scores = self.liveness.predict({s: np.concatenate([p.live[s] for p in keep]) for s in scales})  # type: ignore[index]
            passed = []
            for p, s in zip(keep, scores):
                if float(s) >= self.live_threshold:
                    passed.append(p)
                elif self.liveness_policy == "block":
                    done(p.row, "rejected", "spoof", f"live score {float(s):.3f}")
                else:
                    p.flagged = True
                    passed.append(p)
            keep = passed
        return keep

    def _embed_and_write(self, pending: list[Pending], done: Any) -> None:
        from serve_app.gallery.repository import NewFace

        vectors = self.embedder.embed(np.stack([p.aligned for p in pending]))
        flag = lambda p: "spoof_flagged" if p.flagged else ""  # noqa: E731
        if self.dry_run:
            for p in pending:
                done(p.row, "enrolled", flag(p), "dry run: nothing written")
            return
        assert self.collection is not None
        col = self.collection
        try:
            new = {p.subject: {"external_id": p.external_id} if p.external_id else {}
                   for p in pending if p.subject_id is None}
            made = self._run(self.repo.ensure_subjects(col, new)) if new else {}
            for p in pending:
                if p.subject_id is None:
                    p.subject_id = made[p.subject]
        except Exception as exc:
            for p in pending:
                done(p.row, "failed", type(exc).__name__, str(exc))
            return
        faces: list[tuple[Pending, NewFace]] = []
        for p, vec in zip(pending, vectors):
            assert p.subject_id is not None and p.jpeg is not None
            key = crop_key(col.id, p.subject_id, p.sha256)
            try:
                self.objects.put(key, p.jpeg)
            except Exception as exc:
                done(p.row, "failed", type(exc).__name__, f"crop not stored: {exc}")
                continue
            x1, y1, x2, y2 = p.face.box
            faces.append((p, NewFace(subject_id=p.subject_id, embedding=vec, model=self.embedder.name,
                                     image_sha256=p.sha256, crop_key=key,
                                     box={"x1": round(x1, 1), "y1": round(y1, 1), "x2": round(x2, 1), "y2": round(y2, 1)},
                                     det_score=float(p.face.score))))
        self.crops_written += len(faces)
        if self.fail_after and self.crops_written >= self.fail_after:
            raise RuntimeError(f"{FAIL_AFTER_ENV}: stopping after {self.crops_written} crops, before their rows")
        try:
            result = self._run(self.repo.add_faces(col, [f for _, f in faces]))
        except Exception as exc:
            for p, f in faces:
                self._discard(f.crop_key)
                done(p.row, "failed", type(exc).__name__, str(exc))
            return
        for p, f in faces:
            key = (f.subject_id, f.image_sha256)
            if key in result.added:
                done(p.row, "enrolled", flag(p))
            elif key in result.already:
                if result.already[key] != f.crop_key:  # that row has a crop of its own
                    self._discard(f.crop_key)
                done(p.row, "skipped", "already_enrolled")
            else:
                self._discard(f.crop_key)
                done(p.row, "rejected", "unknown_subject", "the subject was deleted during the job")

    def _discard(self, key: str | None) -> None:
        if not key:
            return
        try:
            self.objects.delete(key)
        except Exception:
            log.exception("could not remove crop %s; a resubmitted job overwrites it", key)

    def __del__(self) -> None:
        try:
            self.loop.run_until_complete(self.repo.pool.close())
        except Exception:
            pass
