"""Erasures and the object outbox: the SQL (configs/migrations/0006_erasure.sql).

A delete of a face, subject or collection calls ``record_erasure`` inside
its own transaction, so the erasure (the receipt) and every copy outside
Postgres that must go with the rows (``object_outbox``) commit or roll back
together with the row delete: a committed delete can never forget its crops.

``ErasureRepository`` is the sweeper's side (serve_app/services/erasure.py):
claim due outbox rows with a lease (``FOR UPDATE SKIP LOCKED``, so several
ingress replicas share the work without doing an item twice at once),
finish them, reschedule them with backoff, stamp the erasure complete once
its last row is done (with an audit record in the same transaction), and
read receipts. It also writes an enrolment's guard row: an outbox row with
no erasure, due after a grace period, that the transaction writing the face
row deletes again (``consume_guard``); a crop whose enrolment never
committed is therefore swept like an erased one.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg

if TYPE_CHECKING:  # the repository imports this module inside its delete transactions
    from .repository import Collection

SNAPSHOT_PREFIX = "index-snapshots"  # SnapshotStore's prefix: <prefix>/<collection id>/<seq>.snap
CACHE_BATCH = 1000  # subject ids per cache outbox row


def crop_prefix(collection_id: int, subject_id: uuid.UUID | str | None = None) -> str:
    """Where a collection's (or one subject's) crops live: crops/<collection id>/<subject id>/."""
    return f"crops/{collection_id}/" if subject_id is None else f"crops/{collection_id}/{subject_id}/"


@dataclass(frozen=True)
class OutboxEntry:
    """One copy outside Postgres that an erasure must remove."""

    copy: str  # crops | snapshots | cache
    op: str  # object | prefix | snapshots_below | cache
    target: str
    items: tuple[str, ...] = ()
    below_seq: int | None = None


@dataclass
class OutboxItem:
    """A claimed outbox row."""

    id: int
    erasure_id: uuid.UUID | None
    copy: str
    op: str
    target: str
    items: list[str]
    below_seq: int | None
    attempts: int
    removed: int = 0


@dataclass
class CopyStatus:
    """Where one kind of copy lived and whether it is gone."""

    copy: str  # postgres | crops | snapshots | cache
    complete: bool
    where: list[str]
    items: int  # outbox rows (keys, prefixes, batches) for this copy
    items_done: int
    removed: int  # objects / rows / entries actually deleted
    attempts: int = 0
    last_error: str | None = None
    notes: list[str] = field(default_factory=list)
    done_at: datetime | None = None


@dataclass
class Receipt:
    id: uuid.UUID
    tenant: str
    collection: str
    kind: str
    target: str
    seq: int
    requested_by: str
    requested_at: datetime
    removed: dict[str, Any]
    copies: list[CopyStatus]
    completed_at: datetime | None

    @property
    def complete(self) -> bool:
        return self.completed_at is not None


def plan_face(collection: Collection, subject_id: uuid.UUID, crop_key: str | None, seq: int) -> list[OutboxEntry]:
    """The crop, the snapshots before the delete, and the Redis keys tied to
    the subject (the cache ties entries to subjects, not to faces, so a face
    erasure clears all of its subject's: a cache can afford the misses)."""
    out = [OutboxEntry("crops", "object", crop_key)] if crop_key else []
    return out + [_snapshots_below(collection, seq), *_cache([subject_id])]


def plan_subject(collection: Collection, subject_id: uuid.UUID, crop_keys: list[str], seq: int) -> list[OutboxEntry]:
    """Each known crop, then the whole prefix (a crop no row knows of, e.g.
    left by a crashed writer, goes too), the snapshots before the delete, and
    the Redis keys tied to the subject (embedding cache, idempotency)."""
    out = [OutboxEntry("crops", "object", k) for k in crop_keys]
    out.append(OutboxEntry("crops", "prefix", crop_prefix(collection.id, subject_id)))
    return out + [_snapshots_below(collection, seq), *_cache([subject_id])]


def plan_collection(collection: Collection, subject_ids: list[uuid.UUID]) -> list[OutboxEntry]:
    """Every crop and every snapshot of the collection, and its subjects' Redis keys."""
    return [
        OutboxEntry("crops", "prefix", crop_prefix(collection.id)),
        OutboxEntry("snapshots", "prefix", f"{SNAPSHOT_PREFIX}/{collection.id}/"),
        *_cache(subject_ids),
    ]


def _snapshots_below(collection: Collection, seq: int) -> OutboxEntry:
    return OutboxEntry("snapshots", "snapshots_below", f"{SNAPSHOT_PREFIX}/{collection.id}/", below_seq=seq)


def _cache(subject_ids: list[uuid.UUID]) -> list[OutboxEntry]:
    uniq = sorted({str(s) for s in subject_ids})
    return [OutboxEntry("cache", "cache", "redis: keys tied to subjects", tuple(uniq[i:i + CACHE_BATCH]))
            for i in range(0, len(uniq), CACHE_BATCH)]


async def record_erasure(
    conn: asyncpg.Connection, collection: Collection, *, kind: str, target: str, seq: int,
    requested_by: str, removed: dict[str, Any], entries: list[OutboxEntry],
) -> uuid.UUID:
    """The erasure and its outbox rows, in the caller's (the delete's) transaction."""
    eid = uuid.uuid4()
    await conn.execute(
        "INSERT INTO erasures (id, tenant, collection_id, collection_name, kind, target, seq, requested_by, removed) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        eid, collection.tenant, collection.id, collection.name, kind, target, seq, requested_by, removed)
    if entries:
        await conn.executemany(
            "INSERT INTO object_outbox (erasure_id, copy, op, target, items, below_seq) VALUES ($1, $2, $3, $4, $5, $6)",
            [(eid, e.copy, e.op, e.target, list(e.items), e.below_seq) for e in entries])
    return eid


async def consume_guard(conn: asyncpg.Connection, guard_id: int) -> bool:
    """In the transaction that writes the face row: the crop is now owned by
    the row. False when the sweeper has claimed the guard already (the
    enrolment outlived its grace period and its crop is being swept)."""
    status = await conn.execute(
        "DELETE FROM object_outbox WHERE id = $1 AND erasure_id IS NULL AND attempts = 0 AND done_at IS NULL",
        guard_id)
    return not status.endswith(" 0")


def _item(r: asyncpg.Record) -> OutboxItem:
    return OutboxItem(r["id"], r["erasure_id"], r["copy"], r["op"], r["target"], list(r["items"]),
                      r["below_seq"], r["attempts"], r["removed"])


class ErasureRepository:
    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout_s: float = 3.0) -> None:
        self.pool = pool
        self.acquire_timeout_s = acquire_timeout_s

    async def guard(self, key: str, grace_s: float) -> int:
        """An outbox row for a crop about to be uploaded, due after grace_s."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            return await conn.fetchval(
                "INSERT INTO object_outbox (copy, op, target, not_before) "
                "VALUES ('crops', 'object', $1, now() + make_interval(secs => $2)) RETURNING id",
                key, float(grace_s))

    async def drop_guard(self, guard_id: int) -> None:
        """The enrolment failed and removed its crop itself."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            await conn.execute(
                "DELETE FROM object_outbox WHERE id = $1 AND erasure_id IS NULL AND attempts = 0", guard_id)

    async def claim(self, *, limit: int, lease_s: float, erasure_id: uuid.UUID | None = None) -> list[OutboxItem]:
        """Due rows, leased for lease_s (a sweeper that dies mid-item leaves it
        due again after that); attempts counts claims."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            rows = await conn.fetch(
                """UPDATE object_outbox o SET attempts = o.attempts + 1,
                          not_before = now() + make_interval(secs => $2)
                   WHERE o.id IN (SELECT id FROM object_outbox
                                  WHERE done_at IS NULL AND not_before <= now()
                                    AND ($3::uuid IS NULL OR erasure_id = $3)
                                  ORDER BY not_before, id LIMIT $1 FOR UPDATE SKIP LOCKED)
                   RETURNING o.id, o.erasure_id, o.copy, o.op, o.target, o.items, o.below_seq, o.attempts,
                             o.removed""",
                limit, float(lease_s), erasure_id)
        return sorted((_item(r) for r in rows), key=lambda i: i.id)

    async def finish(self, item: OutboxItem, removed: int, note: str | None = None) -> bool:
        """The copy is confirmed gone. A guard row is deleted; an erasure's row
        is kept, done, for the receipt. True when this completed its erasure
        (then stamped complete, with an audit record, in the same transaction)."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn, conn.transaction():
            if item.erasure_id is None:
                await conn.execute("DELETE FROM object_outbox WHERE id = $1", item.id)
                return False
            await conn.execute(
                "UPDATE object_outbox SET done_at = now(), removed = removed + $2, note = $3, last_error = NULL "
                "WHERE id = $1 AND done_at IS NULL", item.id, removed, note)
            row = await conn.fetchrow(
                """UPDATE erasures e SET completed_at = now()
                   WHERE e.id = $1 AND e.completed_at IS NULL
                     AND NOT EXISTS (SELECT 1 FROM object_outbox WHERE erasure_id = $1 AND done_at IS NULL)
                   RETURNING e.tenant, e.kind, e.target, e.collection_name, e.seq, e.completed_at""",
                item.erasure_id)
            if row is None:
                return False
            summary = await conn.fetch(
                "SELECT copy, count(*) AS items, sum(removed) AS removed FROM object_outbox "
                "WHERE erasure_id = $1 GROUP BY copy ORDER BY copy", item.erasure_id)
            # The audit trail (serve_app/gallery/access.py reads it) says when
            # the last copy went and how many of each were removed.
            await conn.execute(
                "INSERT INTO audit_log (tenant, actor, action, target, details) VALUES ($1, $2, $3, $4, $5)",
                row["tenant"], "erasure-sweeper", "erasure.complete", str(item.erasure_id),
                {"kind": row["kind"], "target": row["target"], "collection": row["collection_name"],
                 "seq": row["seq"], "completed_at": row["completed_at"].isoformat(),
                 "removed": {r["copy"]: int(r["removed"] or 0) for r in summary}})
            return True

    async def progress(self, item: OutboxItem, removed: int) -> None:
        """Part of a large prefix is gone; the rest is due at once."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            await conn.execute(
                "UPDATE object_outbox SET removed = removed + $2, not_before = now(), attempts = 0 "
                "WHERE id = $1 AND done_at IS NULL AND erasure_id IS NOT NULL", item.id, removed)

    async def retry_later(self, item: OutboxItem, delay_s: float, error: str) -> None:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            await conn.execute(
                "UPDATE object_outbox SET not_before = now() + make_interval(secs => $2), last_error = $3 "
                "WHERE id = $1 AND done_at IS NULL", item.id, float(delay_s), error[:1000])

    async def backlog(self, guard_grace_s: float) -> tuple[int, float]:
        """(rows owed, seconds the oldest has been owed): every unfinished
        erasure row (due, backing off after a failure, or being worked) since
        it was written, and every enrolment guard past its grace (an orphaned
        crop) since the grace ended. Guards still in their grace are not owed."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            row = await conn.fetchrow(
                """SELECT count(*) AS n,
                          EXTRACT(EPOCH FROM now() - min(CASE WHEN erasure_id IS NULL
                                                         THEN created_at + make_interval(secs => $1)
                                                         ELSE created_at END))::float8 AS oldest
                   FROM object_outbox
                   WHERE done_at IS NULL
                     AND (erasure_id IS NOT NULL OR created_at + make_interval(secs => $1) <= now())""",
                float(guard_grace_s))
        return int(row["n"]), max(0.0, float(row["oldest"] or 0.0))

    async def pending(self) -> int:
        """Outbox rows not yet done (guards included)."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            return await conn.fetchval("SELECT count(*) FROM object_outbox WHERE done_at IS NULL")

    async def receipt(self, erasure_id: uuid.UUID, tenant: str | None) -> Receipt | None:
        """One erasure with its copies; None when it does not exist or is
        another tenant's (tenant=None: any tenant)."""
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            e = await conn.fetchrow(
                "SELECT * FROM erasures WHERE id = $1 AND ($2::text IS NULL OR tenant = $2)", erasure_id, tenant)
            if e is None:
                return None
            rows = await conn.fetch(
                "SELECT copy, op, target, below_seq, attempts, last_error, note, removed, done_at "
                "FROM object_outbox WHERE erasure_id = $1 ORDER BY id", erasure_id)
        return build_receipt(dict(e), [dict(r) for r in rows])


def build_receipt(e: dict[str, Any], rows: list[dict[str, Any]]) -> Receipt:
    """A receipt from an erasures row and its outbox rows (also used by the
    unit tests' in-memory repository)."""
    removed = dict(e["removed"] or {})
    copies = [CopyStatus("postgres", True, [f"postgres: {t}" for t in sorted(removed.get("rows", {}))],
                         items=1, items_done=1, removed=sum(int(v) for v in removed.get("rows", {}).values()),
                         done_at=e["requested_at"])]
    for copy in ("crops", "snapshots", "cache"):
        mine = [r for r in rows if r["copy"] == copy]
        where: list[str] = []
        for r in mine:
            if r["op"] == "snapshots_below":
                where.append(f"object store: {r['target']}*.snap below seq {r['below_seq']}")
            elif r["op"] == "cache":
                where.append(r["target"])
            else:
                where.append(f"object store: {r['target']}")
        done = [r for r in mine if r["done_at"] is not None]
        errors = [r["last_error"] for r in mine if r["done_at"] is None and r["last_error"]]
        copies.append(CopyStatus(
            copy, len(done) == len(mine), sorted(set(where)), len(mine), len(done),
            sum(int(r["removed"]) for r in mine), max((int(r["attempts"]) for r in mine), default=0),
            errors[-1] if errors else None, sorted({r["note"] for r in mine if r["note"]}),
            max((r["done_at"] for r in done), default=None) if len(done) == len(mine) and mine else
            (e["requested_at"] if not mine else None)))
    return Receipt(e["id"], e["tenant"], e["collection_name"], e["kind"], e["target"], int(e["seq"]),
                   e["requested_by"], e["requested_at"], removed, copies, e["completed_at"])
