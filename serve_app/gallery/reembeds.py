"""SQL of re-embedding a collection with another model (configs/migrations/0007_reembed.sql).

The job (serve_app/jobs/reembed.py) stages one new vector per face beside
the live ones; each staged batch is one transaction that also appends a
`stage` entry per face to the change log, so matcher replicas build the new
index aside while identify keeps answering from the old one. `switch` is one
transaction, under the change-log lock like every gallery write: it checks
that every face of the collection has a staged vector, moves the vectors
into `faces` (face ids unchanged), sets the collection's model, drops the
old model's "not this person" probes and appends a `switch` entry, at which
each matcher swaps the prebuilt index in. `abort` drops a staging
(`unstage`). The matcher side (GalleryIndex) reads staged vectors here too.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import asyncpg
import numpy as np

from serve_app.errors import CollectionNotFound, Conflict, InvalidRequest

from .repository import Collection, _lock_changelog, _notify_change, _of_shard, _vec_to_bytes, bytes_to_vec
from .shards import WHOLE, Shard

_NO_SUBJECT = uuid.UUID(int=0)


@dataclass(frozen=True)
class Staging:
    """A re-embed under way: the collection's new model."""

    collection_id: int
    model: str
    dim: int
    from_model: str


@dataclass(frozen=True)
class PendingFace:
    id: int
    subject_id: uuid.UUID
    crop_key: str | None


@dataclass
class Switched:
    """What `switch` did. complete=False: faces without a staged vector
    remain (enrolled since they were listed, or not re-embeddable), and
    nothing was changed."""

    complete: bool
    seq: int = 0
    faces: int = 0
    missing: int = 0
    feedback_dropped: int = 0
    already: bool = False  # the collection was on the new model already


@dataclass
class StagedLoad:
    """Every staging as of one log position (a matcher's load)."""

    seq: int
    models: dict[int, tuple[str, int]] = field(default_factory=dict)  # collection -> (model, dim)
    vectors: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # -> (ids, rows)


class ReembedRepository:
    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout_s: float = 3.0) -> None:
        self.pool = pool
        self.acquire_timeout_s = acquire_timeout_s

    # --- the job's side ----------------------------------------------------------
    async def begin(self, collection: Collection, model: str, dim: int) -> Staging | None:
        """The staging of `collection` for `model`, made if there is none; None
        when the collection is on `model` already. A staging for another model
        is a Conflict: abort it first."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction():
            col = await conn.fetchrow("SELECT embedder, dim FROM collections WHERE id = $1 FOR UPDATE",
                                      collection.id)
            if col is None:
                raise CollectionNotFound(f"no collection named {collection.name!r}", collection=collection.name)
            row = await conn.fetchrow("SELECT model, dim, from_model FROM reembeds WHERE collection_id = $1",
                                      collection.id)
            if row is not None and (row["model"], row["dim"]) != (model, dim):
                raise Conflict(f"collection {collection.name!r} is being re-embedded with {row['model']}; "
                               "abort that first", model=row["model"])
            if col["embedder"] == model and col["dim"] == dim:
                return None
            if row is None:
                await conn.execute(
                    "INSERT INTO reembeds (collection_id, model, dim, from_model) VALUES ($1, $2, $3, $4)",
                    collection.id, model, dim, col["embedder"])
                return Staging(collection.id, model, dim, col["embedder"])
            return Staging(collection.id, row["model"], row["dim"], row["from_model"])

    async def staging(self, collection: Collection) -> Staging | None:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            row = await conn.fetchrow("SELECT model, dim, from_model FROM reembeds WHERE collection_id = $1",
                                      collection.id)
        return Staging(collection.id, row["model"], row["dim"], row["from_model"]) if row else None

    async def pending(self, collection: Collection, *, after_id: int = 0, limit: int = 1000) -> list[PendingFace]:
        """Faces of the collection with no staged vector yet, in id order from after_id."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            rows = await conn.fetch(
                """SELECT f.id, f.subject_id, f.crop_key FROM faces f
                   WHERE f.collection_id = $1 AND f.id > $2
                     AND NOT EXISTS (SELECT 1 FROM staged_embeddings s WHERE s.face_id = f.id)
                   ORDER BY f.id LIMIT $3""", collection.id, after_id, limit)
        return [PendingFace(r["id"], r["subject_id"], r["crop_key"]) for r in rows]

    async def progress(self, collection: Collection) -> tuple[int, int]:
        """(faces in the collection, of them with a staged vector)."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            row = await conn.fetchrow(
                """SELECT (SELECT count(*) FROM faces WHERE collection_id = $1) AS faces,
                          (SELECT count(*) FROM staged_embeddings WHERE collection_id = $1) AS staged""",
                collection.id)
        return int(row["faces"]), int(row["staged"])

    async def stage(self, collection: Collection, staging: Staging,
                    vectors: dict[int, np.ndarray]) -> tuple[set[int], int]:
        """Stage {face id: new vector} in one transaction with a `stage` log
        entry per face. Returns (face ids staged now, seq). A face already
        staged is left as it is (a resumed job); a face deleted meanwhile is
        skipped. Conflict if the staging was aborted or switched meanwhile."""
        for fid, vec in vectors.items():
            if vec.shape != (staging.dim,):
                raise InvalidRequest(f"face {fid}: a {vec.shape} vector for a {staging.dim}-d staging")
        if not vectors:
            return set(), 0
        ids = sorted(vectors)
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction():
            await _lock_changelog(conn)
            live = await conn.fetchval(
                "SELECT 1 FROM reembeds WHERE collection_id = $1 AND model = $2 AND dim = $3 FOR SHARE",
                collection.id, staging.model, staging.dim)
            if not live:
                raise Conflict(f"the re-embed of collection {collection.name!r} with {staging.model} "
                               "was aborted or switched meanwhile")
            rows = await conn.fetch(
                """INSERT INTO staged_embeddings (face_id, collection_id, embedding)
                   SELECT t.f, $1, t.e FROM unnest($2::bigint[], $3::bytea[]) AS t(f, e)
                   JOIN faces f ON f.id = t.f AND f.collection_id = $1
                   ON CONFLICT (face_id) DO NOTHING RETURNING face_id""",
                collection.id, ids, [_vec_to_bytes(vectors[i]) for i in ids])
            staged = sorted(r["face_id"] for r in rows)
            seq = 0
            if staged:
                seqs = await conn.fetch(
                    """INSERT INTO changes (collection_id, op, face_id, subject_id)
                       SELECT $1, 'stage', f.id, f.subject_id FROM faces f
                       WHERE f.id = ANY($2::bigint[]) ORDER BY f.id RETURNING seq""",
                    collection.id, staged)
                seq = max(r["seq"] for r in seqs)
                await _notify_change(conn, seq)
        return set(staged), seq

    async def switch(self, collection: Collection, staging: Staging) -> Switched:
        """Make the staged vectors the collection's, atomically, if every face
        has one; otherwise change nothing and say how many are missing."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction():
            await _lock_changelog(conn)
            col = await conn.fetchrow("SELECT embedder, dim FROM collections WHERE id = $1 FOR UPDATE",
                                      collection.id)
            if col is None:
                raise CollectionNotFound(f"no collection named {collection.name!r}", collection=collection.name)
            row = await conn.fetchrow(
                "SELECT model, dim FROM reembeds WHERE collection_id = $1 FOR UPDATE", collection.id)
            if row is None or (row["model"], row["dim"]) != (staging.model, staging.dim):
                if (col["embedder"], col["dim"]) == (staging.model, staging.dim):
                    return Switched(True, already=True)
                raise Conflict(f"no re-embed of collection {collection.name!r} with {staging.model} to switch to")
            missing = await conn.fetchval(
                """SELECT count(*) FROM faces f WHERE f.collection_id = $1
                   AND NOT EXISTS (SELECT 1 FROM staged_embeddings s WHERE s.face_id = f.id)""", collection.id)
            if missing:
                return Switched(False, missing=int(missing))
            # "Not this person" probes are vectors of the old model: they cannot
            # be compared with the new one's and there is no image to re-embed.
            dropped = await conn.fetch(
                "DELETE FROM feedback WHERE collection_id = $1 AND model <> $2 RETURNING id, subject_id",
                collection.id, staging.model)
            await conn.execute("UPDATE collections SET embedder = $2, dim = $3 WHERE id = $1",
                               collection.id, staging.model, staging.dim)
            moved = await conn.execute(
                """UPDATE faces f SET embedding = s.embedding, model = $2, dim = $3
                   FROM staged_embeddings s WHERE s.face_id = f.id AND f.collection_id = $1""",
                collection.id, staging.model, staging.dim)
            await conn.execute("DELETE FROM reembeds WHERE collection_id = $1", collection.id)
            by_subject: dict[uuid.UUID, int] = {}
            for r in dropped:
                by_subject[r["subject_id"]] = r["id"]
            if by_subject:  # matchers re-read these subjects' probes (now none of the old model)
                await conn.execute(
                    """INSERT INTO changes (collection_id, op, face_id, subject_id)
                       SELECT $1, 'feedback', t.f, t.s FROM unnest($2::bigint[], $3::uuid[]) AS t(f, s)""",
                    collection.id, list(by_subject.values()), list(by_subject))
            seq = await conn.fetchval(
                "INSERT INTO changes (collection_id, op, face_id, subject_id) VALUES ($1, 'switch', 0, $2) "
                "RETURNING seq", collection.id, _NO_SUBJECT)
            await conn.execute(
                "INSERT INTO collection_switches (collection_id, seq, model, from_model) VALUES ($1, $2, $3, $4)",
                collection.id, seq, staging.model, col["embedder"])
            await _notify_change(conn, seq)
        return Switched(True, seq=seq, faces=int(moved.rsplit(" ", 1)[-1]), feedback_dropped=len(dropped))

    async def abort(self, collection: Collection) -> int:
        """Drop the collection's staging (an `unstage` entry tells matchers);
        returns the seq, 0 if there was none."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction():
            await _lock_changelog(conn)
            gone = await conn.fetchval("DELETE FROM reembeds WHERE collection_id = $1 RETURNING 1", collection.id)
            if not gone:
                return 0
            seq = await conn.fetchval(
                "INSERT INTO changes (collection_id, op, face_id, subject_id) VALUES ($1, 'unstage', 0, $2) "
                "RETURNING seq", collection.id, _NO_SUBJECT)
            await _notify_change(conn, seq)
        return int(seq)

    # --- the matcher's side --------------------------------------------------------
    async def staged_vectors(self, entries: list[tuple[int, int]]) -> dict[int, tuple[int, str, np.ndarray]]:
        """{face id: (collection id, model, staged vector)} for `stage` entries
        given as (face id, seq). A replica may read an entry after its switch
        committed: the staged vector is then the face's own, as long as that
        is the only switch of its collection since the entry. Faces gone since,
        or staged for an abandoned re-embed, are left out."""
        if not entries:
            return {}
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            rows = await conn.fetch(
                """SELECT t.f AS face_id, s.collection_id, r.model, s.embedding
                   FROM unnest($1::bigint[], $2::bigint[]) AS t(f, q)
                   JOIN staged_embeddings s ON s.face_id = t.f
                   JOIN reembeds r ON r.collection_id = s.collection_id
                   UNION ALL
                   SELECT t.f, f.collection_id, c.embedder, f.embedding
                   FROM unnest($1::bigint[], $2::bigint[]) AS t(f, q)
                   JOIN faces f ON f.id = t.f JOIN collections c ON c.id = f.collection_id
                   WHERE NOT EXISTS (SELECT 1 FROM staged_embeddings s WHERE s.face_id = t.f)
                     AND (SELECT count(*) FROM collection_switches x
                          WHERE x.collection_id = f.collection_id AND x.seq > t.q) = 1""",
                [f for f, _ in entries], [q for _, q in entries])
        return {r["face_id"]: (r["collection_id"], r["model"], bytes_to_vec(r["embedding"])) for r in rows}

    async def load_staged(self, shard: Shard = WHOLE) -> StagedLoad:
        """Every staging and its vectors (of `shard`'s faces), and the log
        position they reflect (one REPEATABLE READ snapshot)."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, \
                conn.transaction(isolation="repeatable_read", readonly=True):
            seq = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM changes")
            stagings = await conn.fetch("SELECT collection_id, model, dim FROM reembeds")
            rows = await conn.fetch(
                f"SELECT collection_id, face_id, embedding FROM staged_embeddings WHERE true{_of_shard('face_id', shard)} "
                "ORDER BY collection_id, face_id")
        out = StagedLoad(int(seq), {r["collection_id"]: (r["model"], r["dim"]) for r in stagings})
        by: dict[int, tuple[list[int], list[np.ndarray]]] = {}
        for r in rows:
            ids, vecs = by.setdefault(r["collection_id"], ([], []))
            ids.append(r["face_id"])
            vecs.append(bytes_to_vec(r["embedding"]))
        for cid, (ids, vecs) in by.items():
            out.vectors[cid] = (np.array(ids, np.int64), np.stack(vecs))
        return out

    async def last_switches(self) -> dict[int, int]:
        """{collection id: seq of its newest `switch`}: index snapshots older
        than it hold the previous model's vectors."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            rows = await conn.fetch("SELECT collection_id, max(seq) AS seq FROM collection_switches GROUP BY 1")
        return {r["collection_id"]: int(r["seq"]) for r in rows}

    async def models_at(self, seq: int) -> dict[int, str]:
        """{collection id: model} of the collections not switched after seq
        (what a replica that has applied the log up to seq may check against)."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            rows = await conn.fetch(
                """SELECT c.id, c.embedder FROM collections c WHERE NOT EXISTS (
                       SELECT 1 FROM collection_switches x WHERE x.collection_id = c.id AND x.seq > $1)""",
                seq)
        return {r["id"]: r["embedder"] for r in rows}
