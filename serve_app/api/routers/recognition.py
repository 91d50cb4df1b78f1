"""detect, liveness, verify (1:1), identify (1:N)."""
from __future__ import annotations

from fastapi import APIRouter

from serve_app.api.body import as_int
from serve_app.api.deps import EdgeDep, ImageReq, Reader
from serve_app.api.schemas import (
    CandidateOut,
    DetectResponse,
    IdentifiedFaceOut,
    IdentifyResponse,
    ImageSize,
    LivenessFaceOut,
    LivenessResponse,
    MatchedSubject,
    VerifyFaces,
    VerifyResponse,
    VerifySubjectOut,
    box_out,
    face_out,
    liveness_out,
)
from serve_app.api.openapi_bodies import IMAGE_BODY, VERIFY_BODY
from serve_app.gallery.repository import parse_subject_id
from serve_app.services.decisions import parse_fmr, policy_for

router = APIRouter(prefix="/v1", tags=["recognition"])


@router.post("/detect", response_model=DetectResponse, response_model_exclude_unset=True, openapi_extra=IMAGE_BODY,
             tags=["faces"])
async def detect(who: Reader, req: ImageReq, edge: EdgeDep) -> DetectResponse:
    body = req.body
    analysis = await edge.recognition.detect(body.image("image", "file"), req.timer,
                                             edge.policy(body.get("liveness")))
    det = analysis.detection
    return DetectResponse(
        faces=[face_out(f, analysis.liveness, i) for i, f in enumerate(det.faces)],
        image=ImageSize(width=det.image_size[0], height=det.image_size[1]),
        timings_ms=req.timer.total(),
    )


@router.post("/liveness", response_model=LivenessResponse, openapi_extra=IMAGE_BODY, tags=["faces"])
async def liveness(who: Reader, req: ImageReq, edge: EdgeDep) -> LivenessResponse:
    analysis = await edge.recognition.liveness(req.body.image("image", "file"), req.timer)
    faces = []
    for i, f in enumerate(analysis.detection.faces):
        live = liveness_out(analysis.liveness, i)
        assert live is not None
        faces.append(LivenessFaceOut(box=box_out(f.box), detection_score=round(f.score, 4),
                                     live=live.live, score=live.score, threshold=live.threshold))
    return LivenessResponse(faces=faces, timings_ms=req.timer.total())


@router.post("/verify", response_model=VerifyResponse, response_model_exclude_none=True, openapi_extra=VERIFY_BODY)
async def verify(who: Reader, req: ImageReq, edge: EdgeDep) -> VerifyResponse:
    body, cfg = req.body, edge.config()
    policy = edge.policy(body.get("liveness"))
    decide = policy_for(edge.calibration, target_fmr=parse_fmr(body.get("target_fmr")),
                        default_threshold=cfg.verify_threshold, maybe_fmr=cfg.maybe_fmr)
    subject_id = body.get("subject_id")
    if subject_id:
        col = await edge.gallery.collection(body.get("collection"), tenant=who.tenant)
        v = await edge.recognition.verify_subject(body.image("image", "image1"), col, parse_subject_id(subject_id),
                                                  req.timer, policy, decide)
        assert v.subject is not None
        extra = {"face": face_out(v.first.detection.faces[v.first_face], v.first.liveness, v.first_face),
                 "subject": VerifySubjectOut(id=str(v.subject.id), name=v.subject.name,
                                             faces_compared=v.faces_compared)}
    else:
        v = await edge.recognition.verify_pair(body.image("image1"), body.image("image2"), req.timer, policy,
                                               decide)
        assert v.second is not None and v.second_face is not None
        extra = {"faces": VerifyFaces(
            image1=face_out(v.first.detection.faces[v.first_face], v.first.liveness, v.first_face),
            image2=face_out(v.second.detection.faces[v.second_face], v.second.liveness, v.second_face))}
    fmr = decide.fmr_at(v.similarity)
    return VerifyResponse(similarity=round(v.similarity, 4), threshold=round(decide.threshold, 4), match=v.match,
                          decision=v.decision, fmr=_sig(fmr), target_fmr=_sig(decide.target_fmr),  # type: ignore[arg-type]
                          maybe_threshold=_r4(decide.maybe_threshold), model=v.model,
                          timings_ms=req.timer.total(), **extra)


@router.post("/identify", response_model=IdentifyResponse, response_model_exclude_unset=True, openapi_extra=IMAGE_BODY)
async def identify(who: Reader, req: ImageReq, edge: EdgeDep) -> IdentifyResponse:
    body, cfg = req.body, edge.config()
    col = await edge.gallery.collection(body.get("collection"), tenant=who.tenant)
    k = as_int(body.get("top_k"), "top_k", default=cfg.top_k, lo=1, hi=100)
    min_seq = as_int(body.get("min_seq"), "min_seq", default=0, lo=0, hi=2**62)
    decide = policy_for(edge.calibration, target_fmr=parse_fmr(body.get("target_fmr")),
                        default_threshold=cfg.identify_threshold, maybe_fmr=cfg.maybe_fmr)
    result = await edge.recognition.identify(
        body.image("image", "file"), col, req.timer, k=k, min_seq=min_seq, known_seq=edge.gallery.last_seq,
        policy=edge.policy(body.get("liveness")), decide=decide, feedback_similarity=cfg.feedback_similarity)
    a = result.analysis
    faces = []
    for f in result.faces:
        base = face_out(a.detection.faces[f.index], a.liveness, f.index)
        faces.append(IdentifiedFaceOut(
            **base.model_dump(exclude_unset=True),
            decision=f.decision,  # type: ignore[arg-type]
            subject=MatchedSubject(id=f.subject.subject_id, name=f.subject.name,
                                   similarity=round(f.subject.similarity, 4)) if f.subject else None,
            candidates=[CandidateOut(subject_id=c.subject_id, name=c.name, similarity=round(c.similarity, 4),
                                     fmr=_sig(c.fmr), demoted=c.demoted)
                        for c in f.candidates],
        ))
    model = a.embeddings.model if a.embeddings is not None else None
    return IdentifyResponse(faces=faces, collection=result.collection, model=model,
                            threshold=round(decide.threshold, 4),
                            target_fmr=_sig(decide.target_fmr), maybe_threshold=_r4(decide.maybe_threshold),
                            seq=result.seq, timings_ms=req.timer.total())


def _sig(x: float | None) -> float | None:
    """Rates shown to 3 significant figures."""
    return float(f"{x:.3g}") if x is not None else None


def _r4(x: float | None) -> float | None:
    return round(x, 4) if x is not None else None
