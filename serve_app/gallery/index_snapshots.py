"""Per-collection index snapshots in object storage.

One object per snapshot, ``index-snapshots/<collection_id>/<seq:020d>.snap``:

    MAGIC | uint16 format | uint32 header length | JSON header | body
    body = CollectionIndex.snapshot(seq) | face ids (int64 LE) | subject uuids (16 B each)

The header names the collection, the seq, the change-log entry at that seq
(the *anchor*, so a snapshot left behind by another database is recognised
as foreign) and the body's length and sha256. Index and mapping travel in
one object, so they always come from the same seq; the checksum makes a
truncated or half-written object unreadable rather than wrong, and
``ObjectStore.put_atomic`` keeps half-written objects out of sight anyway.
The newest ``keep`` snapshots per collection are kept, older ones deleted.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from index import framing
from index.collection_index import CollectionIndex
from index.framing import IndexCorrupt

from .objects import ObjectStore

log = logging.getLogger(__name__)

_MAGIC = b"FSCSNAP\x00"
FORMAT_VERSION = 1
_MAX_HEADER = 64 * 1024
_NAME = re.compile(r"^(\d{20})\.snap$")
_TMP = re.compile(r"^(\d{20})\.snap\.tmp-[0-9a-f]+$")

# (collection_id, op, face_id, subject_id) of the change-log row at a seq.
Anchor = tuple[int, str, int, str]


@dataclass
class CollectionSnapshot:
    collection_id: int
    seq: int  # every change up to and including seq is reflected
    index: CollectionIndex
    subject_of: dict[int, uuid.UUID] = field(repr=False)
    anchor: Anchor | None = None  # None only for seq 0


def encode(
    collection_id: int,
    seq: int,
    anchor: Anchor | None,
    index: CollectionIndex,
    subject_of: dict[int, uuid.UUID],
    signing_key: bytes | None = None,
) -> bytes:
    """Serialise one collection; subject_of must cover every id in index.
    With a signing key the header carries an HMAC over itself (which covers
    the body through its sha256), so only holders of the key can make a
    snapshot replicas will load."""
    index_bytes = index.snapshot(seq)
    face_ids = np.ascontiguousarray(index.ids(), dtype="<i8")
    subjects = b"".join(subject_of[int(f)].bytes for f in face_ids)
    body = b"".join([index_bytes, face_ids.tobytes(), subjects])
    header = {
        "format": FORMAT_VERSION,
        "collection_id": int(collection_id),
        "seq": int(seq),
        "anchor": list(anchor) if anchor is not None else None,
        "faces": int(face_ids.size),
        "index_len": len(index_bytes),
        "body_len": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    if signing_key:
        header["hmac"] = _sign(signing_key, header)
    return framing.pack(_MAGIC, FORMAT_VERSION, header, body)


def _sign(key: bytes, header: dict) -> str:
    fields = {k: v for k, v in header.items() if k != "hmac"}
    return hmac.new(key, json.dumps(fields, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def decode(data: bytes, *, collection_id: int | None = None, seq: int | None = None,
           signing_key: bytes | None = None) -> CollectionSnapshot:
    """Parse and fully validate a blob; IndexCorrupt for anything not whole and ours
    (with a signing key: anything not signed with it)."""
    header, body = framing.unpack(
        data, magic=_MAGIC, version=FORMAT_VERSION, what="collection snapshot", max_header=_MAX_HEADER
    )
    if signing_key and not hmac.compare_digest(str(header.get("hmac", "")), _sign(signing_key, header)):
        raise IndexCorrupt("collection snapshot is not signed with this deployment's snapshot key")
    for key in ("collection_id", "seq", "faces", "index_len", "body_len"):
        if not isinstance(header.get(key), int) or header[key] < 0:
            raise IndexCorrupt(f"collection snapshot header lacks a valid {key!r}")
    if len(body) != header["body_len"]:
        raise IndexCorrupt(f"collection snapshot body is {len(body)} bytes, header says {header['body_len']}")
    if hashlib.sha256(body).hexdigest() != header.get("body_sha256"):
        raise IndexCorrupt("collection snapshot checksum mismatch")
    if collection_id is not None and header["collection_id"] != collection_id:
        raise IndexCorrupt(f"snapshot is for collection {header['collection_id']}, expected {collection_id}")
    if seq is not None and header["seq"] != seq:
        raise IndexCorrupt(f"snapshot header says seq {header['seq']}, its name says {seq}")
    n, ilen = header["faces"], header["index_len"]
    if ilen + 24 * n != len(body):
        raise IndexCorrupt("collection snapshot body does not match its face count")
    index, index_seq = CollectionIndex.restore(body[:ilen])
    if index_seq != header["seq"] or len(index) != n:
        raise IndexCorrupt("collection snapshot index disagrees with its header (seq/faces)")
    face_ids = np.frombuffer(body[ilen : ilen + 8 * n], dtype="<i8").astype(np.int64)
    if not np.array_equal(np.sort(face_ids), np.sort(index.ids())):
        raise IndexCorrupt("collection snapshot mapping disagrees with its index")
    raw = bytes(body[ilen + 8 * n :])
    interned: dict[bytes, uuid.UUID] = {}  # many faces share a subject: one object each
    subject_of: dict[int, uuid.UUID] = {}
    for i, fid in enumerate(face_ids.tolist()):
        b = raw[16 * i : 16 * i + 16]
        sub = interned.get(b)
        if sub is None:
            sub = interned[b] = uuid.UUID(bytes=b)
        subject_of[fid] = sub
    anchor = header.get("anchor")
    return CollectionSnapshot(
        header["collection_id"], header["seq"], index, subject_of,
        tuple(anchor) if isinstance(anchor, list) else None,  # type: ignore[arg-type]
    )


class SnapshotStore:
    """Write, list, read and prune collection snapshots (blocking: call from a thread)."""

    def __init__(self, objects: ObjectStore, prefix: str = "index-snapshots", keep: int = 2,
                 signing_key: bytes | None = None) -> None:
        self.objects = objects
        self.signing_key = signing_key
        self.prefix = prefix.strip("/")
        self.keep = max(1, keep)

    def key(self, collection_id: int, seq: int) -> str:
        return f"{self.prefix}/{collection_id}/{seq:020d}.snap"

    def list_all(self) -> dict[int, list[int]]:
        """{collection_id: complete snapshot seqs, newest first}."""
        out: dict[int, list[int]] = {}
        for key in self.objects.list_keys(self.prefix):
            parts = key.split("/")
            if len(parts) != 3 or not parts[1].isdigit():
                continue
            m = _NAME.match(parts[2])
            if m:
                out.setdefault(int(parts[1]), []).append(int(m.group(1)))
        return {cid: sorted(seqs, reverse=True) for cid, seqs in out.items()}

    def list_seqs(self, collection_id: int) -> list[int]:
        """Complete snapshot seqs of one collection, newest first."""
        seqs = []
        for key in self.objects.list_keys(f"{self.prefix}/{collection_id}"):
            m = _NAME.match(key.rsplit("/", 1)[-1])
            if m:
                seqs.append(int(m.group(1)))
        return sorted(seqs, reverse=True)

    def write(self, snap: CollectionSnapshot) -> str:
        blob = encode(snap.collection_id, snap.seq, snap.anchor, snap.index, snap.subject_of, self.signing_key)
        return self.write_blob(snap.collection_id, snap.seq, blob)

    def write_blob(self, collection_id: int, seq: int, blob: bytes, floor: int = 0) -> str:
        key = self.key(collection_id, seq)
        self.objects.put_atomic(key, blob)
        self.prune(collection_id, floor)
        return key

    def read(self, collection_id: int, seq: int) -> CollectionSnapshot:
        return decode(self.objects.get(self.key(collection_id, seq)), collection_id=collection_id, seq=seq,
                      signing_key=self.signing_key)

    def load_newest(
        self,
        collection_id: int,
        seqs: list[int] | None = None,
        accept: Callable[[CollectionSnapshot], str | None] | None = None,
    ) -> CollectionSnapshot | None:
        """The newest snapshot that reads back whole and that accept() does not
        reject (accept returns a reason to reject, or None); bad ones are
        skipped with a warning, None when nothing usable is left."""
        for seq in self.list_seqs(collection_id) if seqs is None else seqs:
            try:
                snap = self.read(collection_id, seq)
            except (IndexCorrupt, OSError) as exc:  # OSError: pruned under us, storage blip
                log.warning("skipping index snapshot %s: %s", self.key(collection_id, seq), exc)
                continue
            reason = accept(snap) if accept is not None else None
            if reason is None:
                return snap
            log.warning("skipping index snapshot %s: %s", self.key(collection_id, seq), reason)
        return None

    def prune(self, collection_id: int, floor: int = 0) -> list[str]:
        """Delete all but the newest `keep` snapshots, and temp files older than those;
        and every snapshot below `floor` (the newest erasure in the collection: an
        older snapshot still holds erased vectors), even when fewer remain."""
        keys = self.objects.list_keys(f"{self.prefix}/{collection_id}")
        seqs = sorted((int(m.group(1)) for k in keys if (m := _NAME.match(k.rsplit("/", 1)[-1]))), reverse=True)
        oldest_kept = max(seqs[self.keep - 1] if len(seqs) > self.keep else 0, floor)
        if oldest_kept <= 0:
            return []
        doomed = []
        for k in keys:
            name = k.rsplit("/", 1)[-1]
            m = _NAME.match(name) or _TMP.match(name)
            if m and int(m.group(1)) < oldest_kept:
                doomed.append(k)
        for k in doomed:
            try:
                self.objects.delete(k)
            except OSError as exc:  # another replica pruned it first, or a blip: harmless
                log.warning("could not delete old index snapshot %s: %s", k, exc)
        return doomed


def snapshot_seq_of(key: str) -> int | None:
    """The seq in a snapshot object's name, temporary files included; None
    for anything else."""
    m = _NAME.match(key.rsplit("/", 1)[-1]) or _TMP.match(key.rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None
