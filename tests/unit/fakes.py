"""In-memory stand-ins for the pipeline, the repository and the object store.

Small and honest: the repository keeps real rows in dicts and enforces the
same errors the Postgres one raises, the pipeline answers from scripted
per-image outcomes (bytes -> faces, vectors, liveness scores).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np

from serve_app.errors import Conflict, FaceNotFound, SubjectNotFound
from serve_app.gallery.repository import Collection, FaceRecord, RemovedFaces, Subject
from serve_app.messages import DetectionResult, EmbeddingResult, FaceInfo, Hit, LivenessResult, MatchResult
from serve_app.pipeline_client import AnalyseSpec, Analysis

DIM = 4


def unit(*v: float) -> np.ndarray:
    a = np.asarray(v, np.float32)
    return a / np.linalg.norm(a)


@dataclass
class Scripted:
    """What the fake pipeline finds in one image."""

    vectors: list[np.ndarray]
    live: list[float] = field(default_factory=list)
    error: Exception | None = None
    quality: dict[str, object] | None = None


class FakePipeline:
    def __init__(self, repo: "FakeRepo | None" = None, live_threshold: float = 0.5) -> None:
        self.images: dict[bytes, Scripted] = {}
        self.calls: list[AnalyseSpec] = []
        self.repo = repo
        self.live_threshold = live_threshold

    def script(self, data: bytes, *vectors: np.ndarray, live: list[float] | None = None) -> bytes:
        self.images[data] = Scripted(list(vectors), live or [0.99] * len(vectors))
        return data

    async def analyse(self, data: bytes, spec: AnalyseSpec) -> Analysis:
        self.calls.append(spec)
        s = self.images[data]
        if s.error is not None:
            raise s.error
        n = len(s.vectors)
        faces = [FaceInfo((10.0 * i, 0.0, 10.0 * i + 50.0, 60.0), np.zeros((5, 2), np.float32), 0.9, s.quality)
                 for i in range(n)]
        det = DetectionResult(faces=faces, aligned=np.zeros((n, 112, 112, 3), np.uint8),
                              liveness_crops=None, enrol_crops=[b"jpeg%d" % i for i in range(n)] if spec.enrol_crops else None,
                              image_size=(640, 480), image_format="JPEG", timings_ms={"detect": 1.0})
        emb = (EmbeddingResult("fake", DIM, np.stack(s.vectors) if n else np.zeros((0, DIM), np.float32),
                               {"embed": 1.0}) if (spec.embed or spec.match) else None)
        live = LivenessResult(np.asarray(s.live, np.float32), self.live_threshold, {"liveness": 1.0}) if spec.liveness else None
        match = None
        if spec.match is not None and self.repo is not None and emb is not None:
            match = MatchResult(self.repo.search(spec.match.collection_id, emb.vectors, spec.match.k,
                                                 spec.match.feedback_similarity),
                                self.repo.seq, {"search": 1.0})
        return Analysis(det, emb, live, match)


class FakeObjects:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.fail_put = False
        self.fail_delete = False  # deletes, listings and lookups fail (a store outage)

    def _check(self) -> None:
        if self.fail_delete:
            raise OSError("object store down")

    def list_keys(self, prefix: str) -> list[str]:
        self._check()
        base = prefix.rstrip("/") + "/"
        return sorted(k for k in self.data if k.startswith(base))

    def present(self, key: str) -> bool:
        self._check()
        return key in self.data

    def delete_keys(self, keys: list[str]) -> None:
        self._check()
        for k in keys:
            self.data.pop(k, None)

    async def aput(self, key: str, data: bytes) -> None:
        if self.fail_put:
            raise OSError("object store down")
        self.data[key] = data

    async def aget(self, key: str) -> bytes:
        if key not in self.data:
            raise FileNotFoundError(key)
        return self.data[key]

    async def adelete_many(self, keys: list[str]) -> list[str]:
        if self.fail_delete:
            return list(keys)
        for k in keys:
            self.data.pop(k, None)
        return []


class FakeErasures:
    """The erasures and object_outbox tables in memory, with the SQL's rules:
    claims lease rows (attempts + 1, due again after the lease), a guard is
    consumed only while unclaimed, the last finished row completes its
    erasure. `clock` is seconds, advanced by the test."""

    def __init__(self) -> None:
        self.clock = 0.0
        self.erasures: dict[uuid.UUID, dict[str, Any]] = {}
        self.outbox: dict[int, dict[str, Any]] = {}
        self.audits: list[dict[str, Any]] = []

    def _now(self) -> datetime:
        return datetime.fromtimestamp(1e9 + self.clock, timezone.utc)

    def record(self, collection: Collection, *, kind: str, target: str, seq: int, requested_by: str,
               removed: dict[str, Any], entries: list[Any]) -> uuid.UUID:
        eid = uuid.uuid4()
        self.erasures[eid] = {"id": eid, "tenant": collection.tenant, "collection_name": collection.name,
                              "collection_id": collection.id, "kind": kind, "target": target, "seq": seq,
                              "requested_by": requested_by, "requested_at": self._now(), "removed": removed,
                              "completed_at": None}
        for e in entries:
            self._insert(eid, e.copy, e.op, e.target, list(e.items), e.below_seq, self.clock)
        return eid

    def _insert(self, eid: uuid.UUID | None, copy: str, op: str, target: str, items: list[str],
                below_seq: int | None, not_before: float) -> int:
        rid = len(self.outbox) + 1
        self.outbox[rid] = {"id": rid, "erasure_id": eid, "copy": copy, "op": op, "target": target, "items": items,
                            "below_seq": below_seq, "not_before": not_before, "attempts": 0, "last_error": None,
                            "note": None, "removed": 0, "done_at": None}
        return rid

    def consume_guard(self, guard_id: int) -> bool:
        row = self.outbox.get(guard_id)
        if row is None or row["erasure_id"] is not None or row["attempts"] or row["done_at"] is not None:
            return False
        del self.outbox[guard_id]
        return True

    async def guard(self, key: str, grace_s: float) -> int:
        return self._insert(None, "crops", "object", key, [], None, self.clock + grace_s)

    async def drop_guard(self, guard_id: int) -> None:
        row = self.outbox.get(guard_id)
        if row is not None and row["erasure_id"] is None and not row["attempts"]:
            del self.outbox[guard_id]

    async def claim(self, *, limit: int, lease_s: float, erasure_id: uuid.UUID | None = None) -> list[Any]:
        from serve_app.gallery.erasures import OutboxItem

        due = sorted((r for r in self.outbox.values() if r["done_at"] is None and r["not_before"] <= self.clock
                      and (erasure_id is None or r["erasure_id"] == erasure_id)),
                     key=lambda r: (r["not_before"], r["id"]))[:limit]
        for r in due:
            r["attempts"] += 1
            r["not_before"] = self.clock + lease_s
        return [OutboxItem(r["id"], r["erasure_id"], r["copy"], r["op"], r["target"], list(r["items"]),
                           r["below_seq"], r["attempts"], r["removed"]) for r in due]

    async def finish(self, item: Any, removed: int, note: str | None = None) -> bool:
        if item.erasure_id is None:
            self.outbox.pop(item.id, None)
            return False
        row = self.outbox[item.id]
        if row["done_at"] is None:
            row.update(done_at=self._now(), removed=row["removed"] + removed, note=note, last_error=None)
        e = self.erasures[item.erasure_id]
        if e["completed_at"] is None and all(r["done_at"] is not None for r in self.outbox.values()
                                             if r["erasure_id"] == item.erasure_id):
            e["completed_at"] = self._now()
            self.audits.append({"tenant": e["tenant"], "action": "erasure.complete", "target": str(e["id"])})
            return True
        return False

    async def progress(self, item: Any, removed: int) -> None:
        row = self.outbox[item.id]
        row.update(removed=row["removed"] + removed, not_before=self.clock, attempts=0)

    async def retry_later(self, item: Any, delay_s: float, error: str) -> None:
        row = self.outbox.get(item.id)
        if row is not None and row["done_at"] is None:
            row.update(not_before=self.clock + delay_s, last_error=error)

    async def receipt(self, erasure_id: uuid.UUID, tenant: str | None) -> Any:
        from serve_app.gallery.erasures import build_receipt

        e = self.erasures.get(erasure_id)
        if e is None or (tenant is not None and e["tenant"] != tenant):
            return None
        return build_receipt(e, [r for r in self.outbox.values() if r["erasure_id"] == erasure_id])


class FakeRepo:
    def __init__(self) -> None:
        self.collections: dict[tuple[str, str], Collection] = {}
        self.subjects: dict[uuid.UUID, tuple[int, Subject]] = {}
        self.faces: dict[int, tuple[int, FaceRecord, np.ndarray]] = {}
        self.seq = 0
        self.fail_add_face: Exception | None = None
        self.feedback: dict[int, tuple[int, uuid.UUID, np.ndarray]] = {}
        self.erasures = FakeErasures()  # what the deletes write in their transaction

    async def ensure_collection(self, name: str, embedder: str, dim: int, tenant: str = "default") -> Collection:
        if (tenant, name) not in self.collections:
            self.collections[(tenant, name)] = Collection(len(self.collections) + 1, name, embedder, dim, tenant)
        return self.collections[(tenant, name)]

    async def create_collection(self, name: str, embedder: str, dim: int, tenant: str = "default") -> Collection:
        if (tenant, name) in self.collections:
            raise Conflict(f"collection {name!r} exists")
        return await self.ensure_collection(name, embedder, dim, tenant)

    async def get_collection(self, name: str, tenant: str = "default") -> Collection | None:
        return self.collections.get((tenant, name))

    async def list_collections(self, tenant: str | None = None) -> list[Collection]:
        return [c for c in self.collections.values() if tenant is None or c.tenant == tenant]

    async def create_subject(self, collection: Collection, name: Any, metadata: dict[str, Any]) -> Subject:
        now = datetime.now(timezone.utc)
        s = Subject(uuid.uuid4(), collection.name, name, metadata, now, now)
        self.subjects[s.id] = (collection.id, s)
        return s

    async def get_subject(self, collection: Collection, subject_id: uuid.UUID) -> Subject:
        found = self.subjects.get(subject_id)
        if found is None or found[0] != collection.id:
            raise SubjectNotFound(f"no subject with id {subject_id}")
        return found[1]

    async def find_subject_by_name(self, collection: Collection, name: str) -> Subject | None:
        return next((s for cid, s in self.subjects.values() if cid == collection.id and s.name == name), None)

    async def list_subjects(self, collection: Collection, *, limit: int, after: Any) -> list[Subject]:
        rows = sorted((s for cid, s in self.subjects.values() if cid == collection.id),
                      key=lambda s: (s.created_at, s.id))
        if after is not None:
            rows = [s for s in rows if (s.created_at, s.id) > after]
        return rows[:limit]

    async def count_subjects(self, collection: Collection) -> int:
        return sum(1 for cid, _ in self.subjects.values() if cid == collection.id)

    async def rename_subject(self, collection: Collection, subject_id: uuid.UUID, name: Any) -> tuple[Subject, int]:
        s = await self.get_subject(collection, subject_id)
        s.name = name
        self.seq += 1
        return s, self.seq

    async def latest_seq(self) -> int:
        return self.seq

    async def add_feedback(self, collection: Collection, subject_id: uuid.UUID, embedding: np.ndarray, *,
                           model: str, source: str, actor: str, note: str = "") -> dict[str, Any]:
        await self.get_subject(collection, subject_id)
        fid = len(self.feedback) + 1
        self.feedback[fid] = (collection.id, subject_id, np.asarray(embedding, np.float32))
        self.seq += 1
        return {"id": fid, "subject_id": str(subject_id), "source": source, "actor": actor, "note": note,
                "created_at": datetime.now(timezone.utc).isoformat(), "seq": self.seq}

    async def list_feedback(self, collection: Collection, subject_id: uuid.UUID | None = None,
                            limit: int = 100) -> list[dict[str, Any]]:
        return [{"id": fid, "subject_id": str(sid), "source": "image", "actor": "", "note": "",
                 "created_at": datetime.now(timezone.utc).isoformat()}
                for fid, (cid, sid, _) in self.feedback.items()
                if cid == collection.id and (subject_id is None or sid == subject_id)][:limit]

    async def delete_feedback(self, collection: Collection, feedback_id: int) -> int:
        from serve_app.errors import NotFound

        found = self.feedback.get(feedback_id)
        if found is None or found[0] != collection.id:
            raise NotFound(f"no feedback {feedback_id}")
        del self.feedback[feedback_id]
        self.seq += 1
        return self.seq

    async def subject_embeddings(self, collection: Collection, subject_id: uuid.UUID) -> tuple[list[str], np.ndarray]:
        rows = [(f.model, v) for cid, f, v in self.faces.values() if cid == collection.id and f.subject_id == subject_id]
        return [m for m, _ in rows], (np.stack([v for _, v in rows]) if rows else np.zeros((0, DIM), np.float32))

    async def add_face(self, collection: Collection, subject_id: uuid.UUID, *, embedding: np.ndarray, model: str,
                       image_sha256: str, crop_key: str, box: dict[str, float], det_score: float,
                       guard_id: int | None = None) -> tuple[FaceRecord, int]:
        if self.fail_add_face is not None:
            raise self.fail_add_face
        await self.get_subject(collection, subject_id)
        if guard_id is not None and not self.erasures.consume_guard(guard_id):
            from serve_app.errors import ServiceUnavailable

            raise ServiceUnavailable("the crop's guard was claimed by the sweeper")
        self.seq += 1
        rec = FaceRecord(len(self.faces) + 1, subject_id, model, image_sha256, crop_key, box, det_score,
                         datetime.now(timezone.utc))
        self.faces[rec.id] = (collection.id, rec, np.asarray(embedding, np.float32))
        return rec, self.seq

    async def list_faces(self, collection: Collection, subject_id: uuid.UUID) -> list[FaceRecord]:
        await self.get_subject(collection, subject_id)
        return [f for cid, f, _ in self.faces.values() if cid == collection.id and f.subject_id == subject_id]

    async def delete_face(self, collection: Collection, subject_id: uuid.UUID, face_id: int, *,
                          requested_by: str = "") -> RemovedFaces:
        from serve_app.gallery import erasures

        found = self.faces.get(face_id)
        if found is None or found[0] != collection.id or found[1].subject_id != subject_id:
            raise FaceNotFound(f"no face {face_id}")
        del self.faces[face_id]
        self.seq += 1
        eid = self.erasures.record(collection, kind="face", target=str(face_id), seq=self.seq,
                                   requested_by=requested_by, removed={"rows": {"faces": 1}, "face_ids": [face_id]},
                                   entries=erasures.plan_face(collection, subject_id, found[1].crop_key, self.seq))
        return RemovedFaces(self.seq, [face_id], [found[1].crop_key] if found[1].crop_key else [], eid)

    async def delete_subject(self, collection: Collection, subject_id: uuid.UUID, *,
                             requested_by: str = "") -> RemovedFaces:
        from serve_app.gallery import erasures

        await self.get_subject(collection, subject_id)
        gone = [fid for fid, (cid, f, _) in self.faces.items() if f.subject_id == subject_id]
        keys = [k for k in (self.faces[f][1].crop_key for f in gone) if k]
        for fid in gone:
            del self.faces[fid]
        del self.subjects[subject_id]
        feedback = sum(1 for v in self.feedback.values() if v[1] == subject_id)
        self.feedback = {k: v for k, v in self.feedback.items() if v[1] != subject_id}
        self.seq += 1
        eid = self.erasures.record(
            collection, kind="subject", target=str(subject_id), seq=self.seq, requested_by=requested_by,
            removed={"rows": {"faces": len(gone), "subjects": 1, "feedback": feedback}, "face_ids": gone},
            entries=erasures.plan_subject(collection, subject_id, keys, self.seq))
        return RemovedFaces(self.seq, gone, keys, eid, feedback, 1)

    async def delete_collection(self, collection: Collection, *, requested_by: str = "") -> RemovedFaces:
        from serve_app.gallery import erasures

        gone = [fid for fid, (cid, _, _) in self.faces.items() if cid == collection.id]
        keys = [k for k in (self.faces[f][1].crop_key for f in gone) if k]
        for fid in gone:
            del self.faces[fid]
        subjects = [sid for sid, (cid, _) in self.subjects.items() if cid == collection.id]
        for sid in subjects:
            del self.subjects[sid]
        del self.collections[(collection.tenant, collection.name)]
        self.seq += 1
        eid = self.erasures.record(
            collection, kind="collection", target=collection.name, seq=self.seq, requested_by=requested_by,
            removed={"rows": {"faces": len(gone), "subjects": len(subjects), "collections": 1}},
            entries=erasures.plan_collection(collection, subjects))
        return RemovedFaces(self.seq, gone, keys, eid, 0, len(subjects))

    def search(self, collection_id: int, vectors: np.ndarray, k: int,
               feedback_similarity: float | None = None) -> list[list[Hit]]:
        """The matcher's answer: best face per subject, named, demoted when the
        probe is that close to one reported "not this person"."""
        out = []
        for v in vectors:
            best: dict[uuid.UUID, Hit] = {}
            for fid, (cid, f, e) in self.faces.items():
                if cid != collection_id:
                    continue
                sim = float(e @ v)
                if f.subject_id not in best or sim > best[f.subject_id].similarity:
                    reported = [p for c, sid, p in self.feedback.values() if sid == f.subject_id]
                    demoted = feedback_similarity is not None and any(
                        float(p @ v) >= feedback_similarity for p in reported)
                    best[f.subject_id] = Hit(str(f.subject_id), fid, sim, self.subjects[f.subject_id][1].name,
                                             demoted)
            out.append(sorted(best.values(), key=lambda h: -h.similarity)[:k])
        return out


class CountingOutcomes:
    def __init__(self) -> None:
        self.verifications: list[str] = []
        self.identifications: list[str] = []

    def verification(self, outcome: str) -> None:
        self.verifications.append(outcome)

    def identification(self, outcome: str) -> None:
        self.identifications.append(outcome)


class FakeAccess:
    """Keys and tenants in memory, with the real token format and checks."""

    def __init__(self) -> None:
        from serve_app.gallery.access import Tenant

        self.keys: dict[str, Any] = {}
        self.tenants: dict[str, Any] = {"default": Tenant("default")}
        self.audits: list[tuple[str, str, str, str]] = []

    async def create_key(self, tenant: str, scopes: Any, *, name: str = "", requests_per_minute: int = 0) -> Any:
        import hashlib
        import secrets as pysecrets

        from serve_app.gallery.access import ApiKey, check_scopes

        key_id, secret = pysecrets.token_hex(8), pysecrets.token_urlsafe(16)
        key = ApiKey(key_id, tenant, check_scopes(list(scopes)), name, requests_per_minute,
                     datetime.now(timezone.utc), None, hashlib.sha256(secret.encode()).digest())
        self.keys[key_id] = key
        return key, f"fsk_{key_id}_{secret}"

    async def get_key(self, key_id: str) -> Any:
        return self.keys.get(key_id)

    async def list_keys(self, tenant: str | None = None) -> list[Any]:
        return [k for k in self.keys.values() if tenant is None or k.tenant == tenant]

    async def revoke_key(self, key_id: str, tenant: str | None = None) -> Any:
        import dataclasses

        from serve_app.gallery.access import KeyNotFound

        key = self.keys.get(key_id)
        if key is None or (tenant is not None and key.tenant != tenant):
            raise KeyNotFound(f"no key {key_id!r}")
        self.keys[key_id] = dataclasses.replace(key, revoked_at=datetime.now(timezone.utc))
        return self.keys[key_id]

    async def any_keys(self) -> bool:
        return any(k.revoked_at is None for k in self.keys.values())

    async def get_tenant(self, name: str) -> Any:
        return self.tenants.get(name)

    async def ensure_tenant(self, name: str, *, min_enrol_liveness: str | None = None,
                            requests_per_minute: int | None = None) -> Any:
        from serve_app.gallery.access import Tenant

        old = self.tenants.get(name, Tenant(name))
        self.tenants[name] = Tenant(name, min_enrol_liveness or old.min_enrol_liveness,
                                    old.requests_per_minute if requests_per_minute is None else requests_per_minute)
        return self.tenants[name]

    async def audit(self, tenant: str, actor: str, action: str, target: str = "", **_: Any) -> None:
        self.audits.append((tenant, actor, action, target))

    async def audit_entries(self, tenant: str | None, *, limit: int = 100, action: str | None = None) -> list[Any]:
        return [{"tenant": t, "actor": a, "action": act, "target": tg} for t, a, act, tg in reversed(self.audits)
                if (tenant is None or t == tenant) and (action is None or act == action)][:limit]
