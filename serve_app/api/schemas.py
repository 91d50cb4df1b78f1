"""Pydantic request and response models: /openapi.json is the contract.

Rounding happens here and only here: the services hand over full-precision
values, the edge shows 1 decimal for pixels and 4 for scores.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.api import validation

from serve_app.messages import FaceInfo, LivenessResult

LivenessParam = Literal["off", "flag", "block"]


# --- errors -------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable reason")
    message: str
    details: dict[str, Any] | None = None
    trace_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# --- faces ----------------------------------------------------------------------------
class BoxOut(BaseModel):
    x1: float
    y1: float
    x2: float
    y2: float


class LivenessOut(BaseModel):
    live: bool
    score: float
    threshold: float


class QualityOut(BaseModel):
    score: float = Field(description="0-1; below 0.5 exactly when there are reasons")
    reasons: list[str] = Field(description="too_small, blurred, too_dark, too_bright, strong_pose, "
                                           "partly_outside, low_detection_score")


class FaceOut(BaseModel):
    box: BoxOut
    landmarks: list[list[float]] = Field(description="5 points: eyes, nose tip, mouth corners")
    score: float
    quality: QualityOut | None = None
    liveness: LivenessOut | None = None


def box_out(box: tuple[float, float, float, float]) -> BoxOut:
    return BoxOut(x1=round(box[0], 1), y1=round(box[1], 1), x2=round(box[2], 1), y2=round(box[3], 1))


def liveness_out(result: LivenessResult | None, i: int) -> LivenessOut | None:
    if result is None:
        return None
    score = float(result.scores[i])
    return LivenessOut(live=score >= result.threshold, score=round(score, 4), threshold=result.threshold)


def face_out(face: FaceInfo, liveness: LivenessResult | None = None, i: int = 0) -> FaceOut:
    """``liveness`` is left unset (and out of the JSON) when it was not checked."""
    live = liveness_out(liveness, i)
    extra: dict[str, Any] = {"liveness": live} if live is not None else {}
    if face.quality is not None:
        extra["quality"] = QualityOut(score=round(float(face.quality["score"]), 3),  # type: ignore[arg-type]
                                      reasons=list(face.quality["reasons"]))  # type: ignore[call-overload]
    return FaceOut(
        box=box_out(face.box),
        landmarks=[[round(float(x), 1), round(float(y), 1)] for x, y in face.landmarks],
        score=round(float(face.score), 4),
        **extra,
    )


class ImageSize(BaseModel):
    width: int
    height: int


Timings = dict[str, float]


class DetectResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"description": "faces largest first"})
    faces: list[FaceOut]
    image: ImageSize
    timings_ms: Timings


class LivenessFaceOut(BaseModel):
    box: BoxOut
    detection_score: float
    live: bool
    score: float
    threshold: float


class LivenessResponse(BaseModel):
    faces: list[LivenessFaceOut]
    timings_ms: Timings


class VerifySubjectOut(BaseModel):
    id: str
    name: str
    faces_compared: int


class VerifyFaces(BaseModel):
    image1: FaceOut
    image2: FaceOut


class VerifyResponse(BaseModel):
    similarity: float
    threshold: float
    match: bool
    decision: Literal["match", "maybe", "no_match"]
    fmr: float | None = Field(None, description="estimated false-match rate of accepting at this similarity")
    target_fmr: float | None = Field(None, description="the FMR the threshold stands for")
    maybe_threshold: float | None = None
    model: str
    faces: VerifyFaces | None = None
    face: FaceOut | None = None
    subject: VerifySubjectOut | None = None
    timings_ms: Timings


class CandidateOut(BaseModel):
    subject_id: str
    name: str | None
    similarity: float
    fmr: float | None = Field(None, description="estimated false-match rate at this similarity")
    demoted: bool = Field(False, description="reported 'not this person' for a probe like this one")


class MatchedSubject(BaseModel):
    id: str
    name: str | None
    similarity: float


class IdentifiedFaceOut(FaceOut):
    decision: Literal["match", "maybe", "unknown"]
    subject: MatchedSubject | None
    candidates: list[CandidateOut]


class IdentifyResponse(BaseModel):
    faces: list[IdentifiedFaceOut]
    collection: str
    model: str | None = Field(None, description="the embedder the probe was compared with: the collection's")
    threshold: float
    target_fmr: float | None = None
    maybe_threshold: float | None = None
    seq: int
    timings_ms: Timings


# --- image request bodies (documented; parsed by api/body.py) ---------------------------
class _ImageOptions(BaseModel):
    """Fields every image route reads (each uses the ones that apply to it)."""

    liveness: LivenessParam | None = None
    collection: str | None = None
    top_k: int | None = Field(None, ge=1, le=100)
    min_seq: int | None = Field(None, ge=0)
    largest: bool | None = None
    target_fmr: float | None = Field(None, gt=0, lt=1, description="decide at this false-match rate")


class ImageForm(_ImageOptions):
    """multipart/form-data: the image file plus optional fields."""

    image: bytes = Field(json_schema_extra={"format": "binary"})


class ImageJSON(_ImageOptions):
    """application/json: the image as base64 (or a data: URL)."""

    image: str = Field(json_schema_extra={"format": "byte"})


class VerifyForm(BaseModel):
    """multipart/form-data: two images, or one image and subject_id."""

    image1: bytes = Field(json_schema_extra={"format": "binary"})
    image2: bytes | None = Field(None, json_schema_extra={"format": "binary"})
    subject_id: str | None = None
    collection: str | None = None
    liveness: LivenessParam | None = None
    target_fmr: float | None = Field(None, gt=0, lt=1, description="decide at this false-match rate")


class VerifyJSON(BaseModel):
    """application/json: base64 images, or one image and subject_id."""

    image1: str = Field(json_schema_extra={"format": "byte"})
    image2: str | None = Field(None, json_schema_extra={"format": "byte"})
    subject_id: str | None = None
    collection: str | None = None
    liveness: LivenessParam | None = None
    target_fmr: float | None = Field(None, gt=0, lt=1, description="decide at this false-match rate")


# --- gallery ---------------------------------------------------------------------------------
class CollectionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validation.collection_name(v)


class CollectionOut(BaseModel):
    name: str
    embedder: str
    dim: int


class CollectionList(BaseModel):
    collections: list[CollectionOut]


class SubjectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=256)
    metadata: dict[str, Any] = Field(default_factory=dict, description="at most 16 KB as JSON, 8 levels deep")
    collection: str | None = Field(None, max_length=128)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validation.clean_text(v, "name")

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, v: dict[str, Any]) -> dict[str, Any]:
        return validation.metadata(v)


class SubjectPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=256)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validation.clean_text(v, "name")


class SubjectOut(BaseModel):
    id: str
    collection: str
    name: str
    metadata: dict[str, Any]
    face_count: int
    created_at: str
    updated_at: str


class SubjectList(BaseModel):
    subjects: list[SubjectOut]
    next_cursor: str | None
    total: int


class ErasureCopyOut(BaseModel):
    """One place the erased data lived."""

    complete: bool
    where: list[str] = Field(description="tables, object keys/prefixes, cache names")
    items: int = Field(description="work items (keys, prefixes, batches) for this copy")
    items_done: int
    removed: int = Field(description="rows, objects or cache entries actually deleted")
    attempts: int = Field(description="most attempts any item of this copy took so far")
    last_error: str | None = Field(None, description="why the latest failed attempt failed (while pending)")
    notes: list[str] = []
    done_at: str | None = None


class ErasureReceipt(BaseModel):
    """What a delete removed and from where, and when every copy was gone."""

    id: str
    kind: Literal["face", "subject", "collection"]
    target: str = Field(description="face id, subject id or collection name")
    collection: str
    seq: int = Field(description="change-log seq of the delete (matchers drop the vectors once they reach it)")
    requested_by: str
    requested_at: str
    removed: dict[str, Any] = Field(description="Postgres rows removed, by table (and the face ids)")
    copies: dict[Literal["postgres", "crops", "snapshots", "cache"], ErasureCopyOut]
    complete: bool
    completed_at: str | None = None

    @classmethod
    def of(cls, r: Any) -> "ErasureReceipt":
        """From a serve_app.gallery.erasures.Receipt."""
        iso = lambda t: t.isoformat() if t is not None else None  # noqa: E731
        return cls(id=str(r.id), kind=r.kind, target=r.target, collection=r.collection, seq=r.seq,
                   requested_by=r.requested_by, requested_at=iso(r.requested_at), removed=r.removed,
                   copies={c.copy: ErasureCopyOut(complete=c.complete, where=c.where, items=c.items,
                                                  items_done=c.items_done, removed=c.removed, attempts=c.attempts,
                                                  last_error=c.last_error, notes=c.notes, done_at=iso(c.done_at))
                           for c in r.copies},
                   complete=r.complete, completed_at=iso(r.completed_at))


class SubjectDeleted(BaseModel):
    deleted: str
    faces_removed: int
    seq: int
    crops_pending_cleanup: int = Field(description="crop items the erasure has not confirmed gone yet")
    feedback_removed: int = 0
    erasure: ErasureReceipt | None = Field(
        None, description="the receipt; GET /v1/erasures/{id} follows it until complete")


class FaceRecordOut(BaseModel):
    id: int
    subject_id: str
    model: str
    image_sha256: str
    box: dict[str, float]
    det_score: float
    created_at: str
    liveness: LivenessOut | None = None


class EnrolResponse(BaseModel):
    face: FaceRecordOut
    seq: int
    faces_in_image: int
    timings_ms: Timings


class FaceList(BaseModel):
    faces: list[FaceRecordOut]


class FaceDeleted(BaseModel):
    deleted: int
    seq: int
    erasure: ErasureReceipt | None = None


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool]


# Models documented as request bodies of the image routes (see api/app.py).
REQUEST_BODY_MODELS: tuple[type[BaseModel], ...] = (ImageForm, ImageJSON, VerifyForm, VerifyJSON)


class FeedbackIn(BaseModel):
    """JSON form of "not this person": the identify answer's trace id and face index."""

    model_config = ConfigDict(extra="forbid")
    trace_id: str = Field(min_length=16, max_length=64, pattern=r"^[0-9a-f]+$")
    face: int = Field(0, ge=0, le=1000)
    note: str = Field("", max_length=1000)
    collection: str | None = Field(None, max_length=128)


class FeedbackOut(BaseModel):
    id: int
    subject_id: str
    source: str
    actor: str
    note: str
    created_at: str
    # On a new report: the change-log seq identify reflects it from (pass as min_seq).
    seq: int | None = None


class FeedbackList(BaseModel):
    feedback: list[FeedbackOut]
