"""All of faceserve's SQL, over one asyncpg pool.

Every change to a collection (face added, face removed, subject removed) is
one transaction that also appends to the `changes` log, so a matcher replica
that replays the log ends with exactly the rows Postgres holds.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import numpy as np

from serve_app.errors import CollectionNotFound, Conflict, FaceNotFound, InvalidRequest, ServiceUnavailable
from serve_app.errors import SubjectNotFound
from serve_app.errors import NotFound as NotFoundError

from . import erasures
from .migrations import migrate
from .shards import WHOLE, Shard

# Held by every transaction that appends to `changes`, taken before the seq is
# drawn: bigserial values can otherwise commit out of order, and a matcher
# that had already read past a late-committing seq would never see it.
_CHANGELOG_LOCK = 0x4C4F47  # "LOG"


# Matcher replicas LISTEN here; every change-log append NOTIFYs its seq in
# the same transaction, so the notice arrives only once the change commits.
CHANGES_CHANNEL = "faceserve_changes"


async def _notify_change(conn: asyncpg.Connection, seq: int) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", CHANGES_CHANNEL, str(seq))


async def _lock_changelog(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock($1)", _CHANGELOG_LOCK)


async def _lock_subject_for_change(
    conn: asyncpg.Connection, collection: "Collection", subject_id: uuid.UUID
) -> None:
    """Changelog lock, then the subject row: a concurrent delete cannot
    orphan a face being added, and both orders of operations serialise."""
    await _lock_changelog(conn)
    exists = await conn.fetchval(
        "SELECT 1 FROM subjects WHERE id = $1 AND collection_id = $2 FOR UPDATE",
        subject_id, collection.id,
    )
    if not exists:
        raise SubjectNotFound(f"no subject with id {subject_id}", subject_id=str(subject_id))


@dataclass(frozen=True)
class Collection:
    id: int
    name: str
    embedder: str
    dim: int
    tenant: str = "default"


@dataclass
class Subject:
    id: uuid.UUID
    collection: str
    name: str
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    face_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "collection": self.collection,
            "name": self.name,
            "metadata": self.metadata,
            "face_count": self.face_count,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass
class FaceRecord:
    id: int
    subject_id: uuid.UUID
    model: str
    image_sha256: str
    crop_key: str | None
    box: dict[str, float]
    det_score: float
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "subject_id": str(self.subject_id),
            "model": self.model,
            "image_sha256": self.image_sha256,
            "box": self.box,
            "det_score": self.det_score,
            "created_at": self.created_at.isoformat(),
        }


@dataclass
class Change:
    """A change-log entry as a matcher reads it: op is add | remove (a face),
    rename (face_id 0) or feedback (face_id = the feedback row). Read with the
    current state of what it names: an add's embedding (None once the face is
    gone), the subject's name (None once the subject is gone) and, for
    feedback, every "not this person" probe the subject now has."""

    seq: int
    collection_id: int
    op: str
    face_id: int
    subject_id: uuid.UUID
    embedding: np.ndarray | None = field(default=None, repr=False)
    name: str | None = None
    feedback: np.ndarray | None = field(default=None, repr=False)


@dataclass
class RemovedFaces:
    """What a delete took out of Postgres. The copies elsewhere (crops,
    snapshots, cache entries) are in the object outbox under erasure_id,
    written in the same transaction; the erasure sweeper removes them."""

    seq: int
    face_ids: list[int]
    crop_keys: list[str]
    erasure_id: uuid.UUID | None = None
    feedback_removed: int = 0
    subjects_removed: int = 0


@dataclass
class NewFace:
    """One face for GalleryRepository.add_faces (bulk enrolment)."""

    subject_id: uuid.UUID
    embedding: np.ndarray = field(repr=False)
    model: str
    image_sha256: str
    crop_key: str | None
    box: dict[str, float]
    det_score: float


@dataclass
class BulkAdd:
    """What add_faces did, keyed by (subject id, image sha256)."""

    added: dict[tuple[uuid.UUID, str], int]  # -> face id
    already: dict[tuple[uuid.UUID, str], str | None]  # -> the existing face's crop key
    missing_subject: set[tuple[uuid.UUID, str]]
    seq: int


def _vec_to_bytes(vec: np.ndarray) -> bytes:
    return np.ascontiguousarray(vec, dtype="<f4").tobytes()


def bytes_to_vec(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


def parse_subject_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(str(raw))
    except ValueError:
        raise SubjectNotFound(f"no subject with id {raw!r}", subject_id=str(raw)) from None


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


class DatabaseUnreachable(ConnectionError):
    """No new connection to Postgres could be opened (refused, reset, or its
    socket file gone because the server is stopped): a 503, named as the
    database's, not a bare OSError that reads like object storage."""


async def _connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
    try:
        return await asyncpg.connect(*args, **kwargs)
    except OSError as exc:
        raise DatabaseUnreachable(f"cannot connect to PostgreSQL: {exc}") from exc


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, init=_init_connection, command_timeout=30, connect=_connect,
        # One stalled writer must not block every other: waits on the change-log
        # lock end after 5 s (-> 503), and a transaction left idle is cut at 30 s.
        server_settings={"lock_timeout": "5s", "idle_in_transaction_session_timeout": "30s"},
    )
    async with pool.acquire() as conn:
        await migrate(conn)
    return pool


class GalleryRepository:
    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout_s: float = 3.0) -> None:
        self.pool = pool
        # Past this a request gets 503 rather than waiting on a starved pool.
        self.acquire_timeout_s = acquire_timeout_s

    # --- health / pool ------------------------------------------------------
    async def ping(self) -> None:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            await conn.fetchval("SELECT 1")

    def pool_stats(self) -> tuple[int, int]:
        """(size, in use) of the pool, for the DB-pool-exhausted alert."""
        size = self.pool.get_size()
        return size, size - self.pool.get_idle_size()

    # --- collections --------------------------------------------------------
    async def ensure_collection(self, name: str, embedder: str, dim: int, tenant: str = "default") -> Collection:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            row = await conn.fetchrow(
                """INSERT INTO collections (name, embedder, dim, tenant) VALUES ($1, $2, $3, $4)
                   ON CONFLICT (tenant, name) DO UPDATE SET name = EXCLUDED.name
                   RETURNING id, name, embedder, dim, tenant""",
                name, embedder, dim, tenant,
            )
        return Collection(**dict(row))

    async def create_collection(self, name: str, embedder: str, dim: int, tenant: str = "default") -> Collection:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            try:
                row = await conn.fetchrow(
                    "INSERT INTO collections (name, embedder, dim, tenant) VALUES ($1, $2, $3, $4) "
                    "RETURNING id, name, embedder, dim, tenant",
                    name, embedder, dim, tenant,
                )
            except asyncpg.UniqueViolationError:
                raise Conflict(f"collection {name!r} already exists", collection=name) from None
            except asyncpg.ForeignKeyViolationError:
                raise InvalidRequest(f"no tenant named {tenant!r}", tenant=tenant) from None
        return Collection(**dict(row))

    async def get_collection(self, name: str, tenant: str = "default") -> Collection | None:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            row = await conn.fetchrow(
                "SELECT id, name, embedder, dim, tenant FROM collections WHERE tenant = $1 AND name = $2",
                tenant, name,
            )
        return Collection(**dict(row)) if row else None

    async def list_collections(self, tenant: str | None = None) -> list[Collection]:
        """One tenant's collections, or every collection (tenant=None: the matcher)."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            rows = await conn.fetch(
                "SELECT id, name, embedder, dim, tenant FROM collections "
                "WHERE $1::text IS NULL OR tenant = $1 ORDER BY id", tenant)
        return [Collection(**dict(r)) for r in rows]

    async def delete_collection(self, collection: Collection, *, requested_by: str = "") -> RemovedFaces:
        """The collection with its subjects, faces and feedback, in one
        transaction; every face's removal goes to the change log so the
        matchers drop it, and the erasure of its crops, snapshots and cache
        entries to the object outbox."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction():
            await _lock_changelog(conn)
            faces = await conn.fetch(
                "DELETE FROM faces WHERE collection_id = $1 RETURNING id, subject_id, crop_key", collection.id)
            by_subject: dict[uuid.UUID, list[int]] = {}
            for f in faces:
                by_subject.setdefault(f["subject_id"], []).append(f["id"])
            seq = await self._log_removals(conn, collection.id, uuid.UUID(int=0), [])
            for sid, ids in by_subject.items():
                seq = await self._log_removals(conn, collection.id, sid, ids)
            feedback = _count(await conn.execute("DELETE FROM feedback WHERE collection_id = $1", collection.id))
            subjects = [r["id"] for r in await conn.fetch(
                "DELETE FROM subjects WHERE collection_id = $1 RETURNING id", collection.id)]
            status = await conn.execute("DELETE FROM collections WHERE id = $1", collection.id)
            if status.endswith(" 0"):
                raise CollectionNotFound(f"no collection named {collection.name!r}", collection=collection.name)
            eid = await erasures.record_erasure(
                conn, collection, kind="collection", target=collection.name, seq=seq, requested_by=requested_by,
                removed={"rows": {"faces": len(faces), "subjects": len(subjects), "feedback": feedback,
                                  "collections": 1}},
                entries=erasures.plan_collection(collection, subjects))
        return RemovedFaces(seq=seq, face_ids=[f["id"] for f in faces],
                            crop_keys=[f["crop_key"] for f in faces if f["crop_key"]], erasure_id=eid,
                            feedback_removed=feedback, subjects_removed=len(subjects))

    # --- subjects -----------------------------------------------------------
    _SUBJECT_COLS = """s.id, c.name AS collection, s.name, s.metadata, s.created_at, s.updated_at,
                       (SELECT count(*) FROM faces f WHERE f.subject_id = s.id) AS face_count"""

    async def create_subject(
        self, collection: Collection, name: str, metadata: dict[str, Any] | None = None
    ) -> Subject:
        name = _clean_name(name)
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            try:
                await conn.execute(
                    "INSERT INTO subjects (id, collection_id, name, metadata) VALUES ($1, $2, $3, $4)",
                    uuid.uuid4(), collection.id, name, metadata or {},
                )
            except asyncpg.UniqueViolationError:
                raise Conflict(
                    f"a subject named {name!r} already exists in collection {collection.name!r}",
                    name=name,
                ) from None
            row = await conn.fetchrow(
                f"SELECT {self._SUBJECT_COLS} FROM subjects s JOIN collections c ON c.id = s.collection_id "
                "WHERE s.collection_id = $1 AND s.name = $2",
                collection.id, name,
            )
        return Subject(**dict(row))

    async def get_subject(self, collection: Collection, subject_id: uuid.UUID) -> Subject:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            row = await conn.fetchrow(
                f"SELECT {self._SUBJECT_COLS} FROM subjects s JOIN collections c ON c.id = s.collection_id "
                "WHERE s.id = $1 AND s.collection_id = $2",
                subject_id, collection.id,
            )
        if row is None:
            raise SubjectNotFound(f"no subject with id {subject_id}", subject_id=str(subject_id))
        return Subject(**dict(row))

    async def find_subject_by_name(self, collection: Collection, name: str) -> Subject | None:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            row = await conn.fetchrow(
                f"SELECT {self._SUBJECT_COLS} FROM subjects s JOIN collections c ON c.id = s.collection_id "
                "WHERE s.collection_id = $1 AND s.name = $2",
                collection.id, name,
            )
        return Subject(**dict(row)) if row else None

    async def list_subjects(
        self, collection: Collection, *, limit: int, after: tuple[datetime, uuid.UUID] | None
    ) -> list[Subject]:
        """Keyset pagination on (created_at, id): stable under inserts/deletes."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            if after is None:
                rows = await conn.fetch(
                    f"SELECT {self._SUBJECT_COLS} FROM subjects s JOIN collections c ON c.id = s.collection_id "
                    "WHERE s.collection_id = $1 ORDER BY s.created_at, s.id LIMIT $2",
                    collection.id, limit,
                )
            else:
                rows = await conn.fetch(
                    f"SELECT {self._SUBJECT_COLS} FROM subjects s JOIN collections c ON c.id = s.collection_id "
                    "WHERE s.collection_id = $1 AND (s.created_at, s.id) > ($2, $3) "
                    "ORDER BY s.created_at, s.id LIMIT $4",
                    collection.id, after[0], after[1], limit,
                )
        return [Subject(**dict(r)) for r in rows]

    async def count_subjects(self, collection: Collection) -> int:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            return await conn.fetchval(
                "SELECT count(*) FROM subjects WHERE collection_id = $1", collection.id
            )

    async def rename_subject(
        self, collection: Collection, subject_id: uuid.UUID, name: str
    ) -> tuple[Subject, int]:
        """The renamed subject and the seq of its `rename` log entry: matchers
        carry names, so a rename goes through the log like a face."""
        name = _clean_name(name)
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction():
            await _lock_subject_for_change(conn, collection, subject_id)
            try:
                await conn.execute(
                    "UPDATE subjects SET name = $1, updated_at = now() WHERE id = $2", name, subject_id)
            except asyncpg.UniqueViolationError:
                raise Conflict(f"a subject named {name!r} already exists", name=name) from None
            seq = await conn.fetchval(
                "INSERT INTO changes (collection_id, op, face_id, subject_id) "
                "VALUES ($1, 'rename', 0, $2) RETURNING seq",
                collection.id, subject_id,
            )
            await _notify_change(conn, seq)
        return await self.get_subject(collection, subject_id), seq

    async def delete_subject(
        self, collection: Collection, subject_id: uuid.UUID, *, requested_by: str = ""
    ) -> RemovedFaces:
        """The subject, its faces and its feedback; in the same transaction the
        erasure (receipt) and the outbox rows for its crops (each known key and
        the whole crops/<collection>/<subject>/ prefix), the snapshots taken
        before this delete, and its images' cache entries."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction():
            await _lock_subject_for_change(conn, collection, subject_id)
            faces = await conn.fetch(
                "DELETE FROM faces WHERE subject_id = $1 RETURNING id, crop_key", subject_id
            )
            seq = await self._log_removals(conn, collection.id, subject_id, [f["id"] for f in faces])
            feedback = _count(await conn.execute("DELETE FROM feedback WHERE subject_id = $1", subject_id))
            await conn.execute("DELETE FROM subjects WHERE id = $1", subject_id)
            keys = [f["crop_key"] for f in faces if f["crop_key"]]
            eid = await erasures.record_erasure(
                conn, collection, kind="subject", target=str(subject_id), seq=seq, requested_by=requested_by,
                removed={"rows": {"faces": len(faces), "subjects": 1, "feedback": feedback},
                         "face_ids": [f["id"] for f in faces]},
                entries=erasures.plan_subject(collection, subject_id, keys, seq))
        return RemovedFaces(
            seq=seq,
            face_ids=[f["id"] for f in faces],
            crop_keys=keys,
            erasure_id=eid,
            feedback_removed=feedback,
            subjects_removed=1,
        )

    # --- faces ----------------------------------------------------------------
    async def add_face(
        self,
        collection: Collection,
        subject_id: uuid.UUID,
        *,
        embedding: np.ndarray,
        model: str,
        image_sha256: str,
        crop_key: str | None,
        box: dict[str, float],
        det_score: float,
        guard_id: int | None = None,
    ) -> tuple[FaceRecord, int]:
        """One face and its `add` log entry. guard_id: the outbox row that
        would sweep this face's crop if the enrolment never committed; it is
        removed in this transaction, so the row now owns the crop."""
        if model != collection.embedder or embedding.shape != (collection.dim,):
            raise InvalidRequest(
                f"embedding from {model} ({embedding.shape[0]}-d) does not fit collection "
                f"{collection.name!r} ({collection.embedder}, {collection.dim}-d)"
            )
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction():
            await _lock_subject_for_change(conn, collection, subject_id)
            if guard_id is not None and not await erasures.consume_guard(conn, guard_id):
                raise ServiceUnavailable(
                    "the enrolment outlived its crop's grace period and the crop is being removed; "
                    "enrol again", retry_after_s=1)
            row = await conn.fetchrow(
                """INSERT INTO faces (subject_id, collection_id, embedding, model, dim,
                                      image_sha256, crop_key, box, det_score)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                   RETURNING id, subject_id, model, image_sha256, crop_key, box, det_score, created_at""",
                subject_id, collection.id, _vec_to_bytes(embedding), model, collection.dim,
                image_sha256, crop_key, box, float(det_score),
            )
            seq = await conn.fetchval(
                "INSERT INTO changes (collection_id, op, face_id, subject_id) "
                "VALUES ($1, 'add', $2, $3) RETURNING seq",
                collection.id, row["id"], subject_id,
            )
            await _notify_change(conn, seq)
            await conn.execute("UPDATE subjects SET updated_at = now() WHERE id = $1", subject_id)
        return FaceRecord(**dict(row)), seq

    # --- bulk (serve_app/jobs) -------------------------------------------------
    async def ensure_subjects(
        self, collection: Collection, names: dict[str, dict[str, Any]]
    ) -> dict[str, uuid.UUID]:
        """{name: id} for these names, creating the missing ones (with the given
        metadata); concurrent callers creating the same name get the same row."""
        clean = {_clean_name(n): meta for n, meta in names.items()}
        if not clean:
            return {}
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            await conn.executemany(
                "INSERT INTO subjects (id, collection_id, name, metadata) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (collection_id, name) DO NOTHING",
                [(uuid.uuid4(), collection.id, n, meta or {}) for n, meta in clean.items()],
            )
            rows = await conn.fetch(
                "SELECT id, name FROM subjects WHERE collection_id = $1 AND name = ANY($2::text[])",
                collection.id, list(clean),
            )
        return {r["name"]: r["id"] for r in rows}

    async def find_subjects(self, collection: Collection, names: list[str]) -> dict[str, uuid.UUID]:
        """{name: id} of the names that exist (creates nothing)."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            rows = await conn.fetch(
                "SELECT id, name FROM subjects WHERE collection_id = $1 AND name = ANY($2::text[])",
                collection.id, names)
        return {r["name"]: r["id"] for r in rows}

    async def existing_subject_ids(self, collection: Collection, ids: list[uuid.UUID]) -> set[uuid.UUID]:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            rows = await conn.fetch(
                "SELECT id FROM subjects WHERE collection_id = $1 AND id = ANY($2::uuid[])", collection.id, ids)
        return {r["id"] for r in rows}

    async def enrolled_images(
        self, collection: Collection, model: str, pairs: list[tuple[uuid.UUID, str]]
    ) -> set[tuple[uuid.UUID, str]]:
        """Which (subject id, image sha256) pairs already have a face from this model."""
        if not pairs:
            return set()
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            rows = await conn.fetch(
                "SELECT f.subject_id, f.image_sha256 FROM faces f "
                "JOIN unnest($2::uuid[], $3::text[]) AS p(s, h) ON f.subject_id = p.s AND f.image_sha256 = p.h "
                "WHERE f.collection_id = $1 AND f.model = $4",
                collection.id, [p[0] for p in pairs], [p[1] for p in pairs], model,
            )
        return {(r["subject_id"], r["image_sha256"]) for r in rows}

    async def add_faces(self, collection: Collection, faces: list[NewFace]) -> BulkAdd:
        """Many faces in one transaction, shaped like add_face: changelog lock,
        the subjects' rows locked, one `add` log entry per face, NOTIFY of the
        newest seq. A face whose (subject, image sha256, model) is already in
        the gallery is not added again (checked under the lock, so concurrent
        bulk writers never duplicate), nor one whose subject was deleted."""
        for f in faces:
            if f.model != collection.embedder or f.embedding.shape != (collection.dim,):
                raise InvalidRequest(
                    f"embedding from {f.model} ({f.embedding.shape[0]}-d) does not fit collection "
                    f"{collection.name!r} ({collection.embedder}, {collection.dim}-d)")
        result = BulkAdd(added={}, already={}, missing_subject=set(), seq=0)
        if not faces:
            return result
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction():
            await _lock_changelog(conn)
            sids = sorted({f.subject_id for f in faces})
            live = {r["id"] for r in await conn.fetch(
                "SELECT id FROM subjects WHERE collection_id = $1 AND id = ANY($2::uuid[]) ORDER BY id FOR UPDATE",
                collection.id, sids)}
            have = {(r["subject_id"], r["image_sha256"]): r["crop_key"] for r in await conn.fetch(
                "SELECT subject_id, image_sha256, crop_key FROM faces WHERE collection_id = $1 AND model = $2 "
                "AND subject_id = ANY($3::uuid[]) AND image_sha256 = ANY($4::text[])",
                collection.id, collection.embedder, sids, sorted({f.image_sha256 for f in faces}))}
            new: list[tuple[int, NewFace]] = []
            for f in faces:
                key = (f.subject_id, f.image_sha256)
                if f.subject_id not in live:
                    result.missing_subject.add(key)
                elif key in have:
                    result.already[key] = have[key]
                else:
                    have[key] = f.crop_key  # a duplicate later in this batch is "already there"
                    face_id = await conn.fetchval(
                        """INSERT INTO faces (subject_id, collection_id, embedding, model, dim,
                                              image_sha256, crop_key, box, det_score)
                           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id""",
                        f.subject_id, collection.id, _vec_to_bytes(f.embedding), f.model, collection.dim,
                        f.image_sha256, f.crop_key, f.box, float(f.det_score))
                    new.append((face_id, f))
            if new:
                seqs = await conn.fetch(
                    "INSERT INTO changes (collection_id, op, face_id, subject_id) "
                    "SELECT $1, 'add', t.f, t.s FROM unnest($2::bigint[], $3::uuid[]) WITH ORDINALITY AS t(f, s, o) "
                    "ORDER BY t.o RETURNING seq",
                    collection.id, [i for i, _ in new], [f.subject_id for _, f in new])
                result.seq = max(r["seq"] for r in seqs)
                await _notify_change(conn, result.seq)
                await conn.execute("UPDATE subjects SET updated_at = now() WHERE id = ANY($1::uuid[])",
                                   sorted({f.subject_id for _, f in new}))
                result.added = {(f.subject_id, f.image_sha256): i for i, f in new}
        return result

    async def list_faces(self, collection: Collection, subject_id: uuid.UUID) -> list[FaceRecord]:
        await self.get_subject(collection, subject_id)
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            rows = await conn.fetch(
                "SELECT id, subject_id, model, image_sha256, crop_key, box, det_score, created_at "
                "FROM faces WHERE subject_id = $1 ORDER BY id",
                subject_id,
            )
        return [FaceRecord(**dict(r)) for r in rows]

    async def subject_embeddings(
        self, collection: Collection, subject_id: uuid.UUID
    ) -> tuple[list[str], np.ndarray]:
        """(models, embeddings) of a subject's faces, for 1:1 verify against a subject."""
        await self.get_subject(collection, subject_id)
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            rows = await conn.fetch(
                "SELECT model, embedding FROM faces WHERE subject_id = $1 ORDER BY id", subject_id
            )
        if not rows:
            return [], np.zeros((0, collection.dim), np.float32)
        return [r["model"] for r in rows], np.stack([bytes_to_vec(r["embedding"]) for r in rows])

    async def delete_face(
        self, collection: Collection, subject_id: uuid.UUID, face_id: int, *, requested_by: str = ""
    ) -> RemovedFaces:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction():
            await _lock_changelog(conn)
            row = await conn.fetchrow(
                "DELETE FROM faces WHERE id = $1 AND subject_id = $2 AND collection_id = $3 "
                "RETURNING id, crop_key",
                face_id, subject_id, collection.id,
            )
            if row is None:
                raise FaceNotFound(
                    f"subject {subject_id} has no face {face_id}", face_id=face_id
                )
            seq = await self._log_removals(conn, collection.id, subject_id, [row["id"]])
            await conn.execute("UPDATE subjects SET updated_at = now() WHERE id = $1", subject_id)
            eid = await erasures.record_erasure(
                conn, collection, kind="face", target=str(face_id), seq=seq, requested_by=requested_by,
                removed={"rows": {"faces": 1}, "face_ids": [row["id"]], "subject_id": str(subject_id)},
                entries=erasures.plan_face(collection, subject_id, row["crop_key"], seq))
        return RemovedFaces(seq=seq, face_ids=[row["id"]], crop_keys=[row["crop_key"]] if row["crop_key"] else [],
                            erasure_id=eid)

    @staticmethod
    async def _log_removals(
        conn: asyncpg.Connection, collection_id: int, subject_id: uuid.UUID, face_ids: list[int]
    ) -> int:
        if not face_ids:
            # A subject with no faces still changes the log, so the caller
            # always gets a sequence number to wait for.
            return await conn.fetchval("SELECT coalesce(max(seq), 0) FROM changes")
        rows = await conn.fetch(
            "INSERT INTO changes (collection_id, op, face_id, subject_id) "
            "SELECT $1, 'remove', f, $2 FROM unnest($3::bigint[]) AS f RETURNING seq",
            collection_id, subject_id, face_ids,
        )
        seq = max(r["seq"] for r in rows)
        await _notify_change(conn, seq)
        return seq

    # --- change log (matcher side) -----------------------------------------
    async def load_all(self, shard: Shard = WHOLE) -> tuple[int, list[Change]]:
        """Every face now in the gallery (of `shard`: only its own faces are
        fetched) plus the log position it reflects.

        Read in one REPEATABLE READ snapshot so the seq and rows agree.
        """
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            seq = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM changes")
            rows = await conn.fetch(
                f"SELECT id, collection_id, subject_id, embedding FROM faces WHERE true{_of_shard('id', shard)} "
                "ORDER BY id"
            )
        return seq, [
            Change(seq, r["collection_id"], "add", r["id"], r["subject_id"], bytes_to_vec(r["embedding"]))
            for r in rows
        ]

    async def load_collection(self, collection_id: int, shard: Shard = WHOLE) -> tuple[int, list[Change]]:
        """One collection's faces (of `shard`) plus the log position they
        reflect (one REPEATABLE READ snapshot), for a replica that has no
        usable index snapshot of just this collection."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            seq = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM changes")
            rows = await conn.fetch(
                f"SELECT id, subject_id, embedding FROM faces WHERE collection_id = $1{_of_shard('id', shard)} "
                "ORDER BY id",
                collection_id,
            )
        return seq, [
            Change(seq, collection_id, "add", r["id"], r["subject_id"], bytes_to_vec(r["embedding"]))
            for r in rows
        ]

    async def subject_state(self) -> tuple[dict[uuid.UUID, str], dict[uuid.UUID, np.ndarray]]:
        """Every subject's name and "not this person" probes, in one snapshot:
        what a matcher answers identify with besides its index. Read after
        the log position a load replays from, so the replay brings it up to
        date."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            names = await conn.fetch("SELECT id, name FROM subjects")
            probes = await conn.fetch("SELECT subject_id, embedding FROM feedback ORDER BY id")
        by_subject: dict[uuid.UUID, list[np.ndarray]] = {}
        for r in probes:
            by_subject.setdefault(r["subject_id"], []).append(bytes_to_vec(r["embedding"]))
        return {r["id"]: r["name"] for r in names}, {k: np.stack(v) for k, v in by_subject.items()}

    async def log_entries(self, seqs: list[int]) -> dict[int, tuple[int, str, int, str]]:
        """{seq: (collection_id, op, face_id, subject_id)} for the given seqs that
        exist; index snapshots carry the entry at their seq to prove they
        belong to this database's log."""
        if not seqs:
            return {}
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            rows = await conn.fetch(
                "SELECT seq, collection_id, op, face_id, subject_id FROM changes "
                "WHERE seq = ANY($1::bigint[])",
                list(seqs),
            )
        return {
            r["seq"]: (r["collection_id"], r["op"], r["face_id"], str(r["subject_id"])) for r in rows
        }

    async def changes_since(self, seq: int, limit: int = 5000, shard: Shard = WHOLE) -> list[Change]:
        """Log entries after seq; adds carry the embedding if the face still
        exists and belongs to `shard` (a shard reads every entry, but fetches
        only its own faces' vectors).

        Writers serialise on _CHANGELOG_LOCK, so seq order is commit order and
        a reader never skips a seq that commits later.
        """
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            rows = await conn.fetch(
                f"""SELECT c.seq, c.collection_id, c.op, c.face_id, c.subject_id, f.embedding, s.name,
                          CASE WHEN c.op = 'feedback' THEN coalesce(
                              (SELECT array_agg(fb.embedding ORDER BY fb.id) FROM feedback fb
                               WHERE fb.subject_id = c.subject_id), '{{}}'::bytea[]) END AS feedback
                   FROM changes c
                   LEFT JOIN faces f ON f.id = c.face_id AND c.op = 'add'{_of_shard('c.face_id', shard)}
                   LEFT JOIN subjects s ON s.id = c.subject_id
                   WHERE c.seq > $1 ORDER BY c.seq LIMIT $2""",
                seq, limit,
            )
        return [
            Change(
                r["seq"], r["collection_id"], r["op"], r["face_id"], r["subject_id"],
                bytes_to_vec(r["embedding"]) if r["embedding"] is not None else None,
                r["name"],
                _probes(r["feedback"]) if r["feedback"] is not None else None,
            )
            for r in rows
        ]

    # --- "not this person" feedback -------------------------------------------
    async def add_feedback(self, collection: Collection, subject_id: uuid.UUID, embedding: np.ndarray, *,
                           model: str, source: str, actor: str, note: str = "") -> dict[str, Any]:
        """The stored report, with the seq of its `feedback` log entry (matchers
        carry every subject's probes and demote from them)."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction():
            await _lock_subject_for_change(conn, collection, subject_id)
            row = await conn.fetchrow(
                """INSERT INTO feedback (collection_id, subject_id, embedding, model, source, actor, note)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)
                   RETURNING id, subject_id, source, actor, note, created_at""",
                collection.id, subject_id, _vec_to_bytes(embedding), model, source, actor, note)
            seq = await _log_feedback(conn, collection.id, subject_id, row["id"])
        return {**_feedback_dict(row), "seq": seq}

    async def list_feedback(self, collection: Collection, subject_id: uuid.UUID | None = None,
                            limit: int = 100) -> list[dict[str, Any]]:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            rows = await conn.fetch(
                """SELECT id, subject_id, source, actor, note, created_at FROM feedback
                   WHERE collection_id = $1 AND ($2::uuid IS NULL OR subject_id = $2)
                   ORDER BY id DESC LIMIT $3""", collection.id, subject_id, limit)
        return [_feedback_dict(r) for r in rows]

    async def delete_feedback(self, collection: Collection, feedback_id: int) -> int:
        """Removes one report; returns the seq of its `feedback` log entry."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction():
            await _lock_changelog(conn)
            subject_id = await conn.fetchval(
                "DELETE FROM feedback WHERE id = $1 AND collection_id = $2 RETURNING subject_id",
                feedback_id, collection.id)
            if subject_id is None:
                raise NotFoundError(f"no feedback {feedback_id}", feedback_id=feedback_id)
            return await _log_feedback(conn, collection.id, subject_id, feedback_id)

    async def latest_seq(self) -> int:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            return await conn.fetchval("SELECT coalesce(max(seq), 0) FROM changes")

    async def prune_changes(self, below_seq: int, older_than_s: float, batch: int = 10_000) -> int:
        """Delete log entries with seq < below_seq committed more than
        older_than_s ago, in batches; each batch records the highest seq it
        deleted (change_log_pruned) in its own transaction, so a replica that
        replayed across it can tell. Returns the number deleted."""
        total = 0
        while True:
            async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction():
                n = await conn.fetchval(
                    """WITH gone AS (
                           DELETE FROM changes WHERE seq IN (
                               SELECT seq FROM changes
                               WHERE seq < $1 AND created_at < now() - make_interval(secs => $2)
                               ORDER BY seq LIMIT $3)
                           RETURNING seq),
                       mark AS (
                           UPDATE change_log_pruned SET through_seq = greatest(through_seq, (SELECT max(seq) FROM gone))
                           WHERE EXISTS (SELECT 1 FROM gone) RETURNING 1)
                       SELECT count(*) FROM gone""",
                    below_seq, float(older_than_s), batch)
            total += n
            if n < batch:
                return total

    async def log_pruned_through(self) -> int:
        """The highest seq ever pruned from the change log (0: never)."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            return await conn.fetchval("SELECT coalesce(max(through_seq), 0) FROM change_log_pruned")

    async def snapshot_floor(self, collection_id: int) -> tuple[bool, int]:
        """(the collection still exists, seq of its newest erasure): a matcher
        writes no snapshot of a deleted collection, nor one below that seq (it
        would hold erased vectors), and prunes every snapshot below it."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            row = await conn.fetchrow(
                "SELECT EXISTS (SELECT 1 FROM collections WHERE id = $1) AS live, "
                "coalesce((SELECT max(seq) FROM erasures WHERE collection_id = $1), 0) AS floor",
                collection_id)
        return bool(row["live"]), int(row["floor"])


def _of_shard(column: str, shard: Shard) -> str:
    """An SQL condition (with its leading AND) keeping `shard`'s faces; empty
    for the whole gallery. Shard's fields are checked ints: safe to inline."""
    if shard.whole:
        return ""
    return f" AND {column} % {int(shard.count)} = {int(shard.index)}"


async def _log_feedback(conn: asyncpg.Connection, collection_id: int, subject_id: uuid.UUID,
                        feedback_id: int) -> int:
    """A `feedback` log entry (the caller holds the change-log lock)."""
    seq = await conn.fetchval(
        "INSERT INTO changes (collection_id, op, face_id, subject_id) VALUES ($1, 'feedback', $2, $3) "
        "RETURNING seq", collection_id, feedback_id, subject_id)
    await _notify_change(conn, seq)
    return seq


def _probes(blobs: list[bytes]) -> np.ndarray:
    """A subject's "not this person" probes as rows (none: shape (0, 0))."""
    return np.stack([bytes_to_vec(b) for b in blobs]) if blobs else np.zeros((0, 0), np.float32)


def _count(status: str) -> int:
    """Rows affected, from a command status such as "DELETE 3"."""
    return int(status.rsplit(" ", 1)[-1])


def _feedback_dict(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["id"], "subject_id": str(row["subject_id"]), "source": row["source"],
            "actor": row["actor"], "note": row["note"], "created_at": row["created_at"].isoformat()}


def _clean_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise InvalidRequest("subject name must be a non-empty string")
    name = name.strip()
    if len(name) > 256:
        raise InvalidRequest("subject name must be at most 256 characters")
    return name
