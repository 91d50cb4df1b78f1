"""HTTP ingress: auth, limits, decoding, the REST API, and the gallery writes.

The only deployment that sees whole images. It decodes each upload once,
sends the array to the detector, and from there only crops travel on.
"""
import asyncio
import base64
import hashlib
import hmac
import io
import logging
import time
import uuid
from datetime import datetime
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from opentelemetry.trace import SpanKind, Status, StatusCode
from ray import serve
from ray.serve.handle import DeploymentHandle

from models.errors import (
    CollectionNotFound,
    FaceServeError,
    InvalidRequest,
    ModelMismatch,
    MultipleFaces,
    NoFaceFound,
    RateLimited,
    SpoofDetected,
    Unauthorized,
)
from models.embedding import SFACE_DEFAULT_THRESHOLD
from models.images import decode_image
from serve_app import http_errors
from serve_app.gallery.objects import ObjectStore
from serve_app.gallery.repository import Collection, GalleryRepository, create_pool, parse_subject_id
from serve_app.metrics import ServiceMetrics
from serve_app.pipeline_client import Analysis, LivenessPolicy, MatchSpec, PipelineClient
from serve_app.quota import RequestQuota
from serve_app.request_images import ParsedRequest, as_bool, as_int, parse_request
from serve_app.settings import Settings
from serve_app.telemetry import access_logger, current_trace_id, mark_error, span_from, tracer
from serve_app.timing import StageTimer

log = logging.getLogger("ray.serve")

API_DESCRIPTION = """Self-hosted face recognition: detect, liveness, enrol, verify (1:1), identify (1:N).

Images go as multipart uploads (`image`, or `image1`/`image2` for verify), as JSON with
base64 strings under the same names, or as raw `image/*` bytes. Every answer carries
per-stage `timings_ms`; every error `{"error": {"code", "message"}}` with a 4xx status
that says what was wrong."""

app = FastAPI(title="faceserve", version="0.1.0", description=API_DESCRIPTION)
http_errors.install(app)

def _body_schema(images: tuple[str, ...], fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """OpenAPI request body for routes that read the body themselves (parse_request)."""

    def props(image_format: str) -> dict[str, Any]:
        out: dict[str, Any] = {name: {"type": "string", "format": image_format} for name in images}
        out.update({name: {"type": "string"} for name in fields})
        return {"schema": {"type": "object", "properties": out}}

    content = {"multipart/form-data": props("binary"), "application/json": props("byte")}
    if images == ("image",):
        content["image/jpeg"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"content": content}}


_IMAGE_BODY = _body_schema(("image",))
_VERIFY_BODY = _body_schema(("image1", "image2"), ("subject_id",))


# serve.ingress() pickles the FastAPI app while this module is still being
# imported, so everything the routes and middleware use must already be
# defined above the class, and annotations must be real objects (no
# `from __future__ import annotations` here): FastAPI reads `Request` from them.

# Per replica process; filled in by Ingress.__init__ (never at import time).
_EDGE: dict[str, Any] = {}


def _remember_metrics(metrics: ServiceMetrics) -> None:
    # Called from the class, whose methods serve.ingress pickles by value with
    # a copy of the module globals; this function is pickled by reference, so
    # it writes into the _EDGE the middleware really reads.
    _EDGE["metrics"] = metrics


@app.middleware("http")
async def _observe(request: Request, call_next: Any) -> Response:
    """Root span, request id, trace id header, access log and status counter."""
    # Serve's proxy assigns every request an id (the client's x-request-id if
    # it sent one) and returns it in the x-request-id response header itself.
    request_id = request.headers.get("x-request-id") or _serve_request_id() or uuid.uuid4().hex
    t0 = time.perf_counter()
    metrics: ServiceMetrics | None = _EDGE.get("metrics")
    with span_from(request.headers, f"{request.method} {request.url.path}", kind=SpanKind.SERVER,
                   attributes={"http.method": request.method, "http.target": request.url.path,
                               "faceserve.request_id": request_id}) as sp:
        trace_id = current_trace_id()
        try:
            response = await call_next(request)
        except Exception as exc:  # unhandled: counted and logged here, then a 500 upstream
            route = getattr(request.scope.get("route"), "path", "unmatched")
            mark_error(sp, exc)
            if metrics is not None:
                metrics.http_responses.inc(tags={"code": "500", "route": route})
            access_logger().exception(
                "%s %s failed", request.method, route,
                extra={"request_id": request_id, "trace_id": trace_id, "route": route, "status": 500},
            )
            raise
        route = getattr(request.scope.get("route"), "path", "unmatched")
        sp.update_name(f"{request.method} {route}")
        sp.set_attribute("http.route", route)
        sp.set_attribute("http.status_code", response.status_code)
        if response.status_code >= 500:
            sp.set_status(Status(StatusCode.ERROR))
    if metrics is not None:
        metrics.http_responses.inc(tags={"code": str(response.status_code), "route": route})
    if trace_id:
        response.headers["x-trace-id"] = trace_id
    # Every answer says how long it took (image answers also list stages in timings_ms).
    response.headers["server-timing"] = f"total;dur={(time.perf_counter() - t0) * 1000.0:.1f}"
    if route not in ("/healthz", "/readyz"):
        access_logger().info(
            "%s %s %s", request.method, route, response.status_code,
            extra={"request_id": request_id, "trace_id": trace_id, "route": route,
                   "method": request.method, "status": response.status_code,
                   "duration_ms": round((time.perf_counter() - t0) * 1000.0, 2)},
        )
    return response


def _server_side(exc: BaseException) -> bool:
    """True for failures that are ours (5xx), false for the caller's 4xx."""
    return not isinstance(exc, FaceServeError) or http_errors.status_for(exc) >= 500


def _serve_request_id() -> str | None:
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # outside a replica (unit tests) there is no context
        return None


def _single_face(analysis: Analysis, what: str, *, largest: bool) -> int:
    n = len(analysis.detection)
    if n == 0:
        raise NoFaceFound(f"no face found in {what}")
    if n > 1 and not largest:
        raise MultipleFaces(
            f"{n} faces found in {what}; send an image with one face or ask for the largest (largest=true)",
            faces=n,
        )
    return 0  # the detector returns faces largest first


def _face_crop_jpeg(image: np.ndarray, box: dict[str, float], margin: float = 0.25) -> bytes:
    from PIL import Image

    h, w = image.shape[:2]
    bw, bh = box["x2"] - box["x1"], box["y2"] - box["y1"]
    x1 = int(max(0, box["x1"] - margin * bw))
    y1 = int(max(0, box["y1"] - margin * bh))
    x2 = int(min(w, box["x2"] + margin * bw))
    y2 = int(min(h, box["y2"] + margin * bh))
    buf = io.BytesIO()
    Image.fromarray(image[y1:y2, x1:x2]).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


async def _json(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body:
        return {}
    try:
        import json

        data = json.loads(body)
    except ValueError:
        raise InvalidRequest("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("JSON body must be an object")
    return data


def _encode_cursor(created_at: datetime, sid: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{sid}".encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor.encode()).decode()
        ts, sid = raw.split("|", 1)
        return datetime.fromisoformat(ts), uuid.UUID(sid)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("cursor is not one this service issued") from None


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.2})
@serve.ingress(app)
class Ingress:
    async def __init__(
        self,
        settings: Settings,
        detector: DeploymentHandle,
        embedder: DeploymentHandle,
        liveness: DeploymentHandle,
        matcher: DeploymentHandle,
    ) -> None:
        settings.setup_telemetry("Ingress")
        self._settings = settings
        self._pipeline = PipelineClient(detector, embedder, liveness, matcher)
        self._api_key = settings.api_key.get_secret_value().encode() if settings.api_key else None
        self._repo = GalleryRepository(
            await create_pool(
                settings.database_dsn(), min_size=settings.db_pool_min, max_size=settings.db_pool_max
            )
        )
        self._objects = ObjectStore(settings.object_store_url)
        self._quota = RequestQuota(settings.redis_url) if settings.redis_url else None
        self._metrics = ServiceMetrics(settings.metrics_enabled)
        _remember_metrics(self._metrics)
        self._collections: dict[str, Collection] = {}
        self._last_seq = 0  # this replica's newest write: its own reads wait for it
        self._cfg: dict[str, Any] = {
            "verify_threshold": SFACE_DEFAULT_THRESHOLD,
            "identify_threshold": SFACE_DEFAULT_THRESHOLD,
            "top_k": 5,
            "max_image_bytes": 15_000_000,
            "max_image_pixels": 40_000_000,
            "liveness_policy_default": "off",
            "enrol_liveness_policy_default": "block",
            "requests_per_minute": 0,  # per client (API key, else IP); 0 = unlimited
        }
        info = await embedder.info.remote()
        self._model, self._dim = info["model"], int(info["dim"])
        await self._collection(settings.default_collection, create=True)
        self._gauges = asyncio.get_running_loop().create_task(self._update_gauges())

    def reconfigure(self, config: dict[str, Any]) -> None:
        self._cfg.update(config)

    # ------------------------------------------------------------------ plumbing
    async def _update_gauges(self) -> None:
        redis_client = None
        if self._settings.redis_url:
            import redis.asyncio as aioredis

            redis_client = aioredis.from_url(self._settings.redis_url)
        while True:
            size, in_use = self._repo.pool_stats()
            self._metrics.db_pool_size.set(size)
            self._metrics.db_pool_in_use.set(in_use)
            self._metrics.db_pool_max.set(self._settings.db_pool_max)
            if redis_client is not None:
                try:
                    info = await redis_client.info("memory")
                    self._metrics.redis_used_memory.set(float(info.get("used_memory", 0)))
                    self._metrics.redis_maxmemory.set(float(info.get("maxmemory", 0)))
                except Exception:  # Redis is optional; its outage must not stop the gauges
                    log.warning("could not read Redis memory info", exc_info=True)
            await asyncio.sleep(5.0)

    async def _image_request(self, request: Request, *, admit: bool = True) -> tuple[StageTimer, ParsedRequest]:
        """Admit the caller (unless done already), start the clock, read the body."""
        if admit:
            await self._admit(request)
        timer = StageTimer()
        return timer, await parse_request(request, max_bytes=int(self._cfg["max_image_bytes"]))

    async def _admit(self, request: Request) -> None:
        """Every /v1 call: the API key, then the caller's per-minute quota."""
        client = self._check_auth(request)
        limit = int(self._cfg.get("requests_per_minute") or 0)
        if limit <= 0 or self._quota is None:
            return
        decision = await self._quota.check(client, limit)
        if not decision.allowed:
            raise RateLimited(
                f"more than {limit} requests a minute from this client; retry later",
                limit=limit,
                retry_after_s=decision.retry_after_s,
            )

    def _check_auth(self, request: Request) -> str:
        """Checks the API key; returns who is calling, for the quota."""
        if self._api_key is None:
            host = request.client.host if request.client else "unknown"
            return f"ip:{host}"
        if self._api_key is None:
            return
        supplied = request.headers.get("x-api-key", "")
        auth = request.headers.get("authorization", "")
        if not supplied and auth.lower().startswith("bearer "):
            supplied = auth[7:]
        if not hmac.compare_digest(supplied.encode(), self._api_key):
            raise Unauthorized("missing or wrong API key (X-API-Key header or Bearer token)")
        return "key:" + hashlib.sha256(supplied.encode()).hexdigest()[:16]

    async def _collection(self, name: str | None, *, create: bool = False) -> Collection:
        name = name or self._settings.default_collection
        found = self._collections.get(name)
        if found is None:
            if create:
                found = await self._repo.ensure_collection(name, self._model, self._dim)
            else:
                found = await self._repo.get_collection(name)
                if found is None:
                    raise CollectionNotFound(f"no collection named {name!r}", collection=name)
            self._collections[name] = found
        if found.embedder != self._model or found.dim != self._dim:
            raise ModelMismatch(
                f"collection {name!r} holds {found.embedder} embeddings but the service runs {self._model}"
            )
        return found

    async def _decode(self, data: bytes, timer: StageTimer) -> np.ndarray:
        t0 = time.perf_counter()
        with tracer().start_as_current_span("decode", attributes={"bytes": len(data)}):
            image = await asyncio.to_thread(
                decode_image,
                data,
                max_bytes=int(self._cfg["max_image_bytes"]),
                max_pixels=int(self._cfg["max_image_pixels"]),
            )
        ms = (time.perf_counter() - t0) * 1000.0
        timer.add("decode", ms)
        self._metrics.observe_stages({"decode": ms})
        return image

    async def _analyse(
        self,
        data: bytes,
        timer: StageTimer,
        *,
        embed: bool,
        policy: LivenessPolicy,
        match: MatchSpec | None = None,
    ) -> Analysis:
        image = await self._decode(data, timer)
        result = await self._pipeline.analyse(
            image, embed=embed, liveness=policy is not LivenessPolicy.OFF, match=match
        )
        for stage, ms in result.timings().items():
            timer.add(stage, ms)
        if policy is LivenessPolicy.BLOCK and result.liveness is not None:
            spoofs = [i for i, live in enumerate(result.liveness.live()) if not live]
            if spoofs:
                raise SpoofDetected(
                    f"{len(spoofs)} face(s) judged not live (a photo or screen?); request refused",
                    faces=spoofs,
                    scores=[round(float(result.liveness.scores[i]), 4) for i in spoofs],
                    threshold=result.liveness.threshold,
                )
        return result

    def _policy(self, value: Any, *, enrol: bool = False) -> LivenessPolicy:
        key = "enrol_liveness_policy_default" if enrol else "liveness_policy_default"
        return LivenessPolicy.parse(value, LivenessPolicy(self._cfg[key]))

    @staticmethod
    def _face_json(analysis: Analysis, i: int) -> dict[str, Any]:
        face = dict(analysis.detection.faces[i])
        if analysis.liveness is not None:
            score = float(analysis.liveness.scores[i])
            face["liveness"] = {
                "live": score >= analysis.liveness.threshold,
                "score": round(score, 4),
                "threshold": analysis.liveness.threshold,
            }
        return face

    # ------------------------------------------------------------------ health
    @app.get("/healthz", tags=["health"])
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz(self) -> JSONResponse:
        checks: dict[str, bool] = await self._pipeline.ready()
        try:
            await asyncio.wait_for(self._repo.ping(), 3.0)
            checks["database"] = True
        except Exception:
            checks["database"] = False
        ok = all(checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    # ------------------------------------------------------------------ analysis
    @app.post("/v1/detect", tags=["faces"], openapi_extra=_IMAGE_BODY)
    async def detect(self, request: Request) -> dict[str, Any]:
        timer, req = await self._image_request(request)
        policy = self._policy(req.get("liveness"))
        analysis = await self._analyse(req.image("image", "file"), timer, embed=False, policy=policy)
        w, h = analysis.detection.image_size
        return {
            "faces": [self._face_json(analysis, i) for i in range(len(analysis.detection))],
            "image": {"width": w, "height": h},
            "timings_ms": timer.total(),
        }

    @app.post("/v1/liveness", tags=["faces"], openapi_extra=_IMAGE_BODY)
    async def liveness(self, request: Request) -> dict[str, Any]:
        timer, req = await self._image_request(request)
        analysis = await self._analyse(
            req.image("image", "file"), timer, embed=False, policy=LivenessPolicy.FLAG
        )
        if not len(analysis.detection):
            raise NoFaceFound("no face found in the image")
        faces = []
        for i in range(len(analysis.detection)):
            face = self._face_json(analysis, i)
            faces.append({"box": face["box"], "detection_score": face["score"], **face["liveness"]})
        return {"faces": faces, "timings_ms": timer.total()}

    @app.post("/v1/verify", tags=["recognition"], openapi_extra=_VERIFY_BODY)
    async def verify(self, request: Request) -> dict[str, Any]:
        await self._admit(request)
        try:
            result = await self._verify(request)
        except Exception as exc:
            if _server_side(exc):  # the caller's bad input is not a failed verification
                self._metrics.verifications.inc(tags={"outcome": "error"})
            raise
        self._metrics.verifications.inc(tags={"outcome": "match" if result["match"] else "no_match"})
        return result

    async def _verify(self, request: Request) -> dict[str, Any]:
        timer, req = await self._image_request(request, admit=False)  # verify() admitted it
        policy = self._policy(req.get("liveness"))
        threshold = float(self._cfg["verify_threshold"])
        subject_id = req.get("subject_id")
        if subject_id:
            collection = await self._collection(req.get("collection"))
            sid = parse_subject_id(subject_id)
            first = await self._analyse(req.image("image", "image1"), timer, embed=True, policy=policy)
            a = _single_face(first, "image", largest=True)
            models, stored = await self._repo.subject_embeddings(collection, sid)
            if not len(stored):
                raise InvalidRequest(f"subject {sid} has no enrolled faces to verify against")
            if any(m != first.embeddings.model for m in models):
                raise ModelMismatch("the subject's faces were embedded by another model")
            sims = stored @ first.embeddings.vectors[a]
            similarity = float(np.max(sims))
            subject = await self._repo.get_subject(collection, sid)
            return {
                "similarity": round(similarity, 4),
                "threshold": threshold,
                "match": similarity >= threshold,
                "model": first.embeddings.model,
                "face": self._face_json(first, a),
                "subject": {"id": str(subject.id), "name": subject.name, "faces_compared": len(stored)},
                "timings_ms": timer.total(),
            }
        img1, img2 = req.image("image1"), req.image("image2")
        first, second = await asyncio.gather(
            self._analyse(img1, timer, embed=True, policy=policy),
            self._analyse(img2, timer, embed=True, policy=policy),
        )
        a = _single_face(first, "image1", largest=True)
        b = _single_face(second, "image2", largest=True)
        similarity = float(first.embeddings.vectors[a] @ second.embeddings.vectors[b])
        return {
            "similarity": round(similarity, 4),
            "threshold": threshold,
            "match": similarity >= threshold,
            "model": first.embeddings.model,
            "faces": {"image1": self._face_json(first, a), "image2": self._face_json(second, b)},
            "timings_ms": timer.total(),
        }

    @app.post("/v1/identify", tags=["recognition"], openapi_extra=_IMAGE_BODY)
    async def identify(self, request: Request) -> dict[str, Any]:
        timer, req = await self._image_request(request)
        collection = await self._collection(req.get("collection"))
        k = as_int(req.get("top_k"), "top_k", default=int(self._cfg["top_k"]), lo=1, hi=100)
        min_seq = as_int(req.get("min_seq"), "min_seq", default=0, lo=0, hi=2**62)
        threshold = float(self._cfg["identify_threshold"])
        policy = self._policy(req.get("liveness"))
        try:
            analysis = await self._analyse(
                req.image("image", "file"),
                timer,
                embed=True,
                policy=policy,
                match=MatchSpec(collection.id, k, max(min_seq, self._last_seq)),
            )
        except Exception as exc:
            if _server_side(exc):
                self._metrics.identifications.inc(tags={"outcome": "error"})
            raise
        if not len(analysis.detection):
            raise NoFaceFound("no face found in the image")
        hits = analysis.matches.hits if analysis.matches else []
        names = await self._repo.subject_names(
            list({uuid.UUID(h.subject_id) for per_face in hits for h in per_face})
        )
        faces = []
        for i in range(len(analysis.detection)):
            candidates = [
                {
                    "subject_id": h.subject_id,
                    "name": names.get(uuid.UUID(h.subject_id)),
                    "similarity": round(h.similarity, 4),
                }
                for h in hits[i]
                if uuid.UUID(h.subject_id) in names  # deleted since the index was read
            ]
            top = candidates[0] if candidates and candidates[0]["similarity"] >= threshold else None
            best = {"id": top["subject_id"], "name": top["name"], "similarity": top["similarity"]} if top else None
            self._metrics.identifications.inc(tags={"outcome": "match" if best else "unknown"})
            face = self._face_json(analysis, i)
            face.update({"decision": "match" if best else "unknown", "subject": best, "candidates": candidates})
            faces.append(face)
        return {
            "faces": faces,
            "collection": collection.name,
            "threshold": threshold,
            "seq": analysis.matches.seq if analysis.matches else 0,
            "timings_ms": timer.total(),
        }

    # ------------------------------------------------------------------ collections
    @app.get("/v1/collections", tags=["gallery"])
    async def list_collections(self, request: Request) -> dict[str, Any]:
        await self._admit(request)
        cols = await self._repo.list_collections()
        return {"collections": [{"name": c.name, "embedder": c.embedder, "dim": c.dim} for c in cols]}

    @app.post("/v1/collections", tags=["gallery"], status_code=201)
    async def create_collection(self, request: Request) -> dict[str, Any]:
        await self._admit(request)
        body = await _json(request)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 128:
            raise InvalidRequest("collection name must be a non-empty string of at most 128 characters")
        col = await self._repo.create_collection(name.strip(), self._model, self._dim)
        self._collections[col.name] = col
        return {"name": col.name, "embedder": col.embedder, "dim": col.dim}

    # ------------------------------------------------------------------ subjects
    @app.post("/v1/subjects", tags=["gallery"], status_code=201)
    async def create_subject(self, request: Request) -> dict[str, Any]:
        await self._admit(request)
        body = await _json(request)
        collection = await self._collection(body.get("collection") or request.query_params.get("collection"))
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise InvalidRequest("metadata must be a JSON object")
        subject = await self._repo.create_subject(collection, body.get("name"), metadata)
        return subject.to_dict()

    @app.get("/v1/subjects", tags=["gallery"])
    async def list_subjects(self, request: Request) -> dict[str, Any]:
        await self._admit(request)
        q = request.query_params
        collection = await self._collection(q.get("collection"))
        if q.get("name"):
            found = await self._repo.find_subject_by_name(collection, q["name"])
            return {"subjects": [found.to_dict()] if found else [], "next_cursor": None,
                    "total": 1 if found else 0}
        limit = as_int(q.get("limit"), "limit", default=50, lo=1, hi=500)
        after = _decode_cursor(q.get("cursor")) if q.get("cursor") else None
        subjects = await self._repo.list_subjects(collection, limit=limit, after=after)
        next_cursor = (
            _encode_cursor(subjects[-1].created_at, subjects[-1].id) if len(subjects) == limit else None
        )
        return {
            "subjects": [s.to_dict() for s in subjects],
            "next_cursor": next_cursor,
            "total": await self._repo.count_subjects(collection),
        }

    @app.get("/v1/subjects/{subject_id}", tags=["gallery"])
    async def get_subject(self, subject_id: str, request: Request) -> dict[str, Any]:
        await self._admit(request)
        collection = await self._collection(request.query_params.get("collection"))
        return (await self._repo.get_subject(collection, parse_subject_id(subject_id))).to_dict()

    @app.patch("/v1/subjects/{subject_id}", tags=["gallery"])
    async def rename_subject(self, subject_id: str, request: Request) -> dict[str, Any]:
        await self._admit(request)
        body = await _json(request)
        collection = await self._collection(request.query_params.get("collection"))
        subject = await self._repo.rename_subject(collection, parse_subject_id(subject_id), body.get("name"))
        return subject.to_dict()

    @app.delete("/v1/subjects/{subject_id}", tags=["gallery"])
    async def delete_subject(self, subject_id: str, request: Request) -> dict[str, Any]:
        await self._admit(request)
        collection = await self._collection(request.query_params.get("collection"))
        removed = await self._repo.delete_subject(collection, parse_subject_id(subject_id))
        self._last_seq = max(self._last_seq, removed.seq)
        leftover = await self._objects.adelete_many(removed.crop_keys)
        return {
            "deleted": subject_id,
            "faces_removed": len(removed.face_ids),
            "seq": removed.seq,
            "crops_pending_cleanup": len(leftover),
        }

    # ------------------------------------------------------------------ faces
    @app.post("/v1/subjects/{subject_id}/faces", tags=["gallery"], status_code=201, openapi_extra=_IMAGE_BODY)
    async def enrol_face(self, subject_id: str, request: Request) -> dict[str, Any]:
        timer, req = await self._image_request(request)
        collection = await self._collection(req.get("collection"))
        sid = parse_subject_id(subject_id)
        await self._repo.get_subject(collection, sid)  # 404 before any model work
        data = req.image("image", "file")
        largest = as_bool(req.get("largest"), "largest")
        policy = self._policy(req.get("liveness"), enrol=True)
        image = await self._decode(data, timer)
        analysis = await self._pipeline.analyse(
            image, embed=True, liveness=policy is not LivenessPolicy.OFF
        )
        for stage, ms in analysis.timings().items():
            timer.add(stage, ms)
        i = _single_face(analysis, "image", largest=largest)
        if policy is LivenessPolicy.BLOCK and analysis.liveness is not None:
            score = float(analysis.liveness.scores[i])
            if score < analysis.liveness.threshold:
                raise SpoofDetected(
                    "the face was judged not live (a photo or screen?); nothing was enrolled",
                    score=round(score, 4),
                    threshold=analysis.liveness.threshold,
                )
        face = analysis.detection.faces[i]
        crop = await asyncio.to_thread(_face_crop_jpeg, image, face["box"])
        crop_key = f"crops/{collection.name}/{sid}/{uuid.uuid4().hex}.jpg"
        with timer.stage("store"):
            # Object first, row second: if the transaction fails the crop is
            # removed again, so no row ever points at a missing object.
            await self._objects.aput(crop_key, crop)
            try:
                record, seq = await self._repo.add_face(
                    collection,
                    sid,
                    embedding=analysis.embeddings.vectors[i],
                    model=analysis.embeddings.model,
                    image_sha256=hashlib.sha256(data).hexdigest(),
                    crop_key=crop_key,
                    box=face["box"],
                    det_score=float(face["score"]),
                )
            except BaseException:
                await self._objects.adelete_many([crop_key])
                raise
        self._last_seq = max(self._last_seq, seq)
        out = record.to_dict()
        if analysis.liveness is not None:
            out["liveness"] = self._face_json(analysis, i)["liveness"]
        return {"face": out, "seq": seq, "faces_in_image": len(analysis.detection), "timings_ms": timer.total()}

    @app.get("/v1/subjects/{subject_id}/faces", tags=["gallery"])
    async def list_faces(self, subject_id: str, request: Request) -> dict[str, Any]:
        await self._admit(request)
        collection = await self._collection(request.query_params.get("collection"))
        faces = await self._repo.list_faces(collection, parse_subject_id(subject_id))
        return {"faces": [f.to_dict() for f in faces]}

    @app.delete("/v1/subjects/{subject_id}/faces/{face_id}", tags=["gallery"])
    async def delete_face(self, subject_id: str, face_id: int, request: Request) -> dict[str, Any]:
        await self._admit(request)
        collection = await self._collection(request.query_params.get("collection"))
        removed = await self._repo.delete_face(collection, parse_subject_id(subject_id), face_id)
        self._last_seq = max(self._last_seq, removed.seq)
        await self._objects.adelete_many(removed.crop_keys)
        return {"deleted": face_id, "seq": removed.seq}
