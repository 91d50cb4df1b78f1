""""Not this person": report a wrong match, list and remove the reports."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from serve_app.api.body import parse_request
from serve_app.api.deps import EdgeDep, EnrolCollection, Enroller, ReadCollection
from serve_app.api.openapi_bodies import body as openapi_body
from serve_app.api.schemas import FeedbackIn, FeedbackList, FeedbackOut
from serve_app.errors import InvalidRequest
from serve_app.gallery.repository import parse_subject_id

router = APIRouter(prefix="/v1", tags=["feedback"])

_BODY = openapi_body("ImageForm", "FeedbackIn", raw=True)


@router.post("/subjects/{subject_id}/not-this-person", response_model=FeedbackOut, status_code=201,
             response_model_exclude_none=True, openapi_extra=_BODY)
async def not_this_person(subject_id: str, request: Request, edge: EdgeDep, who: Enroller,
                          col: EnrolCollection) -> FeedbackOut:
    """The probe (an image, or the trace id + face of an identify answer) is not this subject:
    later identifies of a probe this close do not decide for the subject."""
    sid = parse_subject_id(subject_id)
    body = await parse_request(request, max_bytes=edge.config().max_image_bytes)
    note = str(body.get("note") or "")[:1000]
    if body.images:
        out = await edge.feedback.report(col, sid, actor=who.actor, note=note, image=body.image("image", "file"))
    else:
        try:
            form = FeedbackIn.model_validate({k: v for k, v in body.fields.items() if k in FeedbackIn.model_fields})
        except ValueError as exc:
            raise InvalidRequest(f"send an image, or trace_id and face: {exc}".splitlines()[0]) from None
        out = await edge.feedback.report(col, sid, actor=who.actor, note=form.note or note,
                                         trace_id=form.trace_id, face=form.face)
    await edge.audit(who, "feedback.add", str(out["id"]), subject=subject_id, collection=col.name)
    return FeedbackOut(**out)


@router.get("/feedback", response_model=FeedbackList, response_model_exclude_none=True)
async def list_feedback(edge: EdgeDep, col: ReadCollection,
                        subject_id: Annotated[str | None, Query(max_length=64)] = None) -> FeedbackList:
    sid = parse_subject_id(subject_id) if subject_id else None
    return FeedbackList(feedback=[FeedbackOut(**f) for f in await edge.feedback.list(col, sid)])


@router.delete("/feedback/{feedback_id}", status_code=204)
async def delete_feedback(feedback_id: Annotated[int, Path(ge=1, le=2**63 - 1)], edge: EdgeDep, who: Enroller,
                          col: EnrolCollection) -> None:
    await edge.feedback.delete(col, feedback_id)
    await edge.audit(who, "feedback.delete", str(feedback_id), collection=col.name)
