"""A matcher replica's in-memory gallery, without Ray.

One CollectionIndex per collection plus the face -> subject map, and what
identify answers with besides: each subject's name and its "not this person"
probes, all kept in step with Postgres's change log (renames and feedback are
log entries too), so identify needs no database read and answers through a
Postgres outage from the state held. At start it restores the newest usable snapshot of
each collection from object storage, loads collections that have none from
Postgres (one collection at a time, or everything at once when there are no
snapshots at all), then replays the log from the oldest position it holds,
skipping per collection what that collection's snapshot already reflects.
It writes snapshots of collections with `snapshot_every` changes not yet in
any snapshot; the Matcher deployment runs that in the background.

A matcher shard (shards.Shard: face_id % count == index) holds only its own
faces: it loads, replays, stages and snapshots those alone (Postgres sends
it only their vectors), and follows the rest of the log -- names, probes,
collections, model switches -- whole, so each shard answers identify for
its faces with everything identify needs.

Each collection's index follows its size (index.policy): exact search while
small, IVF above `exact_max`, 8-bit IVF beyond the memory budget. A collection
that outgrows its index is rebuilt in a worker thread while the log is still
applied, then swapped in (index.adaptive); the Matcher runs that in the
background too.

Freshness: `LogFollower` wakes on Postgres NOTIFYs (the repository sends one
in the transaction of every change-log append) and polls every interval as
well, so a lost listener only costs latency. Every sync first checks the log
is still the one this replica applied: a log that ends below the seq held
(a failover to a lagging replica, a point-in-time restore) or whose entry at
that seq differs (rewritten since) makes the replica reload from scratch.
`lag()` gives seq behind and seconds since the last good sync, which the
Matcher exports and its health check bounds.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import numpy as np

from index.adaptive import AdaptiveIndex
from index.policy import BuildReport, IndexPolicy
from serve_app.errors import InvalidRequest, ModelChanged, ServiceUnavailable
from serve_app.messages import Hit

from .index_snapshots import Anchor, CollectionSnapshot, SnapshotStore
from .reembeds import ReembedRepository
from .repository import CHANGES_CHANNEL, Change, Collection, GalleryRepository
from .shards import WHOLE, Shard

log = logging.getLogger(__name__)

_BATCH = 5000
# Log entries of a collection's re-embedding (gallery/reembeds.py).
_STAGE_OPS = ("stage", "unstage", "switch")


class StaleIndex(RuntimeError):
    """The replica has not synced with the change log for too long."""


class LogPruned(RuntimeError):
    """Log entries after the position a replay started from were pruned
    while (or before) it read them: what it applied may have a hole."""




@dataclass(frozen=True)
class Lag:
    seq_behind: int  # newest seq known to exist minus the seq applied
    sync_age_s: float  # seconds since the last sync that reached the log's end
    db_seq: int  # newest seq known to exist (last good check or NOTIFY)


@dataclass
class LoadReport:
    seq: int
    faces: int
    from_snapshot: dict[int, int] = field(default_factory=dict)  # collection -> snapshot seq
    from_postgres: list[int] = field(default_factory=list)  # collections loaded from rows
    full_load: bool = False  # no snapshots at all: load_all
    replayed: int = 0  # log entries read after loading
    seconds: float = 0.0


class GalleryIndex:
    def __init__(
        self,
        repo: GalleryRepository,
        snapshots: SnapshotStore | None = None,
        *,
        snapshot_every: int = 1000,
        retry_s: float = 30.0,
        policy: IndexPolicy | None = None,
        reembeds: ReembedRepository | None = None,
        shard: Shard = WHOLE,
    ) -> None:
        if snapshots is not None and snapshots.shard != shard:
            raise ValueError(f"snapshot store of {snapshots.shard.label} given to {shard.label}")
        # The faces this replica holds (face_id % count == index); the rest of
        # the log (names, probes, collections, models) it follows whole.
        self.shard = shard
        self.repo = repo
        self.reembeds = reembeds or ReembedRepository(repo.pool)
        self.snapshots = snapshots
        self.snapshot_every = snapshot_every  # 0: never write snapshots
        self.policy = policy or IndexPolicy()
        self.indexes: dict[int, AdaptiveIndex] = {}
        self.subject_of: dict[int, uuid.UUID] = {}
        # Each collection's model as this replica holds it: a probe of another
        # model is refused (ModelChanged), never compared.
        self.models: dict[int, str] = {}
        # A re-embed under way: the new model's index of a collection, built
        # aside from `stage` entries and swapped in whole at its `switch`.
        self.staging: dict[int, AdaptiveIndex] = {}
        self.staging_model: dict[int, str] = {}
        # Held while a switch replaces (index, model) and while a search reads
        # the pair, so a search never gets one without the other.
        self._swap = threading.Lock()
        # Identify's answer besides the index: names, and the probes reported
        # "not this person" per subject (rows, L2-normalised).
        self.names: dict[uuid.UUID, str] = {}
        self.feedback: dict[uuid.UUID, np.ndarray] = {}
        self.seq = 0
        # Changes applied per collection that no snapshot covers yet.
        self.pending: dict[int, int] = {}
        # Seq of the newest face removal applied per collection: a snapshot
        # older than it still holds erased vectors, so one is written promptly.
        self.erased: dict[int, int] = {}
        # Rewrite a collection's snapshot once it is this many log entries
        # behind (however few were its own), so a restart replays at most
        # about this much of the log; 0 = never.
        self.snapshot_max_behind = 100_000
        self.snapshot_seq: dict[int, int] = {}
        # Serialises log replay and snapshot capture: a snapshot's index and
        # map must both be exactly at self.seq. Searches never take it.
        self.lock = asyncio.Lock()
        self._retry_s = retry_s
        self._retry_at = 0.0
        # Freshness: the log entry at self.seq as applied (to notice a
        # rewritten log), the newest seq known to exist, and when a sync
        # last reached the end of the log.
        self.anchor: Anchor | None = None
        self.db_seq = 0
        self.clock: Callable[[], float] = time.monotonic
        self.last_sync: float | None = None
        self.last_progress: float | None = None  # a catch-up batch applied
        self.reloads = 0

    # ------------------------------------------------------------- loading
    async def load(self) -> LoadReport:
        t0 = time.perf_counter()
        async with self.lock:
            try:
                report = await self._load()
            except LogPruned as exc:  # the snapshots are older than the log kept: Postgres has it all
                log.warning("%s; loading every collection from Postgres instead", exc)
                self.indexes, self.subject_of, self.snapshot_seq, self.pending, self.erased = {}, {}, {}, {}, {}
                report = await self._load(use_snapshots=False)
            self.anchor = (await self.repo.log_entries([self.seq])).get(self.seq) if self.seq else None
            self.db_seq = max(self.db_seq, self.seq)
            self.last_sync = self.clock()
        report.seq = self.seq
        report.faces = len(self.subject_of)
        report.seconds = time.perf_counter() - t0
        return report

    async def _load(self, use_snapshots: bool = True) -> LoadReport:
        # Read first: any collection or face committed later has a larger seq,
        # so replaying from <= seq0 cannot miss it.
        seq0 = await self.repo.latest_seq()
        # Staged re-embeddings as of one seq, read before any index: replaying
        # from at or below it brings every staging up to date, and an index
        # loaded later is never older than a switch the staging reflects.
        staged = await self.reembeds.load_staged(self.shard)
        switched = await self.reembeds.last_switches()
        self._load_staging(staged)
        # Names and probes as of now (>= seq0); the replay below brings every
        # subject renamed, reported or deleted since up to date.
        self.names, self.feedback = await self.repo.subject_state()
        collections = {c.id: c for c in await self.repo.list_collections()}
        self.models = {cid: c.embedder for cid, c in collections.items()}
        found = await self._list_snapshots(seq0, collections) if use_snapshots else {}
        for cid in list(found):  # a snapshot older than the last switch holds the old model's vectors
            found[cid] = [s for s in found[cid] if s >= switched.get(cid, 0)]
            if not found[cid]:
                del found[cid]
        if not found:
            seq, faces = await self.repo.load_all(self.shard)
            self.apply(faces)
            self.seq = min(seq, staged.seq)
            report = LoadReport(seq, 0, full_load=True)
            report.replayed = await self._catch_up(floor=seq, stage_floor=staged.seq)
            return report
        entries = await self.repo.log_entries(sorted({s for seqs in found.values() for s in seqs if s > 0}))
        report = LoadReport(0, 0)
        loaded: dict[int, int] = {}
        for cid, seqs in found.items():
            snap = await self._restore(collections[cid], seqs, entries)
            if snap is None:
                continue
            self.indexes[cid] = AdaptiveIndex.wrap(snap.index, self.policy)
            self.subject_of.update(snap.subject_of)
            loaded[cid] = self.snapshot_seq[cid] = report.from_snapshot[cid] = snap.seq
        for cid in collections:
            if cid not in loaded:
                seq, faces = await self.repo.load_collection(cid, self.shard)
                self.apply(faces)
                loaded[cid] = seq
                report.from_postgres.append(cid)
        self.seq = min([seq0, staged.seq, *report.from_snapshot.values()])
        report.replayed = await self._catch_up(skip=loaded, stage_floor=staged.seq)
        return report

    def _load_staging(self, staged: Any) -> None:
        self.staging, self.staging_model = {}, {}
        for cid, (model, dim) in staged.models.items():
            index = self.staging[cid] = AdaptiveIndex(dim, self.policy)
            self.staging_model[cid] = model
            if cid in staged.vectors:
                index.add(*staged.vectors[cid])

    async def _list_snapshots(self, seq0: int, collections: dict[int, Collection]) -> dict[int, list[int]]:
        if self.snapshots is None:
            return {}
        try:
            listed = await asyncio.to_thread(self.snapshots.list_all)
        except Exception:  # storage down: Postgres alone is still correct
            log.warning("cannot list index snapshots; loading from Postgres", exc_info=True)
            return {}
        found: dict[int, list[int]] = {}
        for cid, seqs in listed.items():
            if cid not in collections:
                log.warning("ignoring index snapshots of collection %s: not in this database", cid)
                continue
            usable = [s for s in seqs if s <= seq0]
            if len(usable) < len(seqs):
                log.warning("ignoring index snapshots of collection %s newer than the log (%s)", cid, seq0)
            if usable:
                found[cid] = usable
        return found

    async def _restore(
        self, collection: Collection, seqs: list[int], entries: dict[int, Anchor]
    ) -> CollectionSnapshot | None:
        def accept(snap: CollectionSnapshot) -> str | None:
            if snap.anchor != entries.get(snap.seq):
                return "its change-log entry is not this database's (foreign or stale snapshot)"
            if snap.index.dim != collection.dim:
                return f"dim {snap.index.dim} != collection dim {collection.dim}"
            if not self.shard.whole and not self.shard.owned(snap.index.ids()).all():
                return f"it holds faces of other shards than {self.shard.label}"
            return None

        assert self.snapshots is not None
        try:
            return await asyncio.to_thread(self.snapshots.load_newest, collection.id, seqs, accept)
        except Exception:  # whatever storage throws: fall back to Postgres
            log.warning("cannot read index snapshots of collection %s", collection.id, exc_info=True)
            return None

    # ------------------------------------------------------------ following
    async def sync(self) -> int:
        """Reach the end of the log (reloading first if the log is not the
        one applied); raises whatever the database raises."""
        async with self.lock:
            reason = await self._log_changed()
            if reason is not None:
                log.warning("change log rewound or rewritten (%s): reloading the gallery from scratch", reason)
                await self._reload()
            try:
                await self._catch_up()
            except LogPruned as exc:
                log.warning("%s: reloading the gallery", exc)
                await self._reload()
            self.db_seq = max(self.db_seq, self.seq)
            self.last_sync = self.clock()
        return self.seq

    async def _log_changed(self) -> str | None:
        latest = await self.repo.latest_seq()
        if latest < self.seq:
            self.db_seq = latest
            return f"the log ends at seq {latest}, this replica holds {self.seq}"
        self.db_seq = max(self.db_seq, latest)
        if self.seq:
            entry = (await self.repo.log_entries([self.seq])).get(self.seq)
            if entry != self.anchor:
                return f"the entry at seq {self.seq} is {entry}, this replica applied {self.anchor}"
        return None

    async def _reload(self) -> None:
        """Load everything again into a fresh state, then swap it in: searches
        go on against the old state until then."""
        fresh = GalleryIndex(
            self.repo, self.snapshots, snapshot_every=self.snapshot_every, retry_s=self._retry_s,
            policy=self.policy, reembeds=self.reembeds, shard=self.shard,
        )
        fresh.clock = self.clock
        report = await fresh.load()
        self.indexes, self.subject_of = fresh.indexes, fresh.subject_of
        self.names, self.feedback = fresh.names, fresh.feedback
        self.models, self.staging, self.staging_model = fresh.models, fresh.staging, fresh.staging_model
        self.pending, self.snapshot_seq = fresh.pending, fresh.snapshot_seq
        self.seq, self.anchor, self.db_seq = fresh.seq, fresh.anchor, fresh.db_seq
        self.reloads += 1
        log.warning("reloaded %d faces at seq %d in %.2fs", report.faces, report.seq, report.seconds)

    async def reach(self, min_seq: int, timeout_s: float) -> int:
        """Sync until min_seq is applied (read-your-writes). InvalidRequest
        if min_seq was never committed, ServiceUnavailable if the log cannot
        be read within timeout_s: never a stale answer."""
        if min_seq <= self.seq:
            return self.seq
        try:
            await asyncio.wait_for(self.sync(), timeout=timeout_s)
        except (asyncio.TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise ServiceUnavailable(
                f"could not reach min_seq {min_seq} (at {self.seq}): {type(exc).__name__}",
                retry_after_s=2, min_seq=min_seq, seq=self.seq,
            ) from None
        if min_seq > self.seq:  # the sync just read to the end of the log
            raise InvalidRequest(
                f"min_seq {min_seq} is beyond the latest committed change ({self.seq})",
                field="min_seq", latest_seq=self.seq,
            )
        return self.seq

    def observe_seq(self, seq: int) -> None:
        """A seq known to be committed (a NOTIFY): counts toward lag()."""
        self.db_seq = max(self.db_seq, seq)

    def lag(self) -> Lag:
        age = float("inf") if self.last_sync is None else max(0.0, self.clock() - self.last_sync)
        return Lag(max(0, self.db_seq - self.seq), age, self.db_seq)

    def check_fresh(self, max_staleness_s: float) -> None:
        """Raise StaleIndex when no sync has reached the log's end for longer
        than max_staleness_s (Postgres unreachable, apply failing)."""
        lag = self.lag()
        # A long catch-up (a bulk import) that keeps applying batches is not
        # stale; its seq_behind shows it is behind.
        progress_age = float("inf") if self.last_progress is None else self.clock() - self.last_progress
        if min(lag.sync_age_s, progress_age) > max_staleness_s:
            raise StaleIndex(
                f"no good sync with the change log for {lag.sync_age_s:.1f}s (bound {max_staleness_s}s); "
                f"at seq {self.seq}, {lag.seq_behind} known changes behind"
            )

    async def _catch_up(self, skip: dict[int, int] | None = None, *, floor: int = 0, stage_floor: int = 0) -> int:
        """Apply the log after self.seq. At load: skip (per collection) and
        floor (all collections) say which face entries the loaded indexes
        reflect, stage_floor which re-embed entries the loaded staging does."""
        n, start = 0, self.seq
        while True:
            changes = await self.repo.changes_since(self.seq, limit=_BATCH, shard=self.shard)
            if not changes:
                await self._check_not_pruned(start)
                return n
            stages = [(ch.face_id, ch.seq) for ch in changes
                      if ch.op == "stage" and ch.seq > stage_floor and self.shard.owns(ch.face_id)]
            staged = await self.reembeds.staged_vectors(stages) if stages else {}
            self.apply(changes, skip, floor=floor, stage_floor=stage_floor, staged=staged)
            last = changes[-1]
            self.seq = last.seq
            self.anchor = (last.collection_id, last.op, last.face_id, str(last.subject_id))
            self.last_progress = self.clock()
            if any(ch.collection_id not in self.models for ch in changes if ch.op in ("add", "switch")):
                await self._refresh_models()
            n += len(changes)
            if len(changes) < _BATCH:
                await self._check_not_pruned(start)
                return n

    async def _check_not_pruned(self, start: int) -> None:
        """After a replay from start: nothing after start may have been pruned
        (seq numbers have gaps, so only the pruning's own mark can tell)."""
        through = await self.repo.log_pruned_through()
        if through > start:
            raise LogPruned(f"the change log was pruned through seq {through}, a replay started at {start}")

    async def _refresh_models(self) -> None:
        """Learn the model of collections new to this replica (or switched with
        nothing staged); until then their searches are not checked."""
        try:
            # Only models this replica's indexes already reflect: a collection
            # switched after self.seq stays unknown until its switch is applied.
            for cid, model in (await self.reembeds.models_at(self.seq)).items():
                self.models.setdefault(cid, model)
        except Exception:  # the next batch retries; the log position is already applied
            log.warning("could not re-read the collections' models", exc_info=True)

    def apply(self, changes: list[Change], skip: dict[int, int] | None = None, *, floor: int = 0,
              stage_floor: int = 0, staged: dict[int, tuple[int, str, np.ndarray]] | None = None) -> None:
        """Apply log entries (or loaded faces, as adds); face entries at or below
        skip[collection] or floor are already reflected and ignored, and so are
        re-embed entries at or below stage_floor. staged: the vectors of the
        `stage` entries (ReembedRepository.staged_vectors).

        Face ids are never reused and a face's remove follows its add, so
        adds and removes of one call can be batched per collection. Names and
        probes come with each entry as they are now, so applying an entry
        again (a replay) is harmless. A `switch` or `unstage` replaces a whole
        index: what precedes it is applied first.
        """
        for i, ch in enumerate(changes):
            if ch.op in ("switch", "unstage"):
                self.apply(changes[:i], skip, floor=floor, stage_floor=stage_floor, staged=staged)
                self._apply_version(ch, skip, floor, stage_floor)
                self.apply(changes[i + 1:], skip, floor=floor, stage_floor=stage_floor, staged=staged)
                return
        adds: dict[int, dict[int, np.ndarray]] = {}
        removes: dict[int, list[int]] = {}
        stage_adds: dict[int, dict[int, np.ndarray]] = {}
        for ch in changes:
            cid = ch.collection_id
            if ch.op in ("rename", "feedback"):
                self._apply_subject(ch)
                continue
            if ch.op in ("add", "remove", "stage") and not self.shard.owns(ch.face_id):
                self._apply_other_shard(ch, skip, floor)
                continue
            if ch.op == "stage":
                found = (staged or {}).get(ch.face_id)
                if ch.seq > stage_floor and found is not None:  # None: the face is gone since
                    self.staging_model[cid] = found[1]
                    stage_adds.setdefault(cid, {})[ch.face_id] = found[2]
                continue
            if ch.op not in ("add", "remove"):  # a newer writer's op: never guess it is a remove
                log.warning("ignoring change-log entry %d with unknown op %r", ch.seq, ch.op)
                continue
            if ch.op == "remove" and ch.seq > stage_floor and (cid in self.staging or cid in stage_adds):
                stage_adds.get(cid, {}).pop(ch.face_id, None)
                if cid in self.staging:
                    self.staging[cid].remove(np.array([ch.face_id], np.int64))
            if ch.seq <= floor or (skip is not None and ch.seq <= skip.get(cid, -1)):
                continue
            self.pending[cid] = self.pending.get(cid, 0) + 1
            if ch.op == "add":
                if ch.embedding is None:  # removed again later in the log
                    continue
                adds.setdefault(cid, {})[ch.face_id] = ch.embedding
                self.subject_of[ch.face_id] = ch.subject_id
                if ch.name is not None:
                    self.names[ch.subject_id] = ch.name
            else:
                if ch.face_id in adds.get(cid, {}):
                    del adds[cid][ch.face_id]
                removes.setdefault(cid, []).append(ch.face_id)
                self.subject_of.pop(ch.face_id, None)
                self.erased[cid] = max(self.erased.get(cid, 0), ch.seq)
                if ch.name is None:  # the subject itself is gone
                    self._forget_subject(ch.subject_id)
        for cid, ids in removes.items():
            if cid in self.indexes:
                self.indexes[cid].remove(np.array(ids, np.int64))
        for cid, vecs in adds.items():
            if not vecs:
                continue
            first = next(iter(vecs.values()))
            index = self.indexes.get(cid)
            if index is None:
                index = self.indexes[cid] = AdaptiveIndex(first.shape[0], self.policy)
            index.add(np.fromiter(vecs.keys(), np.int64, len(vecs)), np.stack(list(vecs.values())))
        for cid, vecs in stage_adds.items():
            if not vecs:
                continue
            first = next(iter(vecs.values()))
            index = self.staging.get(cid)
            if index is None:
                index = self.staging[cid] = AdaptiveIndex(first.shape[0], self.policy)
            # A replayed entry adds the same vector again: add() replaces it.
            index.add(np.fromiter(vecs.keys(), np.int64, len(vecs)), np.stack(list(vecs.values())))

    def _apply_version(self, ch: Change, skip: dict[int, int] | None, floor: int, stage_floor: int) -> None:
        """`switch`: the collection's staged index becomes its index (one
        reference swap: a search holds the old index or the new one, whole);
        `unstage`: the staging is dropped."""
        cid = ch.collection_id
        if ch.seq <= stage_floor:  # the loaded staging is already past it (and so is every index)
            return
        new, model = self.staging.pop(cid, None), self.staging_model.pop(cid, None)
        if ch.op == "unstage" or ch.seq <= floor or (skip is not None and ch.seq <= skip.get(cid, -1)):
            return  # dropped; or the loaded index already holds the new vectors
        with self._swap:
            if new is None:  # nothing was staged: the collection had no faces
                self.indexes.pop(cid, None)
            else:
                new.policy = self.policy
                self.indexes[cid] = new
            if model is not None:
                self.models[cid] = model
            else:
                self.models.pop(cid, None)  # re-read after this batch
        # A restart should find the new vectors in a snapshot, not replay them.
        self.pending[cid] = max(self.pending.get(cid, 0), self.snapshot_every)
        log.info("collection %s switched to %s at seq %d (%d faces)", cid, model, ch.seq, len(new or ()))

    def model_fits(self, collection_id: int, model: str) -> bool:
        """Whether probes of `model` may be searched in this collection (its
        model unknown to this replica yet: it has no faces here)."""
        want = self.models.get(collection_id)
        return want is None or want == model

    def _apply_subject(self, ch: Change) -> None:
        if ch.name is None:  # deleted since: nothing of it is needed any more
            self._forget_subject(ch.subject_id)
            return
        self.names[ch.subject_id] = ch.name
        if ch.op == "feedback":
            if ch.feedback is not None and len(ch.feedback):
                self.feedback[ch.subject_id] = ch.feedback
            else:
                self.feedback.pop(ch.subject_id, None)

    def _apply_other_shard(self, ch: Change, skip: dict[int, int] | None, floor: int) -> None:
        """A face entry of another shard: only what every shard answers with
        (the subject's name, a deleted subject forgotten). A removal still
        counts as an erasure here: the erasure sweeper deletes every shard's
        older snapshots of the collection, so this shard rewrites its own."""
        if ch.op == "add" and ch.name is not None:
            self.names[ch.subject_id] = ch.name
        elif ch.op == "remove":
            if not (ch.seq <= floor or (skip is not None and ch.seq <= skip.get(ch.collection_id, -1))):
                self.erased[ch.collection_id] = max(self.erased.get(ch.collection_id, 0), ch.seq)
            if ch.name is None:
                self._forget_subject(ch.subject_id)

    def _forget_subject(self, subject_id: uuid.UUID) -> None:
        self.names.pop(subject_id, None)
        self.feedback.pop(subject_id, None)

    # ------------------------------------------------------------ searching
    def search(self, collection_id: int, vectors: np.ndarray, k: int,
               feedback_similarity: float | None = None, model: str | None = None) -> list[list[Hit]]:
        """Top-k subjects per vector, with their names; with feedback_similarity,
        a subject is marked demoted when the vector is at least that similar
        to a probe reported "not this person" for it. Thread-safe against
        concurrent apply(). With `model` (the probes' embedder), ModelChanged
        if the collection's index holds another model's vectors."""
        with self._swap:
            index = self.indexes.get(collection_id)
            held = self.models.get(collection_id)
        if model is not None and held is not None and held != model and len(vectors):
            raise ModelChanged(f"collection {collection_id} holds {held} embeddings, the probe is {model}'s",
                               retry_after_s=1, model=held, collection_id=collection_id)
        if index is None or len(index) == 0 or len(vectors) == 0:
            return [[] for _ in range(len(vectors))]
        # Ask for more faces than subjects: one subject may own many faces.
        k_faces = min(len(index), max(8 * k, 64))
        scores, ids = index.search(vectors, k_faces)
        return [self._best_per_subject(s, i, k, v, feedback_similarity) for s, i, v in zip(scores, ids, vectors)]

    def _demoted(self, subject: uuid.UUID, probe: np.ndarray, min_similarity: float | None) -> bool:
        if min_similarity is None:
            return False
        reported = self.feedback.get(subject)
        if reported is None or not len(reported) or reported.shape[1] != probe.shape[0]:
            return False
        return float(np.max(reported @ probe)) >= min_similarity

    def _best_per_subject(self, scores: np.ndarray, ids: np.ndarray, k: int, probe: np.ndarray,
                          feedback_similarity: float | None) -> list[Hit]:
        seen: set[uuid.UUID] = set()
        out: list[Hit] = []
        for score, face_id in zip(scores, ids):
            if face_id < 0:
                break
            subject = self.subject_of.get(int(face_id))
            if subject is None or subject in seen:
                continue
            seen.add(subject)
            out.append(Hit(subject_id=str(subject), face_id=int(face_id), similarity=float(score),
                           name=self.names.get(subject),
                           demoted=self._demoted(subject, probe, feedback_similarity)))
            if len(out) == k:
                break
        return out

    # ------------------------------------------------------------ snapshots
    def snapshot_due(self) -> list[int]:
        """Collections with snapshot_every changes in no snapshot yet, and
        collections with a snapshot older than a removal applied since: those
        are rewritten at once, so an erased vector does not wait in a
        snapshot for snapshot_every more changes (the erasure sweeper deletes
        the old snapshot objects; this keeps restarts fast)."""
        if self.snapshots is None or self.snapshot_every <= 0 or time.monotonic() < self._retry_at:
            return []
        due = [c for c, n in self.pending.items() if n >= self.snapshot_every and c in self.indexes]
        due += [c for c, s in self.erased.items()
                if c in self.indexes and c not in due and s > self.snapshot_seq.get(c, s)]
        if self.snapshot_max_behind > 0:  # bounded replay: a quiet collection's snapshot holds the log back
            due += [c for c, s in self.snapshot_seq.items()
                    if c in self.indexes and c not in due and self.seq - s > self.snapshot_max_behind]
        return due

    async def prune_log(self, retention_s: float) -> int:
        """Delete change-log entries no replica needs any more: below the
        newest snapshot of every collection in every shard (of this replica's
        shard count; snapshots of another layout are never restored by it)
        and below this replica's own
        position (a restart restores the newest snapshots and replays after
        them; the entry at a snapshot's seq stays, it is its anchor), and
        older than retention_s. A replay that started below what was pruned
        notices (LogPruned) and reloads. Errors are logged, never raised."""
        if retention_s <= 0:
            return 0
        try:
            live = {c.id for c in await self.repo.list_collections()}
            # Every shard's newest snapshots (this one's alone when unsharded): a
            # shard restarting from its own must find the log after them.
            shards = await asyncio.to_thread(self.snapshots.list_every_shard) if self.snapshots is not None else {}
            below = min([self.seq, *(seqs[0] for listed in shards.values()
                                     for cid, seqs in listed.items() if cid in live and seqs)])
            n = await self.repo.prune_changes(below, retention_s)
        except Exception:
            log.warning("pruning the change log failed; trying again later", exc_info=True)
            return 0
        if n:
            log.info("pruned %d change-log entries below seq %d", n, below)
        return n

    async def write_snapshots(self) -> list[str]:
        """Snapshot every due collection; a failure is logged and retried
        after retry_s, never raised (serving does not depend on it)."""
        written: list[str] = []
        for cid in self.snapshot_due():
            try:
                key = await self._write_one(cid)
            except Exception:
                log.exception("index snapshot of collection %s failed; retrying in %ss", cid, self._retry_s)
                self._retry_at = time.monotonic() + self._retry_s
                break
            if key is not None:
                written.append(key)
        return written

    async def _write_one(self, cid: int) -> str | None:
        assert self.snapshots is not None
        live, floor = await self.repo.snapshot_floor(cid)
        if not live:  # deleted: its erasure removes its snapshots, none is written again
            self.pending.pop(cid, None)
            self.erased.pop(cid, None)
            self.snapshot_seq.pop(cid, None)
            return None
        newest = await asyncio.to_thread(self.snapshots.list_seqs, cid)
        async with self.lock:
            seq = self.seq
            if newest and newest[0] >= seq:  # another replica already covers all we applied
                self.pending[cid] = 0
                self.snapshot_seq[cid] = newest[0]
                return None
            if seq < floor:  # an erasure this replica has not applied yet: no snapshot may predate it
                return None
            anchor = (await self.repo.log_entries([seq])).get(seq) if seq else None
            if seq and anchor is None:
                raise RuntimeError(f"change-log entry {seq} is missing")
            counted = self.pending.get(cid, 0)
            # Streamed straight from the live index to object storage (bounded
            # memory: no serialised copy), so under the lock -- no apply can
            # interleave, and the log waits for the upload -- but off the event
            # loop; searches only need the index's read lock, which this shares.
            # Unsigned without a snapshot key: no replica with a key would load it.
            key, size = await asyncio.to_thread(self.snapshots.write_streamed, cid, seq, anchor,
                                                self.indexes[cid].current, self.subject_of, floor)
        # An erasure committed while this one was written makes it stale at
        # once: prune below the erasure again (this snapshot included).
        _, floor_now = await self.repo.snapshot_floor(cid)
        if floor_now > floor:
            await asyncio.to_thread(self.snapshots.prune, cid, floor_now)
        self.pending[cid] = self.pending.get(cid, 0) - counted
        self.snapshot_seq[cid] = seq
        log.info("wrote index snapshot %s (%d bytes)", key, size)
        return key

    # ------------------------------------------------------------- rebuilds
    def set_policy(self, policy: IndexPolicy) -> None:
        """A new policy applies to every index; the next rebuild_due() says
        which of them it asks to rebuild."""
        self.policy = policy
        for index in self.indexes.values():
            index.policy = policy

    def rebuild_due(self) -> list[int]:
        return [c for c, ix in self.indexes.items() if not ix.rebuilding and ix.rebuild_reason()]

    async def rebuild_indexes(self) -> dict[int, BuildReport]:
        """Rebuild every collection whose index no longer fits its size, one
        at a time in a worker thread; the log keeps being applied and
        searches keep being served meanwhile. A failure is logged and leaves
        the old index serving."""
        done: dict[int, BuildReport] = {}
        for cid in self.rebuild_due():
            index = self.indexes.get(cid)
            if index is None:
                continue
            reason = index.rebuild_reason()
            try:
                report = await asyncio.to_thread(index.rebuild)
            except Exception:
                log.exception("rebuilding the index of collection %s failed (%s)", cid, reason)
                continue
            log.info(
                "rebuilt collection %s (%s): %s, %d vectors, nlist %d, nprobe %d, recall@1 %.3f, "
                "train %.1fs, add %.1fs, calibrate %.1fs",
                cid, reason, report.kind, report.n, report.nlist, report.nprobe, report.recall_at_1,
                report.train_s, report.add_s, report.calibrate_s,
            )
            # A restart should find the new kind in a snapshot, not rebuild again.
            self.pending[cid] = max(self.pending.get(cid, 0), self.snapshot_every)
            done[cid] = report
        return done

    def stats(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "shard": {"index": self.shard.index, "count": self.shard.count},
            "faces": {cid: len(ix) for cid, ix in self.indexes.items()},
            "models": dict(self.models),
            "staging": {cid: {"model": self.staging_model.get(cid), "faces": len(ix)}
                        for cid, ix in self.staging.items()},
            "subjects_named": len(self.names),
            "subjects_with_feedback": len(self.feedback),
            "index": {
                cid: {"kind": ix.kind, "nprobe": ix.nprobe, "bytes": ix.nbytes()}
                for cid, ix in self.indexes.items()
            },
            "snapshot_seq": dict(self.snapshot_seq),
            "changes_since_snapshot": dict(self.pending),
        }


class LogFollower:
    """Keeps a GalleryIndex at the end of the log: LISTEN on a connection of
    its own (``listen_connect``, optional) wakes it at once on a commit; a
    poll every ``interval_s`` catches whatever a lost listener missed and
    proves the database is still reachable. Sync errors are logged, never
    raised: ``GalleryIndex.lag()`` shows them, and the health check acts."""

    def __init__(
        self,
        gallery: GalleryIndex,
        *,
        interval_s: float = 1.0,
        listen_connect: Callable[[], Awaitable[Any]] | None = None,
        after_sync: Callable[[], None] | None = None,
    ) -> None:
        self.gallery = gallery
        self.interval_s = interval_s
        self._connect = listen_connect
        self._after_sync = after_sync
        self._conn: Any = None
        self._wake = asyncio.Event()
        self._retry_listen_at = 0.0
        self.notifications = 0
        self.sync_errors = 0

    @property
    def listening(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        self.notifications += 1
        try:
            self.gallery.observe_seq(int(payload))
        except ValueError:
            pass
        self._wake.set()

    async def _ensure_listening(self) -> None:
        if self._connect is None or self.listening or time.monotonic() < self._retry_listen_at:
            return
        await self._close()
        try:
            conn = await asyncio.wait_for(self._connect(), timeout=10)
            await conn.add_listener(CHANGES_CHANNEL, self._on_notify)
        except Exception as exc:  # polling still runs; try again later
            log.warning("cannot LISTEN for change-log notices (%s); polling every %ss", exc, self.interval_s)
            self._retry_listen_at = time.monotonic() + max(5.0, 5 * self.interval_s)
            return
        self._conn = conn
        self._wake.set()  # sync once: changes committed before LISTEN sent no notice here

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=2)
            except Exception:
                conn.terminate()

    async def step(self) -> bool:
        """One round: (re)listen, wait for a notice or the interval, sync.
        True when the sync succeeded."""
        await self._ensure_listening()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=self.interval_s)
        except asyncio.TimeoutError:
            pass
        self._wake.clear()
        try:
            await self.gallery.sync()
            ok = True
        except Exception:
            self.sync_errors += 1
            log.exception("change-log sync failed; retrying")
            await self._close()  # the listener's connection is likely gone too
            ok = False
        if self._after_sync is not None:
            self._after_sync()
        return ok

    async def run(self) -> None:
        try:
            while True:
                await self.step()
        finally:
            await self._close()
