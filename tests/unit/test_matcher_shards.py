"""Matcher shards without Ray or servers: which faces a shard's GalleryIndex
applies, the merge of the shards' answers (== an unsharded search), shard
snapshot keys, and the serve config a sharded app deploys with."""
from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from serve_app.gallery.gallery_index import GalleryIndex
from serve_app.gallery.index_snapshots import SnapshotStore, snapshot_seq_of
from serve_app.gallery.objects import ObjectStore
from serve_app.gallery.repository import Change
from serve_app.gallery.shards import WHOLE, Shard, merge_hits, merge_results
from serve_app.messages import Hit, MatchResult

DIM = 16
CID = 3


def _gallery(shard: Shard = WHOLE, snapshots: SnapshotStore | None = None) -> GalleryIndex:
    # apply() and search() touch no database: a repository with no pool will do.
    return GalleryIndex(SimpleNamespace(pool=None), snapshots, shard=shard)  # type: ignore[arg-type]


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _log(rng: np.random.Generator, subjects: int, faces_per: int, first_id: int = 1) -> tuple[list[Change], list[uuid.UUID]]:
    """Adds with consecutive face ids, so every subject's faces fall in several shards."""
    changes, subs = [], []
    fid, seq = first_id, 0
    for i in range(subjects):
        sub = uuid.UUID(int=i + 1)
        subs.append(sub)
        for v in _unit(rng, faces_per):
            seq += 1
            changes.append(Change(seq, CID, "add", fid, sub, v, f"name-{i}"))
            fid += 1
    return changes, subs


def _sharded(changes: list[Change], n: int) -> list[GalleryIndex]:
    shards = [_gallery(Shard(s, n)) for s in range(n)]
    for g in shards:
        g.apply(changes)
    return shards


def _merged(shards: list[GalleryIndex], q: np.ndarray, k: int, fb: float | None = None) -> MatchResult:
    return merge_results([MatchResult(g.search(CID, q, k, fb), seq=10 + i) for i, g in enumerate(shards)], k)


def _canon(hits: list[Hit], *, face: bool = True) -> list[tuple]:
    """Order-insensitive among (nearly) equal scores: sims to 5 places."""
    return sorted((-round(h.similarity, 5), h.subject_id, h.name, h.demoted, h.face_id if face else 0) for h in hits)


# ------------------------------------------------------------------- shards
def test_shard_validates_and_names() -> None:
    assert WHOLE.whole and WHOLE.owns(7) and WHOLE.deployment == "Matcher"
    s = Shard(1, 3)
    assert s.label == "shard-1-of-3" and s.deployment == "Matcher-1"
    assert [f for f in range(9) if s.owns(f)] == [1, 4, 7]
    assert s.owned(np.arange(6)).tolist() == [False, True, False, False, True, False]
    for bad in ((3, 3), (-1, 2), (0, 0), (True, 2), (0, 1.5)):
        with pytest.raises(ValueError):
            Shard(*bad)  # type: ignore[arg-type]


def test_a_shard_applies_only_its_own_faces_but_every_name() -> None:
    rng = np.random.default_rng(0)
    changes, subs = _log(rng, subjects=5, faces_per=3)
    whole = _gallery()
    whole.apply(changes)
    shards = _sharded(changes, 2)
    for s, g in enumerate(shards):
        held = sorted(g.indexes[CID].ids().tolist())
        assert held == [f for f in sorted(whole.subject_of) if f % 2 == s]
        assert sorted(g.subject_of) == held
        assert g.names == whole.names  # names of subjects whose faces are all elsewhere too
    assert sum(len(g.indexes[CID]) for g in shards) == len(whole.indexes[CID])
    # A face of shard 1 removed, then a subject deleted (name None): shard 0
    # keeps its faces, forgets the name, and counts the erasure (its snapshots
    # go with the sweep of the collection).
    seq = changes[-1].seq
    gone = [Change(seq + 1, CID, "remove", 1, subs[0], None, "name-0"),
            Change(seq + 2, CID, "remove", 4, subs[1], None, None)]
    for g in (*shards, whole):
        g.apply(gone)
    assert 1 not in shards[1].subject_of and 4 not in shards[0].subject_of
    assert subs[1] not in shards[0].names and subs[1] not in shards[1].names
    assert shards[0].erased[CID] == seq + 2 and shards[1].erased[CID] == seq + 2
    assert sorted(shards[0].subject_of) + sorted(shards[1].subject_of) == sorted(
        f for f in whole.subject_of if f % 2 == 0) + sorted(f for f in whole.subject_of if f % 2 == 1)


def test_a_shard_refuses_a_snapshot_store_of_another_shard(tmp_path: Path) -> None:
    store = SnapshotStore(ObjectStore(f"file://{tmp_path}/o"), shard=Shard(0, 2))
    with pytest.raises(ValueError):
        _gallery(Shard(1, 2), store)
    with pytest.raises(ValueError):
        _gallery(WHOLE, store)
    assert _gallery(Shard(0, 2), store).shard == Shard(0, 2)


# -------------------------------------------------------------------- merge
@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_merged_shards_answer_as_the_whole_gallery(n: int, k: int) -> None:
    rng = np.random.default_rng(100 * n + k)
    changes, subs = _log(rng, subjects=40, faces_per=3)
    whole = _gallery()
    whole.apply(changes)
    shards = _sharded(changes, n)
    # Probes near enrolled faces and at random.
    faces = np.stack([c.embedding for c in changes[::7]])
    near = faces + 0.3 * _unit(rng, len(faces))
    q = np.concatenate([near / np.linalg.norm(near, axis=1, keepdims=True), _unit(rng, 5)])
    merged = _merged(shards, q, k)
    expected = whole.search(CID, q, k)
    assert len(merged.hits) == len(q)
    for got, want in zip(merged.hits, expected):
        assert len(got) == len(want) == k
        assert [h.similarity for h in got] == sorted((h.similarity for h in got), reverse=True)
        assert _canon(got) == _canon(want)
    assert merged.seq == 10  # the lowest seq any shard searched at


def test_merge_with_ties_k_beyond_the_gallery_and_empty_shards() -> None:
    rng = np.random.default_rng(7)
    v = _unit(rng, 3)
    s1, s2, s3 = (uuid.UUID(int=i) for i in (1, 2, 3))
    # Faces 10 and 11 (shards 0 and 1 of 2, or 0 and 1 of 5) are the same vector
    # of one subject; subjects 2 and 3 tie exactly with each other.
    changes = [
        Change(1, CID, "add", 10, s1, v[0], "a"),
        Change(2, CID, "add", 11, s1, v[0], "a"),
        Change(3, CID, "add", 20, s2, v[1], "b"),
        Change(4, CID, "add", 21, s3, v[1], "c"),
        Change(5, CID, "add", 30, s3, v[2], "c"),
    ]
    whole = _gallery()
    whole.apply(changes)
    q = np.stack([v[0], v[1], (v[0] + v[1]) / np.linalg.norm(v[0] + v[1])])
    for n in (2, 5):  # with 5 shards, shards 2 and 4 hold nothing
        shards = _sharded(changes, n)
        if n == 5:
            assert CID not in shards[2].indexes and CID not in shards[4].indexes
        for k in (2, 3, 50):
            got = _merged(shards, q, k).hits
            want = whole.search(CID, q, k)
            for g, w in zip(got, want):
                assert len({h.subject_id for h in g}) == len(g) == min(k, 3)
                if k >= 3:  # no tie at the cut: the same subjects at the same scores
                    assert _canon(g, face=False) == _canon(w, face=False)
                else:
                    assert [round(h.similarity, 5) for h in g] == [round(h.similarity, 5) for h in w]


def test_merge_keeps_names_and_demotions() -> None:
    rng = np.random.default_rng(3)
    changes, subs = _log(rng, subjects=6, faces_per=2)
    probe = changes[0].embedding
    # "Not subject 0" reported for a probe equal to its first face.
    changes.append(Change(99, CID, "feedback", 1, subs[0], None, "name-0", probe[None, :]))
    whole = _gallery()
    whole.apply(changes)
    shards = _sharded(changes, 3)
    q = probe[None, :]
    got = _merged(shards, q, 3, fb=0.5).hits[0]
    want = whole.search(CID, q, 3, 0.5)[0]
    assert _canon(got) == _canon(want)
    assert got[0].subject_id == str(subs[0]) and got[0].demoted and got[0].name == "name-0"


def test_merge_edge_cases() -> None:
    a = Hit("a", 1, 0.9, "A")
    assert merge_hits([], 3) == [] and merge_hits([[], []], 3) == []
    assert merge_hits([[a], []], 3) == [a]
    # One subject in two shards: its best face wins, once.
    a2 = Hit("a", 2, 0.95, "A")
    b = Hit("b", 3, 0.5, "B")
    assert merge_hits([[a, b], [a2]], 5) == [a2, b]
    assert merge_hits([[a, b], [a2]], 1) == [a2]
    with pytest.raises(ValueError):
        merge_results([], 3)
    with pytest.raises(ValueError):
        merge_results([MatchResult([[a]], 1), MatchResult([[a], []], 1)], 3)
    one = MatchResult([[a]], 4, {"search": 1.0})
    assert merge_results([one], 3) is one
    both = merge_results([MatchResult([[a]], 4, {"search": 1.0}), MatchResult([[b]], 3, {"search": 2.5})], 3)
    assert both.seq == 3 and both.timings_ms == {"search": 2.5} and both.hits == [[a, b]]


# ---------------------------------------------------------------- snapshots
def test_shard_snapshots_live_apart_and_erasures_reach_them(tmp_path: Path) -> None:
    from serve_app.services.erasure import ErasureService

    objects = ObjectStore(f"file://{tmp_path}/o")
    whole = SnapshotStore(objects, keep=2)
    s0, s1 = (SnapshotStore(objects, keep=2, shard=Shard(s, 2)) for s in (0, 1))
    other = SnapshotStore(objects, shard=Shard(0, 3))  # another layout
    assert s0.key(7, 5) == "index-snapshots/7/shard-0-of-2/00000000000000000005.snap"
    for store, seqs in ((whole, (5, 6)), (s0, (10, 20, 30)), (s1, (15,)), (other, (40,))):
        for seq in seqs:
            objects.put(store.key(7, seq), b"s")
    objects.put(s1.key(8, 3), b"s")
    assert whole.list_seqs(7) == [6, 5] and whole.list_all() == {7: [6, 5]}
    assert s0.list_seqs(7) == [30, 20, 10] and s0.list_all() == {7: [30, 20, 10]}
    assert s1.list_all() == {7: [15], 8: [3]}
    assert s0.list_every_shard() == {0: {7: [30, 20, 10]}, 1: {7: [15], 8: [3]}}
    assert whole.list_every_shard() == {0: {7: [6, 5]}}
    # Pruning one store never touches another's snapshots.
    assert [snapshot_seq_of(k) for k in s0.prune(7)] == [10]
    assert whole.prune(7, floor=6) == [whole.key(7, 5)]
    assert s1.list_seqs(7) == [15] and other.list_seqs(7) == [40] and whole.list_seqs(7) == [6]
    # An erasure's sweep of the collection (prefix index-snapshots/7/) finds every shard's.
    item = SimpleNamespace(op="snapshots_below", below_seq=25)
    swept = ErasureService._select(item, objects.list_keys("index-snapshots/7/"))  # type: ignore[arg-type]
    assert sorted(swept) == sorted([s0.key(7, 20), s1.key(7, 15), whole.key(7, 6)])


# ------------------------------------------------------------ serve config
def test_deploy_config_writes_one_matcher_entry_per_shard() -> None:
    from ray.serve.schema import ServeDeploySchema

    from serve_app.cluster import ClusterPorts, deploy_config, shard_matcher_entries

    ports = ClusterPorts(http=18123, http_host="127.0.0.1")
    one = deploy_config({"database_url": "postgresql://u@h/db"}, ports)
    assert [d["name"] for d in one["applications"][0]["deployments"]][-1] == "Matcher"
    cfg = deploy_config({"database_url": "postgresql://u@h/db", "matcher_shards": 3}, ports,
                        overrides={"Matcher": {"user_config": {"snapshot_every": 2}},
                                   "Matcher-2": {"ray_actor_options": {"num_cpus": 0.1}}})
    ServeDeploySchema.model_validate(cfg)
    deps = {d["name"]: d for d in cfg["applications"][0]["deployments"]}
    assert "Matcher" not in deps and {"Matcher-0", "Matcher-1", "Matcher-2"} <= set(deps)
    for s in range(3):
        assert deps[f"Matcher-{s}"]["user_config"]["snapshot_every"] == 2
        assert deps[f"Matcher-{s}"]["user_config"]["sync_interval_s"] == 1.0  # merged, not replaced
    assert deps["Matcher-2"]["ray_actor_options"]["num_cpus"] == 0.1
    assert deps["Matcher-0"]["ray_actor_options"]["num_cpus"] == 0.2
    hand = [{"name": "Matcher", "max_ongoing_requests": 8}, {"name": "Matcher-1", "max_ongoing_requests": 4}]
    assert shard_matcher_entries(hand, 2) == [{"name": "Matcher-0", "max_ongoing_requests": 8},
                                              {"name": "Matcher-1", "max_ongoing_requests": 4}]
    assert shard_matcher_entries(hand, 1) is hand


def test_the_graph_binds_one_matcher_deployment_per_shard() -> None:
    from serve_app.graph import build_app

    def names(app) -> list[str]:
        ingress = app._bound_deployment
        matchers = ingress.init_args[4]
        if not isinstance(matchers, list):
            matchers = [matchers]
        return [m._bound_deployment.name for m in matchers], [m._bound_deployment.init_args[1:] for m in matchers]

    assert names(build_app({"database_url": "postgresql://u@h/db"})) == (["Matcher"], [()])
    got = names(build_app({"database_url": "postgresql://u@h/db", "matcher_shards": 3}))
    assert got == (["Matcher-0", "Matcher-1", "Matcher-2"], [(0, 3), (1, 3), (2, 3)])


# ------------------------------------------------------- the pipeline client
class _Response:
    """Stands in for a DeploymentResponse: awaitable once, cancellable."""

    def __init__(self, value: object) -> None:
        self.value, self.cancelled = value, False

    def __await__(self):
        async def get() -> object:
            if isinstance(self.value, BaseException):
                raise self.value
            return self.value
        return get().__await__()

    def cancel(self) -> None:
        self.cancelled = True


class _Method:
    def __init__(self, answers: list[object]) -> None:
        self.answers, self.calls = answers, []

    def remote(self, *args: object) -> _Response:
        self.calls.append(args)
        return _Response(self.answers.pop(0) if len(self.answers) > 1 else self.answers[0])


def _shard_handle(*answers: object) -> SimpleNamespace:
    return SimpleNamespace(search=_Method(list(answers)), ready=_Method([True]))


async def test_the_client_asks_every_shard_and_merges() -> None:
    from serve_app.messages import EmbeddingResult
    from serve_app.pipeline_client import MatchSpec, PipelineClient

    a, b = Hit("a", 2, 0.9, "A"), Hit("b", 3, 0.8, "B")
    shards = [_shard_handle(MatchResult([[b]], 7)), _shard_handle(MatchResult([[a]], 6))]
    idle = _shard_handle(True)
    client = PipelineClient(idle, idle, idle, shards)  # type: ignore[arg-type]
    emb = EmbeddingResult("sface", DIM, np.zeros((1, DIM), np.float32))
    got = await client.search(emb, MatchSpec(collection_id=CID, k=5, min_seq=4))
    assert got.hits == [[a, b]] and got.seq == 6
    for h in shards:  # each shard got the same search, min_seq included
        assert h.search.calls == [(emb, CID, 5, 4, 0, None)]
    ready = await client.ready()
    assert ready["matcher-0"] and ready["matcher-1"] and ready["matcher"]
    one = PipelineClient(idle, idle, idle, shards[0])  # type: ignore[arg-type]
    assert "matcher" in await one.ready() and "matcher-0" not in await one.ready()


@pytest.mark.parametrize("failure", ["lost", "full", "refused"])
async def test_one_shard_down_is_a_503_never_a_partial_answer(failure: str) -> None:
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    from serve_app.errors import InvalidRequest, ServiceUnavailable
    from serve_app.messages import EmbeddingResult
    from serve_app.pipeline_client import MatchSpec, PipelineClient

    error = {"lost": ActorDiedError(), "full": BackPressureError(num_queued_requests=1, max_queued_requests=1),
             "refused": InvalidRequest("min_seq 99 is beyond the latest committed change")}[failure]
    good = _shard_handle(MatchResult([[Hit("a", 2, 0.9, "A")]], 7))
    bad = _shard_handle(error)
    idle = _shard_handle(True)
    client = PipelineClient(idle, idle, idle, [good, bad], retry_after_s=2)  # type: ignore[arg-type]
    emb = EmbeddingResult("sface", DIM, np.zeros((1, DIM), np.float32))
    expected = InvalidRequest if failure == "refused" else ServiceUnavailable
    with pytest.raises(expected) as info:
        await client.search(emb, MatchSpec(collection_id=CID, k=5))
    if expected is ServiceUnavailable:
        assert info.value.retry_after_s == 2
    assert len(bad.search.calls) == (2 if failure == "lost" else 1)  # a lost replica: tried once more
    assert await client.ready() == {"detector": True, "embedder": True, "liveness": True,
                                    "matcher-0": True, "matcher-1": True, "matcher": True}
