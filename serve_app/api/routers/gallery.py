"""Collections, subjects and their faces."""
from __future__ import annotations

import base64
import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query

from serve_app.api.body import as_bool
from serve_app.api.deps import Admin, EdgeDep, EnrolCollection, Enroller, ImageReq, ReadCollection, Reader
from serve_app.api.idempotent import IdempotencyKey, body_hash, idempotent
from serve_app.api.openapi_bodies import IMAGE_BODY
from serve_app.api.schemas import (
    CollectionIn,
    CollectionList,
    CollectionOut,
    EnrolResponse,
    ErasureReceipt,
    FaceDeleted,
    FaceList,
    FaceRecordOut,
    SubjectDeleted,
    SubjectIn,
    SubjectList,
    SubjectOut,
    SubjectPatch,
    liveness_out,
)
from serve_app.errors import InvalidRequest
from serve_app.gallery.repository import parse_subject_id

router = APIRouter(prefix="/v1", tags=["gallery"])

FaceId = Annotated[int, Path(ge=1, le=2**63 - 1)]


def _encode_cursor(created_at: datetime, sid: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{sid}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor.encode()).decode()
        ts, sid = raw.split("|", 1)
        return datetime.fromisoformat(ts), uuid.UUID(sid)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("cursor is not one this service issued") from None


@router.get("/collections", response_model=CollectionList)
async def list_collections(edge: EdgeDep, who: Reader) -> CollectionList:
    cols = await edge.gallery.list_collections(who.tenant)
    return CollectionList(collections=[CollectionOut(name=c.name, embedder=c.embedder, dim=c.dim) for c in cols])


@router.post("/collections", response_model=CollectionOut, status_code=201)
async def create_collection(body: CollectionIn, edge: EdgeDep, who: Admin) -> CollectionOut:
    col = await edge.gallery.create_collection(body.name, who.tenant)
    await edge.audit(who, "collection.create", col.name)
    return CollectionOut(name=col.name, embedder=col.embedder, dim=col.dim)


@router.post("/subjects", response_model=SubjectOut, status_code=201)
async def create_subject(body: SubjectIn, edge: EdgeDep, who: Enroller, idempotency_key: IdempotencyKey = None,
                         collection: Annotated[str | None, Query(max_length=128)] = None) -> Any:
    col = await edge.gallery.collection(body.collection or collection, tenant=who.tenant)

    async def work() -> tuple[SubjectOut, uuid.UUID, tuple[str, ...]]:
        subject = await edge.gallery.create_subject(col, body.name, body.metadata)
        await edge.audit(who, "subject.create", str(subject.id), collection=col.name)
        return SubjectOut(**subject.to_dict()), subject.id, ()

    return await idempotent(edge, who, idempotency_key, route="POST /v1/subjects", collection=col.name,
                            content_hash=body_hash({"body": body.model_dump(mode="json")}), status=201,
                            work=work)


@router.get("/subjects", response_model=SubjectList)
async def list_subjects(edge: EdgeDep, col: ReadCollection,
                        name: Annotated[str | None, Query(max_length=256)] = None,
                        limit: Annotated[int, Query(ge=1, le=500)] = 50,
                        cursor: Annotated[str | None, Query(max_length=512)] = None) -> SubjectList:
    after = _decode_cursor(cursor) if cursor else None
    page = await edge.gallery.subjects(col, name=name, limit=limit, after=after)
    return SubjectList(subjects=[SubjectOut(**s.to_dict()) for s in page.subjects],
                       next_cursor=_encode_cursor(*page.next_after) if page.next_after else None,
                       total=page.total)


@router.get("/subjects/{subject_id}", response_model=SubjectOut)
async def get_subject(subject_id: str, edge: EdgeDep, col: ReadCollection) -> SubjectOut:
    return SubjectOut(**(await edge.gallery.get_subject(col, parse_subject_id(subject_id))).to_dict())


@router.patch("/subjects/{subject_id}", response_model=SubjectOut)
async def rename_subject(subject_id: str, body: SubjectPatch, edge: EdgeDep, who: Enroller,
                         col: EnrolCollection) -> SubjectOut:
    subject = await edge.gallery.rename_subject(col, parse_subject_id(subject_id), body.name)
    await edge.audit(who, "subject.rename", subject_id, collection=col.name)
    return SubjectOut(**subject.to_dict())


@router.delete("/subjects/{subject_id}", response_model=SubjectDeleted)
async def delete_subject(subject_id: str, edge: EdgeDep, who: Enroller, col: EnrolCollection) -> SubjectDeleted:
    """An erasure: rows, feedback, every crop under the subject's prefix, the
    index snapshots holding its vectors and its cache entries. The answer
    carries the receipt; `GET /v1/erasures/{id}` says when every copy is gone."""
    removed = await edge.gallery.delete_subject(col, parse_subject_id(subject_id), requested_by=who.actor)
    receipt = ErasureReceipt.of(removed.erasure) if removed.erasure is not None else None
    await edge.audit(who, "subject.delete", subject_id, collection=col.name, faces=removed.faces_removed,
                     seq=removed.seq, **_erasure_details(receipt))
    return SubjectDeleted(deleted=subject_id, faces_removed=removed.faces_removed, seq=removed.seq,
                          crops_pending_cleanup=removed.crops_pending_cleanup,
                          feedback_removed=removed.feedback_removed, erasure=receipt)


def _erasure_details(receipt: ErasureReceipt | None) -> dict[str, object]:
    """What the audit record says was removed, and from where."""
    if receipt is None:
        return {}
    return {"erasure_id": receipt.id, "removed": receipt.removed,
            "copies": {name: {"where": c.where, "removed": c.removed, "complete": c.complete}
                       for name, c in receipt.copies.items()}}


@router.get("/erasures/{erasure_id}", response_model=ErasureReceipt, tags=["erasure"])
async def get_erasure(erasure_id: Annotated[str, Path(max_length=64)], edge: EdgeDep,
                      who: Enroller) -> ErasureReceipt:
    """The receipt of a delete: per copy (Postgres rows, crops in the bucket,
    index snapshots, cache entries) whether it is gone, and `complete` with
    `completed_at` once all are. Another tenant's erasure is not found."""
    return ErasureReceipt.of(await edge.gallery.erasure(erasure_id, who.tenant))


@router.post("/subjects/{subject_id}/faces", response_model=EnrolResponse, response_model_exclude_none=True,
             status_code=201, openapi_extra=IMAGE_BODY)
async def enrol_face(subject_id: str, who: Enroller, req: ImageReq, edge: EdgeDep,
                     idempotency_key: IdempotencyKey = None) -> Any:
    body = req.body
    col = await edge.gallery.collection(body.get("collection"), tenant=who.tenant)
    sid = parse_subject_id(subject_id)
    data = body.image("image", "file")
    policy = await edge.enrol_policy(body.get("liveness"), who)

    async def work() -> tuple[EnrolResponse, uuid.UUID, tuple[str, ...]]:
        result = await edge.gallery.enrol(col, sid, data, req.timer, largest=as_bool(body.get("largest"), "largest"),
                                          policy=policy, min_quality=edge.config().enrol_min_quality)
        await edge.audit(who, "face.add", str(result.face.id), collection=col.name, subject=subject_id,
                         seq=result.seq)
        face = FaceRecordOut(**result.face.to_dict(), liveness=liveness_out(result.analysis.liveness, result.index))
        out = EnrolResponse(face=face, seq=result.seq, faces_in_image=len(result.analysis.detection),
                            timings_ms=req.timer.total())
        # The enrolment image's cache entry is this subject's data from now on.
        return out, sid, (result.analysis.cache_key,) if result.analysis.cache_key else ()

    return await idempotent(edge, who, idempotency_key, route=f"POST /v1/subjects/{sid}/faces",
                            collection=col.name, content_hash=body_hash(body.fields, body.images), status=201,
                            work=work, exclude_none=True)


@router.get("/subjects/{subject_id}/faces", response_model=FaceList)
async def list_faces(subject_id: str, edge: EdgeDep, col: ReadCollection) -> FaceList:
    faces = await edge.gallery.list_faces(col, parse_subject_id(subject_id))
    return FaceList(faces=[FaceRecordOut(**f.to_dict()) for f in faces])


@router.delete("/subjects/{subject_id}/faces/{face_id}", response_model=FaceDeleted)
async def delete_face(subject_id: str, face_id: FaceId, edge: EdgeDep, who: Enroller,
                      col: EnrolCollection) -> FaceDeleted:
    removed = await edge.gallery.remove_face(col, parse_subject_id(subject_id), face_id, requested_by=who.actor)
    receipt = ErasureReceipt.of(removed.erasure) if removed.erasure is not None else None
    await edge.audit(who, "face.delete", str(face_id), collection=col.name, subject=subject_id, seq=removed.seq,
                     **_erasure_details(receipt))
    return FaceDeleted(deleted=face_id, seq=removed.seq, erasure=receipt)
