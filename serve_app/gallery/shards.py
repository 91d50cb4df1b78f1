"""Matcher shards: which faces a shard holds, and merging the shards' answers.

A gallery too large for one matcher replica is split over `count` Matcher
deployments (serve_app/graph.py): shard `index` holds the faces with
``face_id % count == index`` of every collection, and follows the whole
change log for everything else (subjects' names, "not this person" probes,
collections, model switches), which is small. An identify asks every shard
(serve_app/pipeline_client.py) and merges their answers here, importable
without Ray.

Why the merge equals an unsharded search: each shard answers its top-k
subjects per probe, each subject at its best face among the shard's faces.
A subject's best face overall lies in some shard, and every subject that
outranks it there outranks it overall too, so a subject in the overall top k
is in that shard's top k. Taking, per subject, its best hit over the shards
and then the k best subjects gives the unsharded answer (up to the order of
exactly tied scores). The per-shard lists are already sorted, so faiss's own
k-way merge (merge_knn_results, keep_max) orders them; the walk then keeps
each subject's first (best) hit.
"""
from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from serve_app.messages import Hit, MatchResult


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0 <= index < count)."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"shard count must be a positive integer, got {self.count!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise ValueError(f"shard index must be in [0, {self.count}), got {self.index!r}")

    @property
    def whole(self) -> bool:
        """One shard: every face (today's single Matcher)."""
        return self.count == 1

    def owns(self, face_id: int) -> bool:
        return self.count == 1 or face_id % self.count == self.index

    def owned(self, face_ids: np.ndarray) -> np.ndarray:
        """Boolean mask of the ids this shard holds."""
        ids = np.asarray(face_ids, dtype=np.int64)
        if self.count == 1:
            return np.ones(ids.shape, dtype=bool)
        return ids % self.count == self.index

    @property
    def label(self) -> str:
        """Its name in object keys and logs: ``shard-<index>-of-<count>``."""
        return f"shard-{self.index}-of-{self.count}"

    @property
    def deployment(self) -> str:
        """Its Serve deployment: ``Matcher`` when whole, else ``Matcher-<index>``."""
        return "Matcher" if self.count == 1 else f"Matcher-{self.index}"


WHOLE = Shard()


def merge_hits(per_shard: list[list[Hit]], k: int) -> list[Hit]:
    """One probe face: the k best subjects over every shard's hits (each list
    best first, one hit per subject), each subject at its best score."""
    lists = [hits for hits in per_shard if hits]
    if not lists:
        return []
    if len(lists) == 1:
        return list(lists[0][:k])
    # merge_knn_results keeps as many entries as one input row is wide: pad
    # every row to the total, so nothing is cut before subjects are deduplicated
    # ((-inf, -1) sorts last and is skipped below).
    width = sum(len(h) for h in lists)
    scores = np.full((len(lists), 1, width), -np.inf, dtype=np.float32)
    labels = np.full((len(lists), 1, width), -1, dtype=np.int64)
    flat: list[Hit] = []
    for s, hits in enumerate(lists):
        for j, hit in enumerate(hits):
            scores[s, 0, j] = hit.similarity
            labels[s, 0, j] = len(flat)
            flat.append(hit)
    _, order = faiss.merge_knn_results(scores, labels, keep_max=True)
    seen: set[str] = set()
    out: list[Hit] = []
    for label in order[0]:
        if label < 0:
            break
        hit = flat[int(label)]
        if hit.subject_id in seen:
            continue
        seen.add(hit.subject_id)
        out.append(hit)
        if len(out) == k:
            break
    return out


def merge_results(results: list[MatchResult], k: int) -> MatchResult:
    """The shards' answers to one search as one answer: per probe face the k
    best subjects (merge_hits); its seq is the lowest any shard searched at
    (what every shard reflects); the search time is the slowest shard's."""
    if not results:
        raise ValueError("no shard answered")
    if len(results) == 1:
        return results[0]
    faces = {len(r.hits) for r in results}
    if len(faces) != 1:
        raise ValueError(f"shards answered for different numbers of probe faces: {sorted(faces)}")
    hits = [merge_hits([r.hits[i] for r in results], k) for i in range(faces.pop())]
    timings: dict[str, float] = {}
    for r in results:
        for stage, ms in r.timings_ms.items():
            timings[stage] = max(timings.get(stage, 0.0), ms)
    return MatchResult(hits=hits, seq=min(r.seq for r in results), timings_ms=timings)
