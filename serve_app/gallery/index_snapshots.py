"""Per-collection index snapshots in object storage, streamed in bounded memory.

One object per snapshot, ``index-snapshots/<collection_id>/<seq:020d>.snap``
(a matcher shard's under ``.../<collection_id>/shard-<s>-of-<n>/``), written (format 2) as an ``index.streaming`` frame stream:

    MAGIC | uint16 format | uint32 header length | JSON header | frames
    payload = faiss index (faiss's own writer) | per face: id (int64 LE) + subject uuid (16 B)

The header names the collection, the seq, the change-log entry at that seq
(the *anchor*, so a snapshot left behind by another database is recognised
as foreign), the face count and the index's kind/dim/metric. Every 1 MiB
frame carries a sha256 chain digest over the header and all bytes before it
and, with a snapshot key, an HMAC of that digest: a reader verifies each
frame before faiss or the mapping parser sees its bytes, and refuses a
tampered, reordered, truncated or unsigned stream with IndexCorrupt. Index
and mapping travel in one object, so they always come from the same seq.

Neither side holds the serialised snapshot: the writer streams faiss's
output through frames into ``ObjectStore.open_write_atomic`` (a temp file
renamed into place, or an S3 multipart upload completed only on success),
the reader pulls frames from ``ObjectStore.open_read`` into faiss's reader.
Extra memory is a few MiB (a frame, the S3 part buffer, a batch of the
mapping) beyond the index and the id->subject map themselves.

Format 1 (one blob: header with body length and sha256/HMAC, then the body)
is still read, whole, so snapshots written before format 2 stay usable.
The newest ``keep`` snapshots per collection are kept, older ones deleted.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import posixpath
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np

from index import framing, streaming
from index.collection_index import CollectionIndex
from index.framing import IndexCorrupt

from .objects import ObjectStore
from .shards import WHOLE, Shard

log = logging.getLogger(__name__)

_MAGIC = b"FSCSNAP\x00"
FORMAT_VERSION = 2  # streamed frames; 1 (one blob) is still read
FORMAT_V1 = 1
_BATCH = 65536  # faces per mapping batch (1.5 MiB)
_MAPPING = np.dtype([("id", "<i8"), ("subject", "V16")])
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


def encode_v1(
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
        "format": FORMAT_V1,
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
    return framing.pack(_MAGIC, FORMAT_V1, header, body)


def _sign(key: bytes, header: dict) -> str:
    fields = {k: v for k, v in header.items() if k != "hmac"}
    return hmac.new(key, json.dumps(fields, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def decode_v1(data: bytes, *, collection_id: int | None = None, seq: int | None = None,
              signing_key: bytes | None = None) -> CollectionSnapshot:
    """Parse and fully validate a format-1 blob; IndexCorrupt for anything not whole and ours
    (with a signing key: anything not signed with it)."""
    header, body = framing.unpack(
        data, magic=_MAGIC, version=FORMAT_V1, what="collection snapshot", max_header=_MAX_HEADER
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


def write_stream(
    out: BinaryIO,
    collection_id: int,
    seq: int,
    anchor: Anchor | None,
    index: CollectionIndex,
    subject_of: dict[int, uuid.UUID],
    signing_key: bytes | None = None,
    frame_size: int = streaming.FRAME_SIZE,
) -> int:
    """Stream one collection's snapshot into ``out``; returns the bytes written.
    subject_of must cover every id in index. The index takes no mutation
    while this runs (its read lock is held: searches go on)."""
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValueError(f"seq must be a non-negative integer, got {seq!r}")
    with index.frozen():
        meta = index.meta_locked()
        header = {
            "format": FORMAT_VERSION,
            "collection_id": int(collection_id),
            "seq": int(seq),
            "anchor": list(anchor) if anchor is not None else None,
            "faces": meta["ntotal"],
            "index": meta,
        }
        w = streaming.FrameWriter(out, _MAGIC, FORMAT_VERSION, header, signing_key, frame_size)
        index.write_faiss_locked(w.write, frame_size)
        faces = 0
        for ids in index.iter_ids_locked(_BATCH):
            rec = np.empty(ids.size, _MAPPING)
            rec["id"] = ids
            rec["subject"] = np.frombuffer(b"".join(subject_of[f].bytes for f in ids.tolist()), "V16")
            w.write(rec.tobytes())
            faces += ids.size
        if faces != meta["ntotal"]:
            raise RuntimeError("index changed while its snapshot was written")
        w.finish()
    return w.total_len


def read_stream(src: BinaryIO, *, collection_id: int | None = None, seq: int | None = None,
                signing_key: bytes | None = None) -> CollectionSnapshot:
    """Read and fully validate one snapshot from ``src`` (format 2 streamed,
    format 1 whole); IndexCorrupt for anything not whole and ours (with a
    signing key: anything not signed with it)."""
    version, prefix = streaming.read_prefix(src, _MAGIC, "collection snapshot")
    if version == FORMAT_V1:
        return decode_v1(prefix + src.read(), collection_id=collection_id, seq=seq, signing_key=signing_key)
    r = streaming.FrameReader(src, _MAGIC, FORMAT_VERSION, "collection snapshot", signing_key,
                              _MAX_HEADER, prefix=prefix)
    header = r.header
    for key in ("collection_id", "seq", "faces"):
        if not isinstance(header.get(key), int) or isinstance(header[key], bool) or header[key] < 0:
            raise IndexCorrupt(f"collection snapshot header lacks a valid {key!r}")
    if not isinstance(header.get("index"), dict) or header["index"].get("ntotal") != header["faces"]:
        raise IndexCorrupt("collection snapshot header lacks a valid 'index'")
    if collection_id is not None and header["collection_id"] != collection_id:
        raise IndexCorrupt(f"snapshot is for collection {header['collection_id']}, expected {collection_id}")
    if seq is not None and header["seq"] != seq:
        raise IndexCorrupt(f"snapshot header says seq {header['seq']}, its name says {seq}")
    failure: list[BaseException] = []

    def pull(n: int) -> bytes:  # faiss swallows the exception's type: keep it
        try:
            return r.read(n)
        except IndexCorrupt as exc:
            failure.append(exc)
            raise

    try:
        index = CollectionIndex.read_faiss(pull, header["index"])
    except IndexCorrupt:
        if failure:
            raise failure[0] from None
        raise
    n = header["faces"]
    interned: dict[bytes, uuid.UUID] = {}  # many faces share a subject: one object each
    subject_of: dict[int, uuid.UUID] = {}
    with index.frozen():
        for expected in index.iter_ids_locked(_BATCH):
            rec = np.frombuffer(r.read_exact(expected.size * _MAPPING.itemsize, "face mapping"), _MAPPING)
            if not np.array_equal(rec["id"], expected):
                raise IndexCorrupt("collection snapshot mapping disagrees with its index")
            for fid, raw in zip(rec["id"].tolist(), rec["subject"].tolist()):
                sub = interned.get(raw)
                if sub is None:
                    sub = interned[raw] = uuid.UUID(bytes=bytes(raw))
                subject_of[fid] = sub
    r.finish()
    if len(subject_of) != n:
        raise IndexCorrupt("collection snapshot mapping does not match its face count")
    anchor = header.get("anchor")
    return CollectionSnapshot(
        header["collection_id"], header["seq"], index, subject_of,
        tuple(anchor) if isinstance(anchor, list) else None,  # type: ignore[arg-type]
    )


def encode(collection_id: int, seq: int, anchor: Anchor | None, index: CollectionIndex,
           subject_of: dict[int, uuid.UUID], signing_key: bytes | None = None) -> bytes:
    """write_stream into memory (tests, small collections)."""
    buf = io.BytesIO()
    write_stream(buf, collection_id, seq, anchor, index, subject_of, signing_key)
    return buf.getvalue()


def decode(data: bytes, *, collection_id: int | None = None, seq: int | None = None,
           signing_key: bytes | None = None) -> CollectionSnapshot:
    """read_stream from bytes (either format)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise IndexCorrupt(f"collection snapshot must be bytes, got {type(data).__name__}")
    return read_stream(io.BytesIO(data), collection_id=collection_id, seq=seq, signing_key=signing_key)


def payload_of(data: bytes) -> bytes:
    """A snapshot object's payload, frames joined, unchecked (for byte scans;
    format 1 and anything else unchanged)."""
    return streaming.payload_of(data, _MAGIC, FORMAT_VERSION)


class SnapshotStore:
    """Write, list, read and prune collection snapshots (blocking: call from a thread).

    A matcher shard (serve_app/gallery/shards.py) keeps its snapshots apart:
    ``<prefix>/<collection_id>/shard-<s>-of-<n>/<seq>.snap``, so shards (and
    unsharded replicas, which use ``<prefix>/<collection_id>/<seq>.snap``)
    never list, restore or prune each other's. Everything of a collection
    stays under ``<prefix>/<collection_id>/``, which its erasures sweep."""

    def __init__(self, objects: ObjectStore, prefix: str = "index-snapshots", keep: int = 2,
                 signing_key: bytes | None = None, shard: Shard = WHOLE) -> None:
        self.objects = objects
        self.signing_key = signing_key
        self.prefix = prefix.strip("/")
        self.keep = max(1, keep)
        self.shard = shard

    def _dir(self, collection_id: int, shard: Shard | None = None) -> str:
        shard = self.shard if shard is None else shard
        base = f"{self.prefix}/{collection_id}"
        return base if shard.whole else f"{base}/{shard.label}"

    def key(self, collection_id: int, seq: int) -> str:
        return f"{self._dir(collection_id)}/{seq:020d}.snap"

    def _own_keys(self, collection_id: int) -> list[str]:
        """Keys directly in this shard's directory of the collection (not the
        shard directories below an unsharded one)."""
        base = self._dir(collection_id)
        return [k for k in self.objects.list_keys(base) if posixpath.dirname(k) == base]

    def list_all(self) -> dict[int, list[int]]:
        """{collection_id: complete snapshot seqs of this shard, newest first}."""
        return self.list_every_shard().get(self.shard.index, {})

    def list_every_shard(self) -> dict[int, dict[int, list[int]]]:
        """{shard index: {collection_id: seqs, newest first}} for every shard of
        this store's shard count (one listing): pruning the change log must
        keep what the oldest of them still replays."""
        out: dict[int, dict[int, list[int]]] = {}
        labels = {Shard(s, self.shard.count).label: s for s in range(self.shard.count)}
        for key in self.objects.list_keys(self.prefix):
            parts = key.split("/")
            if self.shard.whole:
                if len(parts) != 3 or not parts[1].isdigit():
                    continue
                s = 0
            else:
                if len(parts) != 4 or not parts[1].isdigit() or parts[2] not in labels:
                    continue
                s = labels[parts[2]]
            m = _NAME.match(parts[-1])
            if m:
                out.setdefault(s, {}).setdefault(int(parts[1]), []).append(int(m.group(1)))
        return {s: {cid: sorted(seqs, reverse=True) for cid, seqs in by.items()} for s, by in out.items()}

    def list_seqs(self, collection_id: int) -> list[int]:
        """Complete snapshot seqs of one collection (this shard's), newest first."""
        seqs = []
        for key in self._own_keys(collection_id):
            m = _NAME.match(key.rsplit("/", 1)[-1])
            if m:
                seqs.append(int(m.group(1)))
        return sorted(seqs, reverse=True)

    def write(self, snap: CollectionSnapshot, floor: int = 0) -> str:
        return self.write_streamed(snap.collection_id, snap.seq, snap.anchor, snap.index, snap.subject_of,
                                   floor)[0]

    def write_streamed(self, collection_id: int, seq: int, anchor: Anchor | None, index: CollectionIndex,
                       subject_of: dict[int, uuid.UUID], floor: int = 0) -> tuple[str, int]:
        """Stream a snapshot into place, then prune; (key, bytes written)."""
        key = self.key(collection_id, seq)
        with self.objects.open_write_atomic(key) as out:
            size = write_stream(out, collection_id, seq, anchor, index, subject_of, self.signing_key)
        self.prune(collection_id, floor)
        return key, size

    def read(self, collection_id: int, seq: int) -> CollectionSnapshot:
        with self.objects.open_read(self.key(collection_id, seq)) as src:
            return read_stream(src, collection_id=collection_id, seq=seq, signing_key=self.signing_key)

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
        keys = self._own_keys(collection_id)
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
