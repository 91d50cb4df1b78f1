"""Split one collection's vectors across several ``CollectionIndex`` shards.

An id lives in shard ``id % n_shards``. A search asks every shard for its
own top-k and merges them with faiss.merge_knn_results, so the result equals
an unsharded index's (up to the order of exactly tied scores). The same
merge serves a scatter-gather across matcher replicas (docs/SCALING.md).
"""
from __future__ import annotations

import hashlib

import faiss
import numpy as np

from index.framing import IndexCorrupt

from .collection_index import CollectionIndex
from . import framing

__all__ = ["ShardedIndex"]

_MAGIC = b"FSSHD\x00"
_FORMAT = 1
_MAX_HEADER = 1024 * 1024


class ShardedIndex:
    """``n_shards`` CollectionIndex shards behind the CollectionIndex API."""

    def __init__(self, dim: int, n_shards: int, **index_kwargs: object) -> None:
        if isinstance(n_shards, bool) or not isinstance(n_shards, (int, np.integer)) or n_shards < 1:
            raise ValueError(f"n_shards must be a positive integer, got {n_shards!r}")
        self.n_shards = int(n_shards)
        self.shards = [CollectionIndex(dim, **index_kwargs) for _ in range(self.n_shards)]  # type: ignore[arg-type]
        self.dim = self.shards[0].dim

    @classmethod
    def _from_shards(cls, shards: list[CollectionIndex]) -> ShardedIndex:
        obj = cls.__new__(cls)
        obj.shards = shards
        obj.n_shards = len(shards)
        obj.dim = shards[0].dim
        return obj

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        return CollectionIndex._ids(ids) % self.n_shards

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def __repr__(self) -> str:
        return f"ShardedIndex(dim={self.dim}, n_shards={self.n_shards}, ntotal={len(self)})"

    def train(self, vectors: np.ndarray) -> None:
        for shard in self.shards:
            shard.train(vectors)

    @property
    def nprobe(self) -> int:
        return self.shards[0].nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        for shard in self.shards:
            shard.nprobe = value

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        x = self.shards[0]._vectors(vectors)
        id_arr = CollectionIndex._ids(ids, x.shape[0])
        if np.unique(id_arr).size != id_arr.size:
            raise ValueError("ids within one add() call must be unique")
        route = id_arr % self.n_shards
        for s, shard in enumerate(self.shards):
            mask = route == s
            if mask.any():
                shard.add(id_arr[mask], x[mask])

    def remove(self, ids: np.ndarray) -> int:
        id_arr = CollectionIndex._ids(ids)
        route = id_arr % self.n_shards
        return sum(
            shard.remove(id_arr[route == s]) for s, shard in enumerate(self.shards) if (route == s).any()
        )

    def contains(self, id: int) -> bool:
        if isinstance(id, bool) or not isinstance(id, (int, np.integer)) or id < 0:
            return False
        return self.shards[int(id) % self.n_shards].contains(id)

    def __contains__(self, id: object) -> bool:
        return self.contains(id)  # type: ignore[arg-type]

    def ids(self) -> np.ndarray:
        return np.concatenate([s.ids() for s in self.shards])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        results = [shard.search(queries, k) for shard in self.shards]
        if self.n_shards == 1:
            return results[0]
        # faiss's own k-way merge of per-shard top-k lists (what IndexShards
        # and a scatter-gather across replicas use); padding (-inf, -1) sorts last.
        scores, labels = faiss.merge_knn_results(
            np.stack([r[0] for r in results]), np.stack([r[1] for r in results]), keep_max=True
        )
        labels = labels.astype(np.int64, copy=False)
        scores = np.where(labels < 0, -np.inf, scores).astype(np.float32)  # faiss pads with -FLT_MAX
        return scores, labels

    # ------------------------------------------------------ snapshot/restore
    def snapshot(self, seq: int = 0) -> bytes:
        blobs = [shard.snapshot(seq) for shard in self.shards]
        header = {
            "format": _FORMAT,
            "n_shards": self.n_shards,
            "seq": int(seq),
            "lengths": [len(b) for b in blobs],
            "sha256": [hashlib.sha256(b).hexdigest() for b in blobs],
        }
        return framing.pack(_MAGIC, _FORMAT, header, *blobs)

    @classmethod
    def restore(cls, data: bytes | bytearray | memoryview) -> tuple[ShardedIndex, int]:
        header, body = framing.unpack(
            data, magic=_MAGIC, version=_FORMAT, what="sharded index snapshot", max_header=_MAX_HEADER
        )
        try:
            n_shards = int(header["n_shards"])
            seq = int(header["seq"])
            lengths = [int(n) for n in header["lengths"]]
            digests = [str(d) for d in header["sha256"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise IndexCorrupt(f"sharded snapshot header is unreadable: {exc}") from None
        if n_shards < 1 or len(lengths) != n_shards or len(digests) != n_shards:
            raise IndexCorrupt("sharded snapshot header is inconsistent")
        if len(body) != sum(lengths):
            raise IndexCorrupt("sharded snapshot is truncated or has trailing bytes")
        shards = []
        pos = 0
        for n, digest in zip(lengths, digests):
            blob = body[pos : pos + n]
            if hashlib.sha256(blob).hexdigest() != digest:
                raise IndexCorrupt("sharded snapshot checksum mismatch")
            shard, shard_seq = CollectionIndex.restore(blob)
            if shard_seq != seq:
                raise IndexCorrupt("sharded snapshot shards disagree on seq")
            shards.append(shard)
            pos += n
        if len({s.dim for s in shards}) != 1:
            raise IndexCorrupt("sharded snapshot shards disagree on dim")
        return cls._from_shards(shards), seq
