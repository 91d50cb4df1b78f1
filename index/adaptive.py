"""A collection index whose kind follows its size, rebuilt off the serving path.

``AdaptiveIndex`` serves from one ``CollectionIndex`` at a time. When
``IndexPolicy.rebuild_reason`` says the collection has outgrown it (or shrunk
below it), ``rebuild()`` -- blocking, meant for a background thread --
builds the replacement from the current index's vectors (or a source the
caller gives) while adds, removes and searches go on against the current
one. Mutations made meanwhile are journaled and replayed onto the new index
under the mutation lock, then the reference is swapped: a search holds
whichever index it started on, and every remove that returned before the
search started is in that index. No removed id comes back.
"""
from __future__ import annotations

import threading

import numpy as np


from .collection_index import CollectionIndex
from .policy import BuildReport, IndexPolicy, Source, build_index

__all__ = ["AdaptiveIndex"]

_Op = tuple[str, np.ndarray, np.ndarray | None]


class AdaptiveIndex:
    def __init__(
        self,
        dim: int,
        policy: IndexPolicy | None = None,
        *,
        metric: str = "ip",
        index: CollectionIndex | None = None,
    ) -> None:
        self.policy = policy or IndexPolicy()
        self._current = index if index is not None else CollectionIndex(dim, metric=metric)
        if self._current.dim != dim:
            raise ValueError(f"index has dim {self._current.dim}, expected {dim}")
        self.dim = dim
        self.metric = self._current.metric
        self._mut = threading.Lock()  # serialises mutations with the swap
        self._journal: list[_Op] | None = None  # mutations during a rebuild
        # Size the current index was built (trained) for; a restored one
        # counts as built for what it holds.
        self.built_n = len(self._current)
        self.last_build: BuildReport | None = None

    @classmethod
    def wrap(cls, index: CollectionIndex, policy: IndexPolicy | None = None) -> AdaptiveIndex:
        return cls(index.dim, policy, index=index)

    # ------------------------------------------------------ the current index
    @property
    def current(self) -> CollectionIndex:
        return self._current

    @property
    def kind(self) -> str:
        return self._current.kind

    @property
    def nprobe(self) -> int:
        return self._current.nprobe

    def __len__(self) -> int:
        return len(self._current)

    def __repr__(self) -> str:
        return f"AdaptiveIndex({self._current!r})"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._current.search(queries, k)

    def contains(self, id: int) -> bool:
        return self._current.contains(id)

    def __contains__(self, id: object) -> bool:
        return self._current.contains(id)  # type: ignore[arg-type]

    def ids(self) -> np.ndarray:
        return self._current.ids()

    def get_vectors(self, ids: np.ndarray) -> np.ndarray:
        return self._current.get_vectors(ids)

    def nbytes(self) -> int:
        return self._current.nbytes()

    def snapshot(self, seq: int = 0) -> bytes:
        return self._current.snapshot(seq)

    # -------------------------------------------------------------- mutations
    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        with self._mut:
            cur = self._current
            x = cur._vectors(vectors)
            id_arr = cur._ids(ids, x.shape[0])
            cur.add(id_arr, x)
            if self._journal is not None:
                self._journal.append(("add", id_arr.copy(), x.copy()))

    def remove(self, ids: np.ndarray) -> int:
        with self._mut:
            id_arr = CollectionIndex._ids(ids)
            n = self._current.remove(id_arr)
            if self._journal is not None:
                self._journal.append(("remove", id_arr.copy(), None))
            return n

    # --------------------------------------------------------------- rebuilds
    def rebuild_reason(self) -> str | None:
        return self.policy.rebuild_reason(self.kind, len(self), self.dim, self.built_n)

    @property
    def rebuilding(self) -> bool:
        return self._journal is not None

    def rebuild(self, source: Source | None = None, n: int | None = None, kind: str | None = None) -> BuildReport:
        """Build the index the policy wants for the current size and swap it
        in. Blocking and CPU-heavy: run it in a thread. ``source`` defaults
        to the current index's own vectors (8-bit approximations if it is
        ivfsq8)."""
        with self._mut:
            if self._journal is not None:
                raise ValueError("a rebuild of this index is already running")
            self._journal = []
            base = self._current
        try:
            size = len(base) if n is None else n
            src: Source = source if source is not None else (lambda: base.export())
            kind = kind or self.policy.kind_for(size, self.dim, current=base.kind)
            new, report = build_index(self.dim, src, size, self.policy, metric=self.metric, kind=kind)
            with self._mut:
                for op, ids, x in self._journal:
                    if op == "add":
                        new.add(ids, x)  # type: ignore[arg-type]
                    else:
                        new.remove(ids)
                self._current = new
                self.built_n = report.n
                self.last_build = report
            report.n = len(new)
            return report
        finally:
            with self._mut:
                self._journal = None
