"""CompreFace's REST API, as its Python SDK (compreface-sdk) calls it.

The ``x-api-key`` header carries a faceserve key token (or the bootstrap
key); CompreFace's "face collection" is the key's tenant's default
collection, the one the native API uses when no collection is named
(``?collection=`` picks another of the tenant's). So a face added here is
found by /v1/identify and the other way round. Routes translate onto the
same services as the native ones; shapes are in api/compat/compreface_shapes.py.
"""
from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serve_app.api.body import ParsedRequest, parse_request, read_json_object
from serve_app.api.compat import aws
from serve_app.api.compat import compreface_shapes as cf
from serve_app.api.compat.rekognition_ops import all_faces, all_subjects, subject_named
from serve_app.api.deps import Edge, get_edge, principal
from serve_app.errors import Conflict, FaceNotFound, InvalidRequest, NoFaceFound, SubjectNotFound
from serve_app.gallery.repository import Collection, FaceRecord, Subject
from serve_app.pipeline_client import AnalyseSpec
from serve_app.services.decisions import policy_for
from serve_app.services.access import Principal
from serve_app.timing import StageTimer

router = APIRouter(prefix="/api/v1", tags=["compat: CompreFace"])

Handler = Callable[[Request, Edge, Principal], Awaitable[Any]]


async def _serve(request: Request, scope: str, handler: Handler) -> JSONResponse:
    edge = get_edge(request)
    try:
        who = await principal(request, edge, tenant=None)
        who.require(scope)
        return JSONResponse(await handler(request, edge, who))
    except Exception as exc:
        status, body = cf.error_body(exc)
        return JSONResponse(body, status_code=status)


async def _collection(request: Request, edge: Edge, who: Principal) -> Collection:
    return await edge.gallery.collection(request.query_params.get("collection") or None, tenant=who.tenant)


async def _image(request: Request, edge: Edge, *names: str) -> ParsedRequest:
    body = await parse_request(request, max_bytes=edge.config().max_image_bytes)
    for name in names:
        body.image(name)  # present and an image, or the error
    return body


def _float(value: Any, name: str, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be a number, got {value!r}") from None


def _int(value: Any, name: str, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer, got {value!r}") from None
    if n < 0:
        raise InvalidRequest(f"{name} must be zero or more")
    return n


def _faces_kept(faces: list[Any], body: ParsedRequest) -> list[int]:
    """Indexes of the faces at or above det_prob_threshold, at most ``limit`` (0 = all)."""
    keep = [i for i, f in enumerate(faces) if f.score >= _float(body.get("det_prob_threshold"), "det_prob_threshold", 0.0)]
    limit = _int(body.get("limit"), "limit", 0)
    return keep[:limit] if limit else keep


async def _find_face(edge: Edge, col: Collection, image_id: str) -> tuple[Subject, FaceRecord]:
    n = aws.face_id_of(image_id)
    for s, f in await all_faces(edge, col) if n is not None else []:
        if f.id == n:
            return s, f
    raise FaceNotFound(f"image {image_id!r} not found", image_id=image_id)


async def _crop(edge: Edge, face: FaceRecord) -> bytes:
    store = edge.gallery.objects
    if not face.crop_key or not hasattr(store, "get"):
        raise InvalidRequest("this image has no stored face to verify against")
    return await asyncio.to_thread(store.get, face.crop_key)


# --- recognition: faces ------------------------------------------------------------------
@router.post("/recognition/faces", summary="CompreFace: add an image of a subject")
async def add_face(request: Request) -> JSONResponse:
    async def run(request: Request, edge: Edge, who: Principal) -> Any:
        body = await _image(request, edge, "file")
        name = str(body.get("subject") or "").strip()
        if not name:
            raise InvalidRequest("subject is required")
        col = await _collection(request, edge, who)
        subject, created = await subject_named(edge, col, name), False
        if subject is None:
            try:
                subject, created = await edge.gallery.create_subject(col, name, {"source": "compreface"}), True
            except Conflict:
                subject = await subject_named(edge, col, name)
                if subject is None:
                    raise
        try:
            result = await edge.gallery.enrol(col, subject.id, body.image("file"), StageTimer(), largest=True,
                                              policy=await edge.enrol_policy(None, who),
                                              min_quality=edge.config().enrol_min_quality)
            if result.analysis.detection.faces[result.index].score < _float(
                    body.get("det_prob_threshold"), "det_prob_threshold", 0.0):
                await edge.gallery.delete_face(col, subject.id, result.face.id)
                raise NoFaceFound("No face is found in the given image")
        except BaseException:
            if created:
                await asyncio.shield(edge.gallery.delete_subject(col, subject.id))
            raise
        await edge.audit(who, "face.add", str(result.face.id), collection=col.name, subject=str(subject.id),
                         via="compreface")
        return {"image_id": aws.face_uuid(result.face.id), "subject": subject.name}

    return await _serve(request, "enrol", run)


@router.get("/recognition/faces", summary="CompreFace: list the saved images")
async def list_faces(request: Request) -> JSONResponse:
    async def run(request: Request, edge: Edge, who: Principal) -> Any:
        col = await _collection(request, edge, who)
        q = request.query_params
        page, size = _int(q.get("page"), "page", 0), max(1, _int(q.get("size"), "size", 20))
        subjects = await all_subjects(edge, col)
        if q.get("subject"):
            subjects = [s for s in subjects if s.name == q["subject"]]
        faces = [{"image_id": aws.face_uuid(f.id), "subject": s.name} for s, f in await all_faces(edge, col, subjects)]
        return {"faces": faces[page * size:(page + 1) * size], "page_number": page, "page_size": size,
                "total_pages": (len(faces) + size - 1) // size, "total_elements": len(faces)}

    return await _serve(request, "read", run)


@router.delete("/recognition/faces", summary="CompreFace: delete all images of a subject")
async def delete_subject_faces(request: Request) -> JSONResponse:
    async def run(request: Request, edge: Edge, who: Principal) -> Any:
        col = await _collection(request, edge, who)
        name = request.query_params.get("subject")
        subjects = await all_subjects(edge, col)
        chosen = [s for s in subjects if s.name == name] if name else subjects
        deleted = 0
        for s in chosen:
            for f in await edge.gallery.list_faces(col, s.id):
                await edge.gallery.delete_face(col, s.id, f.id)
                deleted += 1
        await edge.audit(who, "face.delete", name or "*", collection=col.name, faces=deleted, via="compreface")
        return {"deleted": deleted}

    return await _serve(request, "enrol", run)


@router.delete("/recognition/faces/{image_id}", summary="CompreFace: delete an image by id")
async def delete_face(request: Request, image_id: str) -> JSONResponse:
    async def run(request: Request, edge: Edge, who: Principal) -> Any:
        col = await _collection(request, edge, who)
        subject, face = await _find_face(edge, col, image_id)
        await edge.gallery.delete_face(col, subject.id, face.id)
        await edge.audit(who, "face.delete", str(face.id), collection=col.name, subject=str(subject.id),
                         via="compreface")
        return {"image_id": image_id, "subject": subject.name}

    return await _serve(request, "enrol", run)


@router.post("/recognition/faces/{image_id}/verify", summary="CompreFace: verify faces against a saved image")
async def verify_against_image(request: Request, image_id: str) -> JSONResponse:
    async def run(request: Request, edge: Edge, who: Principal) -> Any:
        body = await _image(request, edge, "file")
        col = await _collection(request, edge, who)
        _, face = await _find_face(edge, col, image_id)
        return {"result": await _compare(edge, await _crop(edge, face), body.image("file"), body,
                                         saved_image=True)}

    return await _serve(request, "read", run)


@router.post("/recognition/recognize", summary="CompreFace: recognize the faces in an image")
async def recognize(request: Request) -> JSONResponse:
    async def run(request: Request, edge: Edge, who: Principal) -> Any:
        body = await _image(request, edge, "file")
        col = await _collection(request, edge, who)
        cfg = edge.config()
        k = min(100, max(1, _int(body.get("prediction_count"), "prediction_count", 1)))
        decide = policy_for(edge.calibration, target_fmr=None, default_threshold=cfg.identify_threshold,
                            maybe_fmr=cfg.maybe_fmr)
        result = await edge.recognition.identify(body.image("file"), col, StageTimer(), k=k, min_seq=0,
                                                 known_seq=edge.gallery.last_seq, policy=edge.policy(None),
                                                 decide=decide, feedback_similarity=cfg.feedback_similarity)
        faces, plugins = result.analysis.detection.faces, cf.plugins_of(body.get("face_plugins"))
        out = []
        for i in _faces_kept(faces, body):
            found = result.faces[i]
            out.append({**cf.face_result(faces[i], plugins),
                        "subjects": [{"subject": c.name, "similarity": cf.similarity(c.similarity, cfg.identify_threshold)}
                                     for c in found.candidates[:k]]})
        return {"result": out, "plugins_versions": cf.PLUGINS_VERSIONS}

    return await _serve(request, "read", run)


# --- recognition: subjects ------------------------------------------------------------------
async def _json(request: Request) -> dict[str, Any]:
    return await read_json_object(request, 65536)


@router.get("/recognition/subjects", summary="CompreFace: list subjects")
async def list_subjects(request: Request) -> JSONResponse:
    async def run(request: Request, edge: Edge, who: Principal) -> Any:
        return {"subjects": [s.name for s in await all_subjects(edge, await _collection(request, edge, who))]}

    return await _serve(request, "read", run)


@router.post("/recognition/subjects", summary="CompreFace: add a subject")
async def add_subject(request: Request) -> JSONResponse:
    async def run(request: Request, edge: Edge, who: Principal) -> Any:
        name = (await _json(request)).get("subject")
        col = await _collection(request, edge, who)
        subject = await edge.gallery.create_subject(col, name, {"source": "compreface"})  # type: ignore[arg-type]
        await edge.audit(who, "subject.create", str(subject.id), collection=col.name, via="compreface")
        return {"subject": subject.name}

    return await _serve(request, "enrol", run)


@router.put("/recognition/subjects/{name}", summary="CompreFace: rename a subject")
async def rename_subject(request: Request, name: str) -> JSONResponse:
    async def run(request: Request, edge: Edge, who: Principal) -> Any:
        new = (await _json(request)).get("subject")
        col = await _collection(request, edge, who)
        subject = await subject_named(edge, col, name)
        if subject is None:
            raise SubjectNotFound(f"Subject {name!r} not found", subject=name)
        await edge.gallery.rename_subject(col, subject.id, new)  # type: ignore[arg-type]
        await edge.audit(who, "subject.rename", str(subject.id), collection=col.name, via="compreface")
        return {"updated": True}

    return await _serve(request, "enrol", run)


@router.delete("/recognition/subjects/{name}", summary="CompreFace: delete a subject and its images")
async def delete_subject(request: Request, name: str) -> JSONResponse:
    async def run(request: Request, edge: Edge, who: Principal) -> Any:
        col = await _collection(request, edge, who)
        subject = await subject_named(edge, col, name)
        if subject is None:
            raise SubjectNotFound(f"Subject {name!r} not found", subject=name)
        removed = await edge.gallery.delete_subject(col, subject.id)
        await edge.audit(who, "subject.delete", str(subject.id), collection=col.name,
                         faces=removed.faces_removed, via="compreface")
        return {"subject": name}

    return await _serve(request, "enrol", run)


@router.delete("/recognition/subjects", summary="CompreFace: delete every subject")
async def delete_all_subjects(request: Request) -> JSONResponse:
    async def run(request: Request, edge: Edge, who: Principal) -> Any:
        col = await _collection(request, edge, who)
        subjects = await all_subjects(edge, col)
        for s in subjects:
            await edge.gallery.delete_subject(col, s.id)
        await edge.audit(who, "subject.delete", "*", collection=col.name, subjects=len(subjects), via="compreface")
        return {"deleted": len(subjects)}

    return await _serve(request, "enrol", run)


# --- detection, verification ----------------------------------------------------------------
@router.post("/detection/detect", summary="CompreFace: detect faces")
async def detect(request: Request) -> JSONResponse:
    async def run(request: Request, edge: Edge, who: Principal) -> Any:
        body = await _image(request, edge, "file")
        analysis = await edge.recognition.detect(body.image("file"), StageTimer(), edge.policy(None))
        faces, plugins = analysis.detection.faces, cf.plugins_of(body.get("face_plugins"))
        return {"result": [cf.face_result(faces[i], plugins) for i in _faces_kept(faces, body)],
                "plugins_versions": cf.PLUGINS_VERSIONS}

    return await _serve(request, "read", run)


@router.post("/verification/verify", summary="CompreFace: compare a source face with the faces of a target image")
async def verify(request: Request) -> JSONResponse:
    async def run(request: Request, edge: Edge, who: Principal) -> Any:
        body = await _image(request, edge, "source_image", "target_image")
        return {"result": await _compare(edge, body.image("source_image"), body.image("target_image"), body)}

    return await _serve(request, "read", run)


async def _compare(edge: Edge, source: bytes, target: bytes, body: ParsedRequest, *,
                   saved_image: bool = False) -> list[dict[str, Any]]:
    """The largest source face against every kept target face (cosine of the embeddings,
    mapped around verify_threshold). ``saved_image``: CompreFace's verify-by-image-id
    answer, one entry per target face."""
    timer, policy = StageTimer(), edge.policy(None)
    spec = AnalyseSpec(embed=True, liveness=policy.checks)
    a, b = await asyncio.gather(edge.recognition.analyse(source, timer, spec, policy),
                                edge.recognition.analyse(target, timer, spec, policy))
    if not len(a.detection) or not len(b.detection):
        raise NoFaceFound("No face is found in the given image")
    assert a.embeddings is not None and b.embeddings is not None
    if a.embeddings.model != b.embeddings.model:
        raise InvalidRequest("the two images were embedded by different models")
    t = edge.config().verify_threshold
    plugins = cf.plugins_of(body.get("face_plugins"))
    scores = b.embeddings.vectors @ a.embeddings.vectors[0]
    matches = [{**cf.face_result(b.detection.faces[j], plugins), "similarity": cf.similarity(float(scores[j]), t)}
               for j in _faces_kept(b.detection.faces, body)]
    matches.sort(key=lambda m: -m["similarity"])
    if saved_image:
        return matches
    return [{"source_image_face": cf.face_result(a.detection.faces[0], plugins), "face_matches": matches,
             "plugins_versions": cf.PLUGINS_VERSIONS}]
