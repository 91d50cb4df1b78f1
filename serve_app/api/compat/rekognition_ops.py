"""The Rekognition operations, each a translation onto faceserve's services.

Mapping (docs/COMPATIBILITY.md has the full table):
- collection = a collection of the key's tenant;
- face = a face row; FaceId = its integer id in UUID form (aws.face_uuid);
- user = a subject, UserId = the subject's name; ExternalImageId = the name of
  the subject IndexFaces files the face under (made on first use), so a face
  indexed with ExternalImageId "x" belongs to user "x".
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import re
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from models.images import SUPPORTED_FORMATS, sniff_format
from serve_app.api.compat import aws
from serve_app.api.compat.aws import AwsError, invalid, not_found
from serve_app.api.deps import Edge
from serve_app.errors import Conflict, LowQuality, NoFaceFound, NotFound
from serve_app.gallery.repository import Collection, FaceRecord, Subject
from serve_app.messages import Hit
from serve_app.pipeline_client import AnalyseSpec, Analysis, MatchSpec
from serve_app.services.access import Principal
from serve_app.services.liveness_policy import LivenessPolicy
from serve_app.timing import StageTimer

_COLLECTION_ID = re.compile(r"^[a-zA-Z0-9_.\-]{1,128}$")  # AWS allows 255; our names stop at 128
_USER_ID = re.compile(r"^[a-zA-Z0-9_.\-:]{1,128}$")
_EXTERNAL_ID = re.compile(r"^[a-zA-Z0-9_.\-:]{1,255}$")
_S3_PART = re.compile(r"^[A-Za-z0-9!_.*'()\-][A-Za-z0-9!_.*'()/\-]{0,1023}$")
_PAGE = 500  # subjects per page when walking a collection


@dataclass
class Call:
    edge: Edge
    who: Principal
    body: dict[str, Any]

    def str_field(self, name: str, pattern: re.Pattern[str] | None = None, *, required: bool = True) -> str | None:
        value = self.body.get(name)
        if value is None:
            if required:
                raise invalid(f"{name} is required")
            return None
        if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
            raise invalid(f"{name} is not valid: {str(value)[:80]!r}")
        return value

    def int_field(self, name: str, default: int, lo: int, hi: int) -> int:
        value = self.body.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise invalid(f"{name} must be an integer between {lo} and {hi}")
        return value

    async def collection(self) -> Collection:
        name = self.str_field("CollectionId", _COLLECTION_ID)
        try:
            return await self.edge.gallery.collection(name, tenant=self.who.tenant)
        except NotFound:
            raise not_found(f"The collection id: {name} does not exist") from None

    async def image(self, name: str = "Image") -> bytes:
        return await image_bytes(self.edge, self.who, self.body.get(name), name)

    def threshold(self, name: str, service_threshold: float) -> tuple[float, float]:
        return aws.match_threshold(self.body, name, service_threshold)


Op = Callable[[Call], Awaitable[dict[str, Any]]]


# --- images -------------------------------------------------------------------------------
async def image_bytes(edge: Edge, who: Principal, image: Any, name: str) -> bytes:
    """Image.Bytes (base64 in JSON, as botocore sends blobs) or Image.S3Object, read from
    faceserve's object store under s3/<tenant>/<Bucket>/<Name>: one tenant's keys can only
    name its own objects, never crops or index snapshots."""
    limit = edge.config().max_image_bytes
    if not isinstance(image, dict) or ("Bytes" in image) == ("S3Object" in image):
        raise invalid(f"{name} must have exactly one of Bytes or S3Object")
    if "Bytes" in image:
        raw = image["Bytes"]
        if not isinstance(raw, str):
            raise invalid(f"{name}.Bytes must be base64")
        if len(raw) > limit * 4 // 3 + 8:
            raise AwsError("ImageTooLargeException", f"{name} is over the {limit}-byte limit")
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise invalid(f"{name}.Bytes is not valid base64") from None
    else:
        data = await _s3_object(edge, who, image["S3Object"], name)
    if not data:
        raise invalid(f"{name} is empty")
    if len(data) > limit:
        raise AwsError("ImageTooLargeException", f"{name} is {len(data)} bytes; the limit is {limit}")
    fmt = sniff_format(data)
    if fmt is None or fmt not in SUPPORTED_FORMATS:
        raise AwsError("InvalidImageFormatException", f"Request has invalid image format ({name})")
    return data


async def _s3_object(edge: Edge, who: Principal, obj: Any, name: str) -> bytes:
    if not isinstance(obj, dict) or not isinstance(obj.get("Bucket"), str) or not isinstance(obj.get("Name"), str):
        raise invalid(f"{name}.S3Object needs Bucket and Name")
    bucket, key = obj["Bucket"], obj["Name"]
    if obj.get("Version") is not None:
        raise AwsError("InvalidS3ObjectException", "S3 object versions are not supported")
    if not _S3_PART.match(bucket) or "/" in bucket or not _S3_PART.match(key) \
            or any(p in ("", ".", "..") for p in key.split("/")):
        raise AwsError("InvalidS3ObjectException", "Unable to get object metadata from S3. Check object key")
    store = edge.gallery.objects
    if not hasattr(store, "get"):
        raise AwsError("InvalidS3ObjectException", "this deployment's object store cannot be read")
    try:
        return await asyncio.to_thread(store.get, f"s3/{who.tenant}/{bucket}/{key}")
    except (FileNotFoundError, KeyError, ValueError):
        raise AwsError("InvalidS3ObjectException",
                       "Unable to get object metadata from S3. Check object key, region and/or access permissions.") from None


# --- gallery walks --------------------------------------------------------------------------
async def all_subjects(edge: Edge, col: Collection) -> list[Subject]:
    out: list[Subject] = []
    after = None
    while True:
        page = await edge.gallery.subjects(col, name=None, limit=_PAGE, after=after)
        out.extend(page.subjects)
        if page.next_after is None:
            return out
        after = page.next_after


async def subject_named(edge: Edge, col: Collection, name: str) -> Subject | None:
    page = await edge.gallery.subjects(col, name=name, limit=1, after=None)
    return page.subjects[0] if page.subjects else None


async def all_faces(edge: Edge, col: Collection, subjects: list[Subject] | None = None) -> list[tuple[Subject, FaceRecord]]:
    """Every face of the collection with its subject (one query per subject)."""
    out: list[tuple[Subject, FaceRecord]] = []
    for s in subjects if subjects is not None else await all_subjects(edge, col):
        try:
            out.extend((s, f) for f in await edge.gallery.list_faces(col, s.id))
        except NotFound:  # deleted meanwhile
            continue
    return out


async def find_faces(edge: Edge, col: Collection, face_ids: list[Any]) -> dict[str, tuple[Subject, FaceRecord] | None]:
    wanted = {fid: aws.face_id_of(fid) for fid in face_ids}
    by_id = {f.id: (s, f) for s, f in await all_faces(edge, col)}
    return {fid: by_id.get(n) if n is not None else None for fid, n in wanted.items()}


def face_out(subject: Subject, face: FaceRecord, model: str) -> dict[str, Any]:
    """Rekognition's Face. No BoundingBox: faceserve keeps the box in pixels, not the image size."""
    return {"FaceId": aws.face_uuid(face.id), "ImageId": aws.image_uuid(face.image_sha256),
            "ExternalImageId": subject.name, "UserId": subject.name,
            "Confidence": float(face.det_score) * 100.0, "IndexFacesModelVersion": model}


def face_ids_field(call: Call, name: str = "FaceIds") -> list[str]:
    ids = call.body.get(name)
    if not isinstance(ids, list) or not 1 <= len(ids) <= 4096 or not all(isinstance(i, str) for i in ids):
        raise invalid(f"{name} must be a list of 1 to 4096 FaceIds")
    return ids


# --- searching ------------------------------------------------------------------------------
async def _match(call: Call, col: Collection, data: bytes, k: int, timer: StageTimer) -> Analysis:
    edge = call.edge
    spec = AnalyseSpec(embed=True, match=MatchSpec(col.id, min(k, 100), known_seq=edge.gallery.last_seq),
                       model=col.embedder)
    analysis = await edge.recognition.analyse(data, timer, spec, edge.policy(None))
    if not len(analysis.detection):
        raise invalid("There are no faces in the image. Should be at least 1.")
    return analysis


async def _hit_faces(call: Call, col: Collection, hits: list[Hit]) -> list[tuple[Hit, Subject, FaceRecord]]:
    """The subject and face row of each hit; hits on rows deleted since the index was read drop out."""
    out = []
    for h in hits:
        try:
            sid = uuid.UUID(h.subject_id)
            subject = await call.edge.gallery.get_subject(col, sid)
            face = next((f for f in await call.edge.gallery.list_faces(col, sid) if f.id == h.face_id), None)
        except NotFound:
            continue
        if face is not None:
            out.append((h, subject, face))
    return out


async def _stored_face_image(call: Call, face: FaceRecord) -> bytes:
    """A stored face's crop: what SearchFaces / SearchUsers search with (faceserve keeps
    the crop, the embedding stays inside the matcher)."""
    store = call.edge.gallery.objects
    if not face.crop_key or not hasattr(store, "get"):
        raise invalid("this face has no stored crop to search with")
    return await asyncio.to_thread(store.get, face.crop_key)


async def _search_with_face(call: Call, col: Collection, face: FaceRecord, k: int) -> list[Hit]:
    analysis = await _match(call, col, await _stored_face_image(call, face), k + 1, StageTimer())
    hits = analysis.matches.hits[0] if analysis.matches else []
    return [h for h in hits if h.face_id != face.id]


# --- collections ----------------------------------------------------------------------------
def _arn(call: Call, name: str) -> str:
    return f"arn:faceserve:rekognition:local:{call.who.tenant}:collection/{name}"


async def create_collection(call: Call) -> dict[str, Any]:
    call.who.require("admin")
    name = call.str_field("CollectionId", _COLLECTION_ID)
    try:
        col = await call.edge.gallery.create_collection(name, call.who.tenant)  # type: ignore[arg-type]
    except Conflict:
        raise AwsError("ResourceAlreadyExistsException", f"The collection id: {name} already exists") from None
    await call.edge.audit(call.who, "collection.create", col.name, via="rekognition")
    return {"StatusCode": 200, "CollectionArn": _arn(call, col.name), "FaceModelVersion": col.embedder}


async def delete_collection(call: Call) -> dict[str, Any]:
    call.who.require("admin")
    col = await call.collection()
    removed = await call.edge.gallery.delete_collection(col)
    await call.edge.audit(call.who, "collection.delete", col.name, via="rekognition", faces=removed.faces_removed)
    return {"StatusCode": 200}


async def list_collections(call: Call) -> dict[str, Any]:
    call.who.require("read")
    limit = call.int_field("MaxResults", 1000, 1, 4096)
    start = _offset(call.body.get("NextToken"))
    cols = await call.edge.gallery.list_collections(call.who.tenant)
    page = cols[start:start + limit]
    out: dict[str, Any] = {"CollectionIds": [c.name for c in page], "FaceModelVersions": [c.embedder for c in page]}
    if start + limit < len(cols):
        out["NextToken"] = str(start + limit)
    return out


async def describe_collection(call: Call) -> dict[str, Any]:
    call.who.require("read")
    col = await call.collection()
    subjects = await all_subjects(call.edge, col)
    return {"FaceCount": sum(s.face_count for s in subjects), "UserCount": len(subjects),
            "FaceModelVersion": col.embedder, "CollectionARN": _arn(call, col.name)}


def _offset(token: Any) -> int:
    if token is None:
        return 0
    if not isinstance(token, str) or not token.isdigit():
        raise AwsError("InvalidPaginationTokenException", "Invalid pagination token")
    return int(token)


# --- faces ------------------------------------------------------------------------------------
async def index_faces(call: Call) -> dict[str, Any]:
    """The largest face goes in, filed under the subject named ExternalImageId; the others
    come back as UnindexedFaces (EXCEEDS_MAX_FACES): a faceserve subject is one person."""
    call.who.require("enrol")
    edge = call.edge
    col = await call.collection()
    ext = call.str_field("ExternalImageId", _EXTERNAL_ID, required=False)
    if ext is None:
        raise invalid("faceserve files every face under a person: ExternalImageId (the person's name) is required")
    call.int_field("MaxFaces", 1, 1, 4096)
    data = await call.image()
    subject, created = await subject_named(edge, col, ext), False
    if subject is None:
        try:
            subject, created = await edge.gallery.create_subject(col, ext, {"source": "rekognition"}), True
        except Conflict:  # made by a concurrent call
            subject = await subject_named(edge, col, ext)
            if subject is None:
                raise
    timer = StageTimer()
    try:
        result = await edge.gallery.enrol(col, subject.id, data, timer, largest=True,
                                          policy=await edge.enrol_policy(None, call.who),
                                          min_quality=edge.config().enrol_min_quality)
    except (NoFaceFound, LowQuality) as exc:  # AWS answers these with nothing indexed, not an error
        if created:
            await edge.gallery.delete_subject(col, subject.id)
        return {"FaceRecords": [], "FaceModelVersion": col.embedder,
                "UnindexedFaces": [] if isinstance(exc, NoFaceFound) else await _unindexed(call, data, exc)}
    except BaseException:
        if created:
            await asyncio.shield(edge.gallery.delete_subject(col, subject.id))
        raise
    await edge.audit(call.who, "face.add", str(result.face.id), collection=col.name, subject=str(subject.id),
                     via="rekognition")
    det = result.analysis.detection
    w, h = det.image_size
    faces = det.faces
    face = {**face_out(subject, result.face, col.embedder), "BoundingBox": aws.bounding_box(faces[result.index].box, w, h)}
    return {
        "FaceRecords": [{"Face": face, "FaceDetail": aws.face_detail(faces[result.index], w, h)}],
        "UnindexedFaces": [{"Reasons": ["EXCEEDS_MAX_FACES"], "FaceDetail": aws.face_detail(f, w, h)}
                           for i, f in enumerate(faces) if i != result.index],
        "FaceModelVersion": col.embedder,
    }


async def _unindexed(call: Call, data: bytes, exc: LowQuality) -> list[dict[str, Any]]:
    """Every face of an image refused on quality: the largest with its reasons, the rest as
    EXCEEDS_MAX_FACES (a second detection pass gives their details; the refusal carries none)."""
    analysis = await call.edge.recognition.detect(data, StageTimer(), LivenessPolicy.OFF)
    w, h = analysis.detection.image_size
    return [{"Reasons": aws.unindexed_reasons(exc.details.get("reasons")) if i == 0 else ["EXCEEDS_MAX_FACES"],
             "FaceDetail": aws.face_detail(f, w, h)} for i, f in enumerate(analysis.detection.faces)]


async def list_faces(call: Call) -> dict[str, Any]:
    call.who.require("read")
    col = await call.collection()
    limit = call.int_field("MaxResults", 1000, 1, 4096)
    start = _offset(call.body.get("NextToken"))
    user = call.str_field("UserId", _USER_ID, required=False)
    wanted = set(face_ids_field(call)) if call.body.get("FaceIds") is not None else None
    subjects = await all_subjects(call.edge, col)
    if user is not None:
        subjects = [s for s in subjects if s.name == user]
    faces = [face_out(s, f, col.embedder) for s, f in await all_faces(call.edge, col, subjects)]
    if wanted is not None:
        faces = [f for f in faces if f["FaceId"] in wanted]
    out: dict[str, Any] = {"Faces": faces[start:start + limit], "FaceModelVersion": col.embedder}
    if start + limit < len(faces):
        out["NextToken"] = str(start + limit)
    return out


async def delete_faces(call: Call) -> dict[str, Any]:
    call.who.require("enrol")
    col = await call.collection()
    found = await find_faces(call.edge, col, face_ids_field(call))
    deleted, failed = [], []
    for fid, hit in found.items():
        if hit is None:
            failed.append({"FaceId": fid, "Reasons": ["FACE_NOT_FOUND"]})
            continue
        subject, face = hit
        try:
            seq = await call.edge.gallery.delete_face(col, subject.id, face.id)
        except NotFound:
            failed.append({"FaceId": fid, "Reasons": ["FACE_NOT_FOUND"]})
            continue
        await call.edge.audit(call.who, "face.delete", str(face.id), collection=col.name, subject=str(subject.id),
                              seq=seq, via="rekognition")
        deleted.append(fid)
    return {"DeletedFaces": deleted, "UnsuccessfulFaceDeletions": failed}


async def search_faces_by_image(call: Call) -> dict[str, Any]:
    call.who.require("read")
    col = await call.collection()
    k = call.int_field("MaxFaces", 100, 1, 4096)
    _, sim = call.threshold("FaceMatchThreshold", call.edge.config().identify_threshold)
    data = await call.image()
    analysis = await _match(call, col, data, k, StageTimer())
    face = analysis.detection.faces[0]  # largest first, as Rekognition searches the largest face
    w, h = analysis.detection.image_size
    hits = [x for x in (analysis.matches.hits[0] if analysis.matches else []) if x.similarity >= sim][:k]
    return {"SearchedFaceBoundingBox": aws.bounding_box(face.box, w, h),
            "SearchedFaceConfidence": float(face.score) * 100.0,
            "FaceMatches": await _face_matches(call, col, hits),
            "FaceModelVersion": col.embedder}


async def _face_matches(call: Call, col: Collection, hits: list[Hit]) -> list[dict[str, Any]]:
    t = call.edge.config().identify_threshold
    return [{"Similarity": aws.similarity_to_percent(hit.similarity, t), "Face": face_out(s, f, col.embedder)}
            for hit, s, f in await _hit_faces(call, col, hits)]


async def search_faces(call: Call) -> dict[str, Any]:
    call.who.require("read")
    col = await call.collection()
    fid = call.str_field("FaceId")
    k = call.int_field("MaxFaces", 100, 1, 4096)
    _, sim = call.threshold("FaceMatchThreshold", call.edge.config().identify_threshold)
    found = (await find_faces(call.edge, col, [fid]))[fid]  # type: ignore[list-item,index]
    if found is None:
        raise invalid(f"The face id: {fid} does not exist in the collection")
    hits = [x for x in await _search_with_face(call, col, found[1], k) if x.similarity >= sim][:k]
    return {"SearchedFaceId": fid, "FaceMatches": await _face_matches(call, col, hits),
            "FaceModelVersion": col.embedder}


# --- images without a collection ----------------------------------------------------------------
async def detect_faces(call: Call) -> dict[str, Any]:
    call.who.require("read")
    attrs = call.body.get("Attributes", ["DEFAULT"])
    if not isinstance(attrs, list):
        raise invalid("Attributes must be a list")
    analysis = await call.edge.recognition.detect(await call.image(), StageTimer(), call.edge.policy(None))
    w, h = analysis.detection.image_size
    return {"FaceDetails": [aws.face_detail(f, w, h) for f in analysis.detection.faces]}


async def compare_faces(call: Call) -> dict[str, Any]:
    """The largest source face against every target face: cosine similarity of the
    embeddings the embedder returns, mapped to 0-100 around verify_threshold."""
    call.who.require("read")
    edge = call.edge
    _, sim = call.threshold("SimilarityThreshold", edge.config().verify_threshold)
    source, target = await call.image("SourceImage"), await call.image("TargetImage")
    timer, policy = StageTimer(), edge.policy(None)
    spec = AnalyseSpec(embed=True, liveness=policy.checks)
    a, b = await asyncio.gather(edge.recognition.analyse(source, timer, spec, policy),
                                edge.recognition.analyse(target, timer, spec, policy))
    if not len(a.detection):
        raise invalid("There are no faces in the source image. Should be at least 1.")
    if not len(b.detection):
        raise invalid("There are no faces in the target image. Should be at least 1.")
    assert a.embeddings is not None and b.embeddings is not None
    if a.embeddings.model != b.embeddings.model:
        raise invalid("the two images were embedded by different models")
    sw, sh = a.detection.image_size
    tw, th = b.detection.image_size
    t = edge.config().verify_threshold
    scores = b.embeddings.vectors @ a.embeddings.vectors[0]
    matches, unmatched = [], []
    for j, f in enumerate(b.detection.faces):
        detail = aws.face_detail(f, tw, th)
        if float(scores[j]) >= sim:
            matches.append({"Similarity": aws.similarity_to_percent(float(scores[j]), t), "Face": detail})
        else:
            unmatched.append(detail)
    matches.sort(key=lambda m: -m["Similarity"])
    src = a.detection.faces[0]
    return {"SourceImageFace": {"BoundingBox": aws.bounding_box(src.box, sw, sh), "Confidence": float(src.score) * 100},
            "FaceMatches": matches, "UnmatchedFaces": unmatched}


# --- users ----------------------------------------------------------------------------------------
async def _user(call: Call, col: Collection) -> Subject:
    user = call.str_field("UserId", _USER_ID)
    subject = await subject_named(call.edge, col, user)  # type: ignore[arg-type]
    if subject is None:
        raise not_found(f"The user id: {user} does not exist")
    return subject


async def create_user(call: Call) -> dict[str, Any]:
    """Idempotent: a user that exists (made by CreateUser or by IndexFaces) is left as it is."""
    call.who.require("enrol")
    col = await call.collection()
    user = call.str_field("UserId", _USER_ID)
    if await subject_named(call.edge, col, user) is None:  # type: ignore[arg-type]
        try:
            subject = await call.edge.gallery.create_subject(col, user, {"source": "rekognition"})  # type: ignore[arg-type]
            await call.edge.audit(call.who, "subject.create", str(subject.id), collection=col.name, via="rekognition")
        except Conflict:
            pass
    return {}


async def delete_user(call: Call) -> dict[str, Any]:
    """Deletes the subject with its faces (Rekognition would keep the faces, unassociated)."""
    call.who.require("enrol")
    col = await call.collection()
    subject = await _user(call, col)
    removed = await call.edge.gallery.delete_subject(col, subject.id)
    await call.edge.audit(call.who, "subject.delete", str(subject.id), collection=col.name,
                          faces=removed.faces_removed, via="rekognition")
    return {}


async def list_users(call: Call) -> dict[str, Any]:
    call.who.require("read")
    col = await call.collection()
    limit = call.int_field("MaxResults", 500, 1, 500)
    start = _offset(call.body.get("NextToken"))
    subjects = await all_subjects(call.edge, col)
    out: dict[str, Any] = {"Users": [{"UserId": s.name, "UserStatus": "ACTIVE"} for s in subjects[start:start + limit]]}
    if start + limit < len(subjects):
        out["NextToken"] = str(start + limit)
    return out


async def associate_faces(call: Call) -> dict[str, Any]:
    """A face is filed under one subject from the moment it is indexed, so a face
    already under this user is associated, and one under another user cannot move
    (ASSOCIATED_TO_A_DIFFERENT_USER)."""
    own, failed = await _faces_of_user(call)
    return {"AssociatedFaces": [{"FaceId": fid} for fid in own], "UnsuccessfulFaceAssociations": failed,
            "UserStatus": "ACTIVE"}


async def _faces_of_user(call: Call) -> tuple[list[str], list[dict[str, Any]]]:
    """The request's FaceIds split into the user's own and the failures
    (FACE_NOT_FOUND, ASSOCIATED_TO_A_DIFFERENT_USER)."""
    call.who.require("enrol")
    col = await call.collection()
    subject = await _user(call, col)
    own: list[str] = []
    failed: list[dict[str, Any]] = []
    for fid, hit in (await find_faces(call.edge, col, face_ids_field(call))).items():
        if hit is None:
            failed.append({"FaceId": fid, "Reasons": ["FACE_NOT_FOUND"]})
        elif hit[0].id != subject.id:
            failed.append({"FaceId": fid, "UserId": hit[0].name, "Reasons": ["ASSOCIATED_TO_A_DIFFERENT_USER"]})
        else:
            own.append(fid)
    return own, failed


async def disassociate_faces(call: Call) -> dict[str, Any]:
    own, failed = await _faces_of_user(call)
    if own:
        raise invalid("faceserve keeps every face with its person and cannot disassociate it; "
                      "delete the face (DeleteFaces) and index it again under another ExternalImageId")
    return {"DisassociatedFaces": [], "UnsuccessfulFaceDisassociations": failed, "UserStatus": "ACTIVE"}


def _user_matches(call: Call, hits: list[Hit], names: dict[str, str], sim: float, k: int) -> list[dict[str, Any]]:
    t = call.edge.config().identify_threshold
    return [{"Similarity": aws.similarity_to_percent(h.similarity, t),
             "User": {"UserId": names[h.subject_id], "UserStatus": "ACTIVE"}}
            for h in hits if h.similarity >= sim and h.subject_id in names][:k]


async def _names(call: Call, col: Collection, hits: list[Hit]) -> dict[str, str]:
    return {str(s.id): s.name for _, s, _ in await _hit_faces(call, col, hits)}


async def search_users(call: Call) -> dict[str, Any]:
    call.who.require("read")
    col = await call.collection()
    k = call.int_field("MaxUsers", 100, 1, 500)
    _, sim = call.threshold("UserMatchThreshold", call.edge.config().identify_threshold)
    has_user, has_face = call.body.get("UserId") is not None, call.body.get("FaceId") is not None
    if has_user == has_face:
        raise invalid("give exactly one of UserId and FaceId")
    out: dict[str, Any] = {"FaceModelVersion": col.embedder}
    if has_face:
        fid = call.str_field("FaceId")
        found = (await find_faces(call.edge, col, [fid]))[fid]  # type: ignore[list-item,index]
        if found is None:
            raise not_found(f"The face id: {fid} does not exist")
        subject, face = found
        out["SearchedFace"] = {"FaceId": fid}
    else:
        subject = await _user(call, col)
        faces = await call.edge.gallery.list_faces(col, subject.id)
        if not faces:
            raise invalid(f"The user id: {subject.name} has no faces to search with")
        face = faces[0]
        out["SearchedUser"] = {"UserId": subject.name}
    hits = [h for h in await _search_with_face(call, col, face, k + 1) if h.subject_id != str(subject.id)]
    out["UserMatches"] = _user_matches(call, hits, await _names(call, col, hits), sim, k)
    return out


async def search_users_by_image(call: Call) -> dict[str, Any]:
    call.who.require("read")
    col = await call.collection()
    k = call.int_field("MaxUsers", 100, 1, 500)
    _, sim = call.threshold("UserMatchThreshold", call.edge.config().identify_threshold)
    analysis = await _match(call, col, await call.image(), k, StageTimer())
    w, h = analysis.detection.image_size
    faces = analysis.detection.faces
    hits = analysis.matches.hits[0] if analysis.matches else []
    return {"UserMatches": _user_matches(call, hits, await _names(call, col, hits), sim, k),
            "FaceModelVersion": col.embedder,
            "SearchedFace": {"FaceDetail": aws.face_detail(faces[0], w, h)},
            "UnsearchedFaces": [{"FaceDetails": aws.face_detail(f, w, h), "Reasons": ["FACE_NOT_LARGEST"]}
                                for f in faces[1:]]}


OPERATIONS: dict[str, tuple[Op, bool]] = {  # name -> (handler, carries images)
    "CreateCollection": (create_collection, False),
    "DeleteCollection": (delete_collection, False),
    "ListCollections": (list_collections, False),
    "DescribeCollection": (describe_collection, False),
    "IndexFaces": (index_faces, True),
    "ListFaces": (list_faces, False),
    "DeleteFaces": (delete_faces, False),
    "SearchFaces": (search_faces, False),
    "SearchFacesByImage": (search_faces_by_image, True),
    "CompareFaces": (compare_faces, True),
    "DetectFaces": (detect_faces, True),
    "CreateUser": (create_user, False),
    "DeleteUser": (delete_user, False),
    "ListUsers": (list_users, False),
    "AssociateFaces": (associate_faces, False),
    "DisassociateFaces": (disassociate_faces, False),
    "SearchUsers": (search_users, False),
    "SearchUsersByImage": (search_users_by_image, True),
}
