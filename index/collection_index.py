"""One collection's vectors in a FAISS index, importable without Ray.

``CollectionIndex`` keeps (id, vector) pairs for one gallery collection and
answers top-k similarity queries. Two layouts:

* ``kind="flat"`` (default): ``IndexIDMap2(IndexFlatIP)`` -- exact search.
* ``kind="ivf"``: ``IndexIVFFlat``, for large galleries; it must be trained
  (``train``) before vectors are added, and ``nprobe`` trades recall for
  speed.
* ``kind="ivfsq8"``: ``IndexIVFScalarQuantizer`` with 8-bit codes (a quarter
  of IVF-flat's memory), for galleries beyond a memory budget. Stored
  vectors come back (``get_vectors``) only approximately.

Which kind a collection gets, and its nlist/nprobe, is decided by
``index.policy`` (measured recall) and ``index.adaptive`` (rebuilds).

Scores are "higher is better": the inner product for ``metric="ip"`` (the
cosine similarity when vectors are L2-normalised, as our embedders return
them), and the *negated* squared distance for ``metric="l2"``. Rows with
fewer than k hits are padded with id -1 and score -inf.

Ids are non-negative int64 (-1 is the padding sentinel). Adding an id that is
already present replaces its vector. ``snapshot(seq)`` serialises the index
with a small self-describing header carrying the change-log sequence number
the snapshot reflects, so a replica can restore it and replay the log from
there; ``restore`` refuses truncated, tampered or foreign blobs with
``IndexCorrupt``.

Thread-safety: searches run concurrently (FAISS CPU indexes allow concurrent
reads); add/remove/train/nprobe changes take an exclusive lock.
"""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import faiss
import numpy as np

from index.framing import IndexCorrupt

from . import framing

__all__ = ["CollectionIndex", "IVF_KINDS", "KINDS", "SNAPSHOT_FORMAT_VERSION"]

KINDS = ("flat", "ivf", "ivfsq8")
IVF_KINDS = ("ivf", "ivfsq8")
METRICS = ("ip", "l2")

# Snapshot layout: MAGIC | uint16 version | uint32 header length | JSON header | faiss bytes
_MAGIC = b"FSIDX\x00"
SNAPSHOT_FORMAT_VERSION = 1
_MAX_HEADER = 64 * 1024


class _RWLock:
    """Many readers or one writer; a waiting writer blocks new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class CollectionIndex:
    """Top-k similarity search over one collection's vectors."""

    def __init__(
        self,
        dim: int,
        metric: str = "ip",
        kind: str = "flat",
        nlist: int = 256,
        nprobe: int = 16,
    ) -> None:
        self.dim = _check_positive_int("dim", dim)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.metric = metric
        self.kind = kind
        self.nlist = _check_positive_int("nlist", nlist)
        self._nprobe = _check_positive_int("nprobe", nprobe)
        self._lock = _RWLock()
        self._index = self._build()

    # ------------------------------------------------------------ construction
    def _faiss_metric(self) -> int:
        return faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2

    def _build(self) -> faiss.Index:
        if self.kind == "flat":
            flat = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
            return faiss.IndexIDMap2(flat)
        quantizer = faiss.IndexFlatIP(self.dim) if self.metric == "ip" else faiss.IndexFlatL2(self.dim)
        if self.kind == "ivf":
            ivf = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, self._faiss_metric())
        else:
            ivf = faiss.IndexIVFScalarQuantizer(
                quantizer, self.dim, self.nlist, faiss.ScalarQuantizer.QT_8bit, self._faiss_metric()
            )
        # (faiss's Python wrapper keeps the quantizer alive with the index)
        # A hash-table direct map gives O(1) per-id remove and lookup.
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        ivf.nprobe = min(self._nprobe, self.nlist)
        return ivf

    # ------------------------------------------------------------- validation
    def _vectors(self, vectors: object, what: str = "vectors") -> np.ndarray:
        arr = np.asarray(vectors)
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise ValueError(
                f"{what} must have shape (n, {self.dim}), got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{what} must be floating point, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"{what} contain NaN or infinite values")
        return arr

    @staticmethod
    def _ids(ids: object, n: int | None = None) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim == 0:
            arr = arr.reshape(1)
        if arr.ndim != 1:
            raise ValueError(f"ids must be one-dimensional, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
        if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
            raise ValueError("ids must fit in int64")
        arr = np.ascontiguousarray(arr, dtype=np.int64)
        if arr.size and arr.min() < 0:
            raise ValueError("ids must be non-negative (-1 marks an empty result slot)")
        if n is not None and arr.shape[0] != n:
            raise ValueError(
                f"got {arr.shape[0]} ids for {n} vectors")
        return arr

    # ------------------------------------------------------------- properties
    @property
    def nprobe(self) -> int:
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        value = _check_positive_int("nprobe", value)
        with self._lock.write():
            self._nprobe = value
            if self.kind in IVF_KINDS:
                self._index.nprobe = min(value, self.nlist)

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __repr__(self) -> str:
        extra = f", nlist={self.nlist}, nprobe={self._nprobe}" if self.kind in IVF_KINDS else ""
        return (
            f"CollectionIndex(dim={self.dim}, metric={self.metric!r}, kind={self.kind!r}"
            f"{extra}, ntotal={len(self)})"
        )

    # -------------------------------------------------------------- mutations
    def train(self, vectors: np.ndarray) -> None:
        """Train the IVF coarse quantizer (a no-op for the flat kind).

        Needs at least ``nlist`` vectors; FAISS wants ~39 per list for good
        centroids. Training again after vectors were added is refused.
        """
        x = self._vectors(vectors)
        if self.kind == "flat":
            return
        if x.shape[0] < self.nlist:
            raise ValueError(
                f"IVF training needs at least nlist={self.nlist} vectors, got {x.shape[0]}"
            )
        with self._lock.write():
            if self._index.ntotal:
                raise ValueError("cannot retrain an IVF index that already holds vectors")
            self._index.train(x)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under ``ids``; an id already present has its vector replaced."""
        x = self._vectors(vectors)
        id_arr = self._ids(ids, x.shape[0])
        if id_arr.size == 0:
            return
        if np.unique(id_arr).size != id_arr.size:
            raise ValueError("ids within one add() call must be unique")
        if not self._index.is_trained:
            raise ValueError("IVF index is not trained: call train() before add()")
        with self._lock.write():
            if self._index.ntotal:
                self._remove_locked(id_arr)
            self._index.add_with_ids(x, id_arr)

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids``; absent ids are ignored. Returns how many were removed."""
        id_arr = self._ids(ids)
        if id_arr.size == 0:
            return 0
        with self._lock.write():
            if not self._index.ntotal:
                return 0
            return self._remove_locked(np.unique(id_arr))

    def _remove_locked(self, id_arr: np.ndarray) -> int:
        if self.kind in IVF_KINDS:
            # The hash-table direct map only accepts an explicit id array.
            selector = faiss.IDSelectorArray(id_arr)
        else:
            selector = faiss.IDSelectorBatch(id_arr)
        return int(self._index.remove_ids(selector))

    def clear(self) -> None:
        """Drop every vector (an IVF index keeps its training)."""
        with self._lock.write():
            self._index.reset()

    # ---------------------------------------------------------------- queries
    def contains(self, id: int) -> bool:
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)) or id < 0:
            return False
        with self._lock.read():
            if not self._index.ntotal:
                return False
            try:
                self._index.reconstruct(int(id))
            except RuntimeError:  # FAISS reports an unknown id this way
                return False
            return True

    def __contains__(self, id: object) -> bool:
        return self.contains(id)  # type: ignore[arg-type]

    def ids(self) -> np.ndarray:
        """All ids in the index (int64; storage order, not sorted)."""
        with self._lock.read():
            if self.kind == "flat":
                return faiss.vector_to_array(self._index.id_map).astype(np.int64, copy=False)
            invlists = self._index.invlists
            parts = []
            for list_no in range(self._index.nlist):
                size = invlists.list_size(list_no)
                if size:
                    ptr = invlists.get_ids(list_no)
                    parts.append(faiss.rev_swig_ptr(ptr, size).copy())
                    invlists.release_ids(list_no, ptr)
            return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def get_vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors for ``ids`` (raises ValueError for an unknown id)."""
        id_arr = self._ids(ids)
        out = np.empty((id_arr.size, self.dim), dtype=np.float32)
        with self._lock.read():
            for row, i in enumerate(id_arr):
                try:
                    out[row] = self._index.reconstruct(int(i))
                except RuntimeError:
                    raise ValueError(f"id {int(i)} is not in the index") from None
        return out

    def export(self, chunk: int = 20_000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every (ids, vectors) pair in chunks, each chunk read under the read
        lock; ids removed while the export runs are skipped. Vectors of the
        ivfsq8 kind are its 8-bit reconstructions."""
        all_ids = self.ids()
        for start in range(0, all_ids.size, chunk):
            part = all_ids[start : start + chunk]
            with self._lock.read():
                try:
                    vecs = self._index.reconstruct_batch(part)
                except RuntimeError:  # some id went away: take the ones still here
                    keep, rows = [], []
                    for i in part.tolist():
                        try:
                            rows.append(self._index.reconstruct(i))
                        except RuntimeError:
                            continue
                        keep.append(i)
                    part = np.array(keep, dtype=np.int64)
                    vecs = np.stack(rows) if rows else np.empty((0, self.dim), np.float32)
            if part.size:
                yield part, np.asarray(vecs, dtype=np.float32).reshape(-1, self.dim)

    def nbytes(self) -> int:
        """Estimated memory of the index: vectors or codes, ids, centroids and
        the id lookup (faiss's hash-table direct map, ~40 bytes per id)."""
        n = len(self)
        if self.kind == "flat":
            return n * (4 * self.dim + 8)
        code = self._index.code_size
        return n * (code + 8 + 40) + self.nlist * 4 * self.dim

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` per query: ``(scores (m,k) float32, ids (m,k) int64)``, best first.

        Slots beyond the number of stored vectors hold id -1 and score -inf.
        """
        q = self._vectors(queries, "queries")
        k = _check_positive_int("k", k)
        m = q.shape[0]
        scores = np.full((m, k), -np.inf, dtype=np.float32)
        labels = np.full((m, k), -1, dtype=np.int64)
        if m == 0:
            return scores, labels
        with self._lock.read():
            ntotal = int(self._index.ntotal)
            if ntotal == 0:
                return scores, labels
            kk = min(k, ntotal)
            dist, found = self._index.search(q, kk)
        valid = found >= 0
        if self.metric == "l2":
            dist = -dist
        scores[:, :kk] = np.where(valid, dist, -np.inf)
        labels[:, :kk] = np.where(valid, found, -1)
        return scores, labels

    # ------------------------------------------------------ snapshot/restore
    def snapshot(self, seq: int = 0) -> bytes:
        """Serialise the index with a header recording ``seq``.

        ``seq`` is the change-log sequence number this index reflects (every
        change up to and including it is applied). 0 means "replay from the
        start"; replaying is idempotent since re-adding replaces.
        """
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or seq < 0:
            raise ValueError(f"seq must be a non-negative integer, got {seq!r}")
        with self._lock.read():
            payload = faiss.serialize_index(self._index).tobytes()
            ntotal = int(self._index.ntotal)
        header = {
            "format": SNAPSHOT_FORMAT_VERSION,
            "dim": self.dim,
            "metric": self.metric,
            "kind": self.kind,
            "nlist": self.nlist,
            "nprobe": self._nprobe,
            "ntotal": ntotal,
            "seq": int(seq),
            "payload_len": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
        }
        return framing.pack(_MAGIC, SNAPSHOT_FORMAT_VERSION, header, payload)

    @classmethod
    def read_snapshot_header(cls, data: bytes | bytearray | memoryview) -> dict:
        """The validated header of a snapshot blob (cheap: does not load the index)."""
        header, _ = cls._split(data)
        return header

    @staticmethod
    def _split(data: bytes | bytearray | memoryview) -> tuple[dict, memoryview]:
        header, payload = framing.unpack(
            data, magic=_MAGIC, version=SNAPSHOT_FORMAT_VERSION, what="index snapshot",
            max_header=_MAX_HEADER,
        )
        required = {
            "format": int, "dim": int, "metric": str, "kind": str, "nlist": int, "nprobe": int,
            "ntotal": int, "seq": int, "payload_len": int, "payload_sha256": str,
        }
        for key, typ in required.items():
            if not isinstance(header.get(key), typ) or isinstance(header.get(key), bool):
                raise IndexCorrupt(f"index snapshot header lacks a valid {key!r}")
        if header["format"] != SNAPSHOT_FORMAT_VERSION:
            raise IndexCorrupt("index snapshot header disagrees with its format version")
        if header["kind"] not in KINDS or header["metric"] not in METRICS:
            raise IndexCorrupt(
                f"index snapshot has unknown kind/metric {header['kind']!r}/{header['metric']!r}"
            )
        if header["dim"] < 1 or header["nlist"] < 1 or header["nprobe"] < 1 or header["seq"] < 0:
            raise IndexCorrupt("index snapshot header has out-of-range values")
        if len(payload) != header["payload_len"]:
            raise IndexCorrupt(
                f"index snapshot payload is {len(payload)} bytes, header says {header['payload_len']}"
            )
        if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
            raise IndexCorrupt("index snapshot checksum mismatch")
        return header, payload

    @classmethod
    def restore(cls, data: bytes | bytearray | memoryview) -> tuple[CollectionIndex, int]:
        """Rebuild an index from ``snapshot()`` bytes; returns ``(index, seq)``."""
        header, payload = cls._split(data)
        try:
            index = faiss.deserialize_index(np.frombuffer(payload, dtype=np.uint8))
        except Exception as exc:  # FAISS raises RuntimeError on malformed bytes
            raise IndexCorrupt(f"index snapshot payload does not deserialise: {exc}") from None
        return cls._adopt(index, header), header["seq"]

    # ------------------------------------------------ streamed snapshot parts
    # For snapshots written straight to a stream (serve_app.gallery.index_snapshots):
    # the faiss index goes through faiss's own writer/reader in bs-byte pieces,
    # so no serialised copy of the whole index is ever held in memory.
    @contextmanager
    def frozen(self) -> Iterator[None]:
        """No mutation until the block ends; the *_locked calls below need it."""
        with self._lock.read():
            yield

    def meta_locked(self) -> dict:
        return {"dim": self.dim, "metric": self.metric, "kind": self.kind, "nlist": self.nlist,
                "nprobe": self._nprobe, "ntotal": int(self._index.ntotal)}

    def write_faiss_locked(self, write: Callable[[bytes], object], bs: int = 1 << 20) -> None:
        """faiss's own serialisation, handed to ``write`` in pieces of at most bs bytes."""
        faiss.write_index(self._index, faiss.PyCallbackIOWriter(write, bs))

    def iter_ids_locked(self, chunk: int = 65536) -> Iterator[np.ndarray]:
        """The ids in storage order, ``chunk`` at a time, without copying them all."""
        if self.kind == "flat":
            n = int(self._index.ntotal)
            if n:
                view = faiss.rev_swig_ptr(self._index.id_map.data(), n)
                for start in range(0, n, chunk):
                    yield np.array(view[start : start + chunk], dtype=np.int64)
            return
        invlists = self._index.invlists
        for list_no in range(self._index.nlist):
            size = invlists.list_size(list_no)
            if size:
                ptr = invlists.get_ids(list_no)
                try:
                    yield faiss.rev_swig_ptr(ptr, size).astype(np.int64, copy=True)
                finally:
                    invlists.release_ids(list_no, ptr)

    @classmethod
    def read_faiss(cls, read: Callable[[int], bytes], meta: dict, bs: int = 1 << 20) -> CollectionIndex:
        """Rebuild an index from faiss bytes pulled through ``read`` (which returns at
        most the n bytes asked for); ``meta`` is meta_locked() of the writer, checked
        against what faiss reads."""
        for key, typ in {"dim": int, "metric": str, "kind": str, "nlist": int, "nprobe": int,
                         "ntotal": int}.items():
            if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
                raise IndexCorrupt(f"index snapshot header lacks a valid {key!r}")
        if meta["kind"] not in KINDS or meta["metric"] not in METRICS:
            raise IndexCorrupt(f"index snapshot has unknown kind/metric {meta['kind']!r}/{meta['metric']!r}")
        if meta["dim"] < 1 or meta["nlist"] < 1 or meta["nprobe"] < 1 or meta["ntotal"] < 0:
            raise IndexCorrupt("index snapshot header has out-of-range values")
        try:
            index = faiss.read_index(faiss.PyCallbackIOReader(read, bs))
        except IndexCorrupt:
            raise
        except Exception as exc:  # FAISS raises RuntimeError on malformed or short input
            raise IndexCorrupt(f"index snapshot payload does not deserialise: {exc}") from None
        return cls._adopt(index, meta)

    @classmethod
    def _adopt(cls, index: faiss.Index, header: dict) -> CollectionIndex:
        expected = {
            "flat": faiss.IndexIDMap2, "ivf": faiss.IndexIVFFlat, "ivfsq8": faiss.IndexIVFScalarQuantizer,
        }[header["kind"]]
        if not isinstance(index, expected):
            raise IndexCorrupt(
                f"index snapshot holds a {type(index).__name__}, expected {expected.__name__}"
            )
        metric = faiss.METRIC_INNER_PRODUCT if header["metric"] == "ip" else faiss.METRIC_L2
        if index.d != header["dim"] or index.metric_type != metric or index.ntotal != header["ntotal"]:
            raise IndexCorrupt("index snapshot payload disagrees with its header (dim/metric/ntotal)")
        if header["kind"] in IVF_KINDS:
            if index.nlist != header["nlist"]:
                raise IndexCorrupt("index snapshot payload disagrees with its header (nlist)")
            if index.direct_map.type != faiss.DirectMap.Hashtable:
                index.set_direct_map_type(faiss.DirectMap.Hashtable)
        obj = cls.__new__(cls)
        obj.dim = header["dim"]
        obj.metric = header["metric"]
        obj.kind = header["kind"]
        obj.nlist = header["nlist"]
        obj._nprobe = header["nprobe"]
        obj._lock = _RWLock()
        obj._index = index
        if obj.kind in IVF_KINDS:
            index.nprobe = min(obj._nprobe, obj.nlist)
        return obj
