"""A face's stored crop: what the gallery holds for it, shown by the console.

Same scope and tenant isolation as the other gallery reads: the collection
comes from the caller's tenant, so another tenant's face is a 404.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import Response

from serve_app.api.deps import EdgeDep, ReadCollection
from serve_app.gallery.repository import parse_subject_id

router = APIRouter(prefix="/v1", tags=["gallery"])

FaceId = Annotated[int, Path(ge=1, le=2**63 - 1)]


@router.get("/subjects/{subject_id}/faces/{face_id}/crop", response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}, "description": "the face crop stored at enrolment"}})
async def face_crop(subject_id: str, face_id: FaceId, edge: EdgeDep, col: ReadCollection) -> Response:
    data = await edge.gallery.face_crop(col, parse_subject_id(subject_id), face_id)
    # A face id never gets another crop; private: the answer depends on the key.
    return Response(data, media_type="image/jpeg",
                    headers={"cache-control": "private, max-age=3600", "x-content-type-options": "nosniff"})
