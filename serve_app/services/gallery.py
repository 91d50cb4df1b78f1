"""Collections, subjects and faces: enrolment with its cleanup, and the CRUD.

The face crop is cut by the detector (only kilobytes reach here). It goes to
object storage before the row is written, under a guard in the erasure
outbox that the row's transaction removes; if the transaction fails or the
request is cancelled, the object is deleted again, and if even that fails
(or the process dies) the sweeper removes it once the guard falls due. So no
row ever points at a missing object and no object outlives a failed enrolment.

Deletes are erasures (serve_app/services/erasure.py): the row delete commits
with its outbox of crops, snapshots and cache entries, the delete sweeps its
own erasure for a few seconds, and answers with the receipt.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from serve_app.errors import CollectionNotFound, InvalidRequest, LowQuality, ModelMismatch
from serve_app.errors import ErasureNotFound, FaceNotFound, NotFound, ServiceUnavailable
from serve_app.gallery.repository import Collection, FaceRecord, RemovedFaces, Subject
from serve_app.gallery.erasures import Receipt
from serve_app.deployment_config import EMBEDDER_NAMES
from serve_app.pipeline_client import AnalyseSpec, Analysis
from serve_app.services.last_good import LastGood
from serve_app.services.liveness_policy import LivenessPolicy, enforce
from serve_app.services.recognition import PipelinePort, single_face
from serve_app.timing import StageTimer

if TYPE_CHECKING:
    from serve_app.services.erasure import ErasureService

log = logging.getLogger("ray.serve")


class GalleryRepo(Protocol):
    async def ensure_collection(self, name: str, embedder: str, dim: int, tenant: str = ...) -> Collection: ...
    async def create_collection(self, name: str, embedder: str, dim: int, tenant: str = ...) -> Collection: ...
    async def get_collection(self, name: str, tenant: str = ...) -> Collection | None: ...
    async def list_collections(self, tenant: str | None = ...) -> list[Collection]: ...
    async def create_subject(self, collection: Collection, name: Any, metadata: dict[str, Any]) -> Subject: ...
    async def get_subject(self, collection: Collection, subject_id: uuid.UUID) -> Subject: ...
    async def find_subject_by_name(self, collection: Collection, name: str) -> Subject | None: ...
    async def list_subjects(self, collection: Collection, *, limit: int, after: tuple[datetime, uuid.UUID] | None) -> list[Subject]: ...
    async def count_subjects(self, collection: Collection) -> int: ...
    async def rename_subject(self, collection: Collection, subject_id: uuid.UUID, name: Any) -> tuple[Subject, int]: ...
    async def delete_subject(self, collection: Collection, subject_id: uuid.UUID, *,
                             requested_by: str = ...) -> RemovedFaces: ...
    async def add_face(self, collection: Collection, subject_id: uuid.UUID, *, embedding: np.ndarray, model: str,
                       image_sha256: str, crop_key: str, box: dict[str, float], det_score: float,
                       guard_id: int | None = ...) -> tuple[FaceRecord, int]: ...
    async def list_faces(self, collection: Collection, subject_id: uuid.UUID) -> list[FaceRecord]: ...
    async def delete_face(self, collection: Collection, subject_id: uuid.UUID, face_id: int, *,
                          requested_by: str = ...) -> RemovedFaces: ...
    async def delete_collection(self, collection: Collection, *, requested_by: str = ...) -> RemovedFaces: ...


class ObjectPort(Protocol):
    async def aput(self, key: str, data: bytes) -> None: ...
    async def aget(self, key: str) -> bytes: ...
    async def adelete_many(self, keys: list[str]) -> list[str]: ...


@dataclass
class Enrolment:
    face: FaceRecord
    seq: int
    analysis: Analysis
    index: int


@dataclass
class SubjectPage:
    subjects: list[Subject]
    total: int
    next_after: tuple[datetime, uuid.UUID] | None


@dataclass
class SubjectRemoval:
    faces_removed: int
    seq: int
    crops_pending_cleanup: int
    feedback_removed: int = 0
    erasure: Receipt | None = None  # None when this replica runs no erasure service


class GalleryService:
    # Set by the ingress (serve_app/services/erasure.py): enrolment guards,
    # sweeping a delete's own erasure, receipts.
    erasures: "ErasureService | None" = None

    def __init__(self, pipeline: PipelinePort, repo: GalleryRepo, objects: ObjectPort, *,
                 model: str, dim: int, default_collection: str,
                 lookup_ttl_s: float = 10.0, lookup_stale_s: float = 300.0) -> None:
        self.pipeline = pipeline
        self.repo = repo
        self.objects = objects
        self.model = model
        self.dim = dim
        self.default_collection = default_collection
        # (tenant, name) -> collection, re-read every lookup_ttl_s; the last
        # good answer serves through a database outage for up to lookup_stale_s.
        self._collections: LastGood[tuple[str, str], Collection] = LastGood(
            ttl_s=lookup_ttl_s, stale_s=lookup_stale_s)
        self.last_seq = 0  # this replica's newest write: its own reads wait for it

    def set_lookup_stale_s(self, stale_s: float) -> None:
        self._collections.stale_s = stale_s

    def saw(self, seq: int) -> None:
        """A write made through this replica elsewhere (feedback): its reads wait for it."""
        self._saw(seq)

    def _saw(self, seq: int) -> None:
        self.last_seq = max(self.last_seq, seq)

    # --- collections --------------------------------------------------------------
    async def collection(self, name: str | None, *, tenant: str = "default", create: bool = False) -> Collection:
        """A tenant's collection by name; its default one (made on first use) when unnamed.
        Another tenant's collection of the same name is simply not found."""
        if name is None or name == "":
            name, create = self.default_collection, True

        async def load() -> Collection:
            row = await self.repo.get_collection(name, tenant)
            if row is None and create:
                row = await self.repo.ensure_collection(name, self.model, self.dim, tenant)
            if row is None:  # not cached: a collection made through another replica shows at once
                raise CollectionNotFound(f"no collection named {name!r}", collection=name)
            return row

        found = await self._collections.get((tenant, name), load)
        if found.embedder != self.model and found.embedder not in EMBEDDER_NAMES:
            raise ModelMismatch(
                f"collection {name!r} holds {found.embedder} embeddings, which this service cannot compute",
                model=found.embedder)
        return found

    def model_changed(self, collection_id: int, model: str) -> None:
        """A search found the collection on another model than the cached
        lookup says (a re-embed switched it): the next lookup re-reads it."""
        dropped = self._collections.drop(lambda _key, col: col.id == collection_id and col.embedder != model)
        if dropped:
            log.info("collection %s is now on %s: its cached lookup dropped", collection_id, model)

    async def create_collection(self, name: str, tenant: str = "default") -> Collection:
        col = await self.repo.create_collection(name, self.model, self.dim, tenant)
        self._collections.put((tenant, col.name), col)
        return col

    async def list_collections(self, tenant: str = "default") -> list[Collection]:
        return await self.repo.list_collections(tenant)

    async def delete_collection(self, collection: Collection, *, requested_by: str = "") -> SubjectRemoval:
        """Removes a collection, its subjects and faces (crops too). Other ingress
        replicas may hold it in their cache for up to lookup_ttl_s; their writes
        to it then fail on the missing row."""
        removed = await self.repo.delete_collection(collection, requested_by=requested_by)
        self._collections.pop((collection.tenant, collection.name), None)
        self._saw(removed.seq)
        return await self._erased(collection, removed)

    # --- subjects -------------------------------------------------------------------
    async def create_subject(self, collection: Collection, name: str, metadata: dict[str, Any]) -> Subject:
        return await self.repo.create_subject(collection, name, metadata)

    async def subjects(self, collection: Collection, *, name: str | None, limit: int,
                       after: tuple[datetime, uuid.UUID] | None) -> SubjectPage:
        if name:
            found = await self.repo.find_subject_by_name(collection, name)
            return SubjectPage([found] if found else [], 1 if found else 0, None)
        subjects = await self.repo.list_subjects(collection, limit=limit, after=after)
        nxt = (subjects[-1].created_at, subjects[-1].id) if len(subjects) == limit else None
        return SubjectPage(subjects, await self.repo.count_subjects(collection), nxt)

    async def get_subject(self, collection: Collection, sid: uuid.UUID) -> Subject:
        return await self.repo.get_subject(collection, sid)

    async def rename_subject(self, collection: Collection, sid: uuid.UUID, name: str) -> Subject:
        subject, seq = await self.repo.rename_subject(collection, sid, name)
        self._saw(seq)  # identify answers names from the matcher, which follows the log
        return subject

    async def delete_subject(self, collection: Collection, sid: uuid.UUID, *,
                             requested_by: str = "") -> SubjectRemoval:
        """The subject's rows go now; its crops (the whole prefix), feedback,
        snapshots holding its vectors and cache entries through its erasure."""
        removed = await self.repo.delete_subject(collection, sid, requested_by=requested_by)
        self._saw(removed.seq)
        return await self._erased(collection, removed)

    async def _erased(self, collection: Collection, removed: RemovedFaces) -> SubjectRemoval:
        """Sweep the delete's erasure for a moment, then read its receipt."""
        receipt = None
        if self.erasures is not None and removed.erasure_id is not None:
            await self.erasures.settle(removed.erasure_id)
            try:
                receipt = await self.erasures.receipt(removed.erasure_id, collection.tenant)
            except Exception:  # the delete has happened; GET /v1/erasures/{id} tells the rest
                log.warning("could not read the receipt of erasure %s", removed.erasure_id, exc_info=True)
        if receipt is not None:
            crops = next(c for c in receipt.copies if c.copy == "crops")
            pending = crops.items - crops.items_done
        else:
            pending = len(removed.crop_keys)  # the sweeper of some ingress replica removes them
        return SubjectRemoval(len(removed.face_ids), removed.seq, pending, removed.feedback_removed, receipt)

    async def erasure(self, erasure_id: str, tenant: str) -> Receipt:
        """GET /v1/erasures/{id}: the receipt, if it is this tenant's."""
        if self.erasures is None:
            raise ErasureNotFound("this service keeps no erasure receipts", erasure_id=erasure_id)
        return await self.erasures.receipt(erasure_id, tenant)

    # --- faces ------------------------------------------------------------------------
    async def enrol(self, collection: Collection, sid: uuid.UUID, data: bytes, timer: StageTimer, *,
                    largest: bool, policy: LivenessPolicy, min_quality: float = 0.0) -> Enrolment:
        await self.repo.get_subject(collection, sid)  # 404 before any model work
        analysis = await self.pipeline.analyse(
            data, AnalyseSpec(embed=True, liveness=policy.checks, enrol_crops=True, model=collection.embedder))
        for stage, ms in analysis.timings().items():
            timer.add(stage, ms)
        i = single_face(analysis, "image", largest=largest)
        quality = analysis.detection.faces[i].quality
        if quality is not None and float(quality["score"]) < min_quality:  # type: ignore[arg-type]
            raise LowQuality(
                f"the face is too poor a sample to enrol ({', '.join(quality['reasons']) or 'low score'}); "  # type: ignore[arg-type]
                "nothing was enrolled",
                score=quality["score"], reasons=quality["reasons"], min_quality=min_quality)
        enforce(policy, analysis.liveness, faces=[i])
        if analysis.embeddings is None or not analysis.detection.enrol_crops:
            raise InvalidRequest("the image gave no face crop to enrol")
        face = analysis.detection.faces[i]
        crop_key = f"crops/{collection.id}/{sid}/{uuid.uuid4().hex}.jpg"
        x1, y1, x2, y2 = face.box
        with timer.stage("store"):
            # The guard sweeps the crop if this enrolment never commits its row.
            guard = await self.erasures.guard(crop_key) if self.erasures is not None else None
            try:
                await self.objects.aput(crop_key, analysis.detection.enrol_crops[i])
            except BaseException:
                await asyncio.shield(self._discard(crop_key, guard))
                raise
            try:
                record, seq = await self.repo.add_face(
                    collection, sid,
                    embedding=analysis.embeddings.vectors[i],
                    model=analysis.embeddings.model,
                    image_sha256=hashlib.sha256(data).hexdigest(),
                    crop_key=crop_key,
                    box={"x1": round(x1, 1), "y1": round(y1, 1), "x2": round(x2, 1), "y2": round(y2, 1)},
                    det_score=float(face.score),
                    guard_id=guard,
                )
            except BaseException as exc:
                # Shielded: a cancelled request must still remove its object.
                await asyncio.shield(self._discard(crop_key, guard))
                if getattr(exc, "sqlstate", None) == "40001":  # the database's "one model per collection" check
                    self.model_changed(collection.id, "")
                    raise ServiceUnavailable("the collection was moved to another model during this enrolment; "
                                             "retry", retry_after_s=1, reason="model_changed") from None
                raise
        self._saw(seq)
        return Enrolment(record, seq, analysis, i)

    async def _discard(self, key: str, guard: int | None) -> None:
        left = await self.objects.adelete_many([key])
        if left:
            log.warning("enrolment failed and its crop %s could not be removed; its guard will sweep it", key)
        elif guard is not None and self.erasures is not None:
            try:
                await self.erasures.drop_guard(guard)
            except Exception:  # harmless: the sweeper finds nothing to delete
                log.warning("could not drop the guard of %s", key, exc_info=True)

    async def list_faces(self, collection: Collection, sid: uuid.UUID) -> list[FaceRecord]:
        return await self.repo.list_faces(collection, sid)

    async def face_crop(self, collection: Collection, sid: uuid.UUID, face_id: int) -> bytes:
        """The stored JPEG of one face of this collection's subject; any other face is
        not found (another tenant's collection never reaches here)."""
        # A subject holds a handful of faces: its listing is the tenant-checked lookup.
        face = next((f for f in await self.repo.list_faces(collection, sid) if f.id == face_id), None)
        if face is None:
            raise FaceNotFound(f"subject {sid} has no face {face_id}", face_id=face_id)
        if not face.crop_key:
            raise NotFound(f"face {face_id} has no stored crop", face_id=face_id)
        try:
            return await self.objects.aget(face.crop_key)
        except FileNotFoundError:
            raise NotFound(f"the crop of face {face_id} is missing from the object store", face_id=face_id) from None
        except OSError as exc:
            raise ServiceUnavailable(f"object store unavailable: {type(exc).__name__}", retry_after_s=2) from exc

    async def delete_face(self, collection: Collection, sid: uuid.UUID, face_id: int) -> int:
        return (await self.remove_face(collection, sid, face_id)).seq

    async def remove_face(self, collection: Collection, sid: uuid.UUID, face_id: int, *,
                          requested_by: str = "") -> SubjectRemoval:
        """One face, as an erasure: its crop, the snapshots holding its vector,
        its image's cache entry."""
        removed = await self.repo.delete_face(collection, sid, face_id, requested_by=requested_by)
        self._saw(removed.seq)
        return await self._erased(collection, removed)
