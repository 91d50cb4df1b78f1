"""The embedding cache: entry format, model identity, hits/misses, liveness and enrolment
reading around it, Redis down, and the per-subject keys erasure deletes (no Ray, no Redis)."""
from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

from serve_app.cached_pipeline import CachedPipeline
from serve_app.deployment_config import DetectorConfig
from serve_app.embedding_cache import (
    CacheConfig,
    EmbeddingCache,
    SubjectKeys,
    decode,
    detector_identity,
    encode,
    image_digest,
    model_identity,
)
from serve_app.messages import DetectionResult, EmbeddingResult, FaceInfo, Hit, LivenessResult, MatchResult
from serve_app.pipeline_client import AnalyseSpec, Analysis, MatchSpec
from serve_app.redis_store import RedisUnavailable
from tests.unit.fake_redis import FakeKV

DIM = 128


def _faces(n: int, seed: int = 0) -> tuple[DetectionResult, EmbeddingResult]:
    rng = np.random.default_rng(seed)
    faces = [FaceInfo((10.5 + i, 20.25, 110.0 + i, 140.75), rng.random((5, 2), dtype=np.float32) * 100,
                      0.9 - 0.1 * i, {"score": 0.8, "reasons": ["blur"] if i else [], "measures": {"sharp": 1.5}})
             for i in range(n)]
    vecs = rng.standard_normal((n, DIM)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) if n else 1
    det = DetectionResult(faces=faces, aligned=np.zeros((n, 112, 112, 3), np.uint8), liveness_crops=None,
                          enrol_crops=None, image_size=(640, 480), image_format="JPEG", config_id="det-a")
    return det, EmbeddingResult(model="sface", dim=DIM, vectors=vecs)


# --- the entry ---------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 3])
def test_an_entry_reads_back_exactly(n: int) -> None:
    det, emb = _faces(n)
    det2, emb2 = decode(encode(det, emb))
    assert len(det2.faces) == n and emb2.vectors.shape == (n, DIM) and emb2.vectors.dtype == np.float32
    assert np.array_equal(emb2.vectors, emb.vectors)
    for a, b in zip(det.faces, det2.faces):
        assert tuple(b.box) == a.box and b.score == pytest.approx(a.score) and b.quality == a.quality
        assert np.array_equal(b.landmarks, a.landmarks) and b.landmarks.shape == (5, 2)
    assert det2.image_size == (640, 480) and det2.image_format == "JPEG"
    assert (emb2.model, emb2.dim) == ("sface", DIM)
    assert det2.enrol_crops is None and det2.liveness_crops is None and len(det2.aligned) == 0  # never cached


def test_one_face_costs_well_under_a_kilobyte() -> None:
    det, emb = _faces(1)
    assert len(encode(det, emb)) < 1024


def test_damaged_entries_are_refused() -> None:
    blob = encode(*_faces(2))
    with pytest.raises(ValueError):
        decode(blob[:-4])
    with pytest.raises(ValueError):
        decode(b"XXXX" + blob[4:])


# --- model identity -------------------------------------------------------------------


def test_every_result_shaping_detector_option_changes_the_identity() -> None:
    base = detector_identity(DetectorConfig())
    for change in ({"score_threshold": 0.8}, {"detector": "mtcnn"}, {"max_side": 640}, {"min_face_size": 40},
                   {"relandmark": "always"}, {"quality_bars": {"min_face_px": 64}}):
        assert detector_identity(DetectorConfig(**change)) != base, change
    # batching does not change what a result is
    assert detector_identity(DetectorConfig(max_batch_size=2, batch_wait_timeout_s=0.01)) == base


def test_the_embedder_is_part_of_the_identity() -> None:
    assert model_identity("d", "sface") != model_identity("d", "facenet")
    assert model_identity("d", "sface") != model_identity("e", "sface")
    assert model_identity("d", "sface") == model_identity("d", "sface")


# --- the cache over a store ---------------------------------------------------------------


def test_put_get_and_what_is_counted() -> None:
    kv, seen = FakeKV(), []
    cache = EmbeddingCache(kv, count=seen.append)
    det, emb = _faces(2)

    async def go() -> None:
        assert await cache.get("abc", "id1") is None
        assert await cache.put("abc", "id1", det, emb)
        got = await cache.get("abc", "id1")
        assert got is not None and np.array_equal(got[1].vectors, emb.vectors)
        assert await cache.get("abc", "id2") is None  # another model identity is another key
        kv.data[cache.key("bad", "id1")] = (b"FSE1garbage", float("inf"))
        assert await cache.get("bad", "id1") is None

    asyncio.run(go())
    assert seen == ["miss", "stored", "hit", "miss", "corrupt"]


def test_entries_over_the_size_cap_are_not_stored() -> None:
    kv, seen = FakeKV(), []
    cache = EmbeddingCache(kv, config=CacheConfig(ttl_s=60, max_entry_bytes=1024), count=seen.append)
    assert not asyncio.run(cache.put("crowd", "id", *_faces(5)))
    assert not kv.keys() and seen == ["too_large"]


def test_redis_down_is_a_miss_and_a_dropped_write() -> None:
    kv, seen = FakeKV(), []
    kv.down = True
    cache = EmbeddingCache(kv, count=seen.append)
    assert asyncio.run(cache.get("abc", "id")) is None
    assert asyncio.run(cache.put("abc", "id", *_faces(1))) is False
    assert seen == ["unavailable", "unavailable"]


def test_forget_deletes_every_key_tied_to_the_subject_and_only_those() -> None:
    kv = FakeKV()
    keys = SubjectKeys(kv)
    a, b = uuid.uuid4(), uuid.uuid4()

    async def go() -> int:
        for k in ("e1", "e2", "idem1", "other"):
            await kv.set(k, b"x", 60)
        assert await keys.tie(a, "e1", "e2")
        assert await keys.tie(a, "idem1", "gone-already")
        assert await keys.tie(b, "other")
        return await keys.forget(a)

    assert asyncio.run(go()) == 3
    assert kv.keys() == {"other", keys.index_key(b)}


def test_forget_with_redis_down_raises_so_the_erasure_retries() -> None:
    kv = FakeKV()
    kv.down = True
    with pytest.raises(RedisUnavailable):
        asyncio.run(SubjectKeys(kv).forget(uuid.uuid4()))
    assert asyncio.run(SubjectKeys(kv).tie(uuid.uuid4(), "k")) is False


# --- the pipeline behind the cache ------------------------------------------------------------


class FakeGraph:
    """The PipelineClient's port: counts passes and searches."""

    def __init__(self) -> None:
        self.passes: list[AnalyseSpec] = []
        self.searches: list[np.ndarray] = []
        self.config_id = "det-a"
        self.model = "sface"
        self.timeout_s, self.retry_after_s = 10.0, 1

    async def analyse(self, data: bytes, spec: AnalyseSpec) -> Analysis:
        self.passes.append(spec)
        det, emb = _faces(1, seed=len(data))
        det.config_id = self.config_id
        emb.model = spec.model or self.model
        live = LivenessResult(np.array([0.9], np.float32), 0.5) if spec.liveness else None
        match = await self.search(emb, spec.match) if spec.match else None
        return Analysis(det, emb if (spec.embed or spec.match) else None, live, match)

    async def search(self, emb: EmbeddingResult, match: MatchSpec) -> MatchResult:
        self.searches.append(emb.vectors.copy())
        return MatchResult(hits=[[Hit(str(uuid.UUID(int=1)), 1, 0.9)]], seq=7)

    async def model_parts(self) -> tuple[str, str]:
        return self.config_id, self.model


def _pipeline(kv: FakeKV | None = None) -> tuple[CachedPipeline, FakeGraph, FakeKV]:
    kv = kv or FakeKV()
    graph = FakeGraph()
    return CachedPipeline(graph, EmbeddingCache(kv)), graph, kv  # type: ignore[arg-type]


IDENTIFY = AnalyseSpec(embed=True, match=MatchSpec(collection_id=1, k=5))


def test_a_repeated_image_skips_detector_and_embedder_but_still_searches() -> None:
    pipe, graph, _ = _pipeline()

    async def go() -> tuple[Analysis, Analysis]:
        await pipe.refresh_identity()
        first = await pipe.analyse(b"photo-1", IDENTIFY)
        second = await pipe.analyse(b"photo-1", IDENTIFY)
        return first, second

    first, second = asyncio.run(go())
    assert len(graph.passes) == 1 and len(graph.searches) == 2
    assert np.array_equal(graph.searches[0], graph.searches[1])  # the matcher got the same vector
    assert np.array_equal(first.embeddings.vectors, second.embeddings.vectors)  # type: ignore[union-attr]
    assert second.matches is not None and second.matches.seq == 7
    assert "cache" in second.timings() and "search" not in second.detection.timings_ms
    assert second.cache_key == first.cache_key and second.cache_key is not None


def test_detect_only_gets_no_vectors_from_a_hit() -> None:
    pipe, graph, _ = _pipeline()

    async def go() -> Analysis:
        await pipe.refresh_identity()
        await pipe.analyse(b"photo-2", AnalyseSpec(embed=True))
        return await pipe.analyse(b"photo-2", AnalyseSpec())

    hit = asyncio.run(go())
    assert len(graph.passes) == 1 and hit.embeddings is None and hit.matches is None and len(hit.detection) == 1


def test_liveness_and_enrolment_never_read_the_cache_but_write_it() -> None:
    pipe, graph, kv = _pipeline()

    async def go() -> Analysis:
        await pipe.refresh_identity()
        for _ in range(2):
            await pipe.analyse(b"photo-3", AnalyseSpec(embed=True, liveness=True))
        enrol = None
        for _ in range(2):
            enrol = await pipe.analyse(b"photo-3", AnalyseSpec(embed=True, enrol_crops=True))
        assert enrol is not None and enrol.cache_key in kv.keys()  # written before the answer
        await pipe.analyse(b"photo-3", AnalyseSpec(embed=True))
        return enrol

    asyncio.run(go())
    assert [s.liveness or s.enrol_crops for s in graph.passes] == [True, True, True, True]  # the 5th was a hit


def test_a_changed_detector_config_is_never_answered_from_old_entries() -> None:
    pipe, graph, _ = _pipeline()

    async def go() -> None:
        await pipe.refresh_identity()
        await pipe.analyse(b"photo-4", AnalyseSpec(embed=True))
        graph.config_id = "det-b"  # e.g. score_threshold changed by a deploy
        await pipe.refresh_identity()
        await pipe.analyse(b"photo-4", AnalyseSpec(embed=True))  # a miss: computed again
        await pipe.analyse(b"photo-4", AnalyseSpec(embed=True))  # hit under the new identity

    asyncio.run(go())
    assert len(graph.passes) == 2


def test_a_result_made_under_a_new_config_switches_the_identity_at_once() -> None:
    pipe, graph, _ = _pipeline()

    async def go() -> None:
        await pipe.refresh_identity()
        await pipe.analyse(b"photo-5", AnalyseSpec(embed=True))
        graph.config_id = "det-c"  # not refreshed yet, but a miss returns it
        await pipe.analyse(b"other", AnalyseSpec(embed=True))
        await pipe.analyse(b"photo-5", AnalyseSpec(embed=True))

    asyncio.run(go())
    assert len(graph.passes) == 3
    assert pipe.identity_for(None) == model_identity("det-c", "sface")


def test_a_collection_of_another_model_never_gets_the_default_models_vectors() -> None:
    pipe, graph, _ = _pipeline()
    flip = AnalyseSpec(embed=True, match=MatchSpec(collection_id=2, k=5), model="sface_flip")

    async def go() -> Analysis:
        await pipe.refresh_identity()
        await pipe.analyse(b"photo-9", IDENTIFY)  # default model: cached
        first = await pipe.analyse(b"photo-9", flip)  # another model: a miss, computed
        second = await pipe.analyse(b"photo-9", flip)  # now a hit of its own
        assert first.embeddings is not None and first.embeddings.model == "sface_flip"
        return second

    second = asyncio.run(go())
    assert [s.model for s in graph.passes] == [None, "sface_flip"]
    assert second.embeddings is not None and second.embeddings.model == "sface_flip"


def test_with_redis_down_every_request_is_answered_by_the_graph() -> None:
    kv = FakeKV()
    pipe, graph, _ = _pipeline(kv)

    async def go() -> list[Analysis]:
        await pipe.refresh_identity()
        kv.down = True
        out = [await pipe.analyse(b"photo-6", IDENTIFY) for _ in range(3)]
        out.append(await pipe.analyse(b"photo-6", AnalyseSpec(embed=True, enrol_crops=True)))
        return out

    answers = asyncio.run(go())
    assert len(graph.passes) == 4 and all(a.matches is not None or a.embeddings is not None for a in answers)


def test_no_lookups_before_the_model_identity_is_known() -> None:
    pipe, graph, kv = _pipeline()

    async def go() -> None:
        await pipe.analyse(b"photo-7", AnalyseSpec(embed=True))  # learns it from the result
        await pipe.analyse(b"photo-7", AnalyseSpec(embed=True))

    asyncio.run(go())
    assert len(graph.passes) == 1 and pipe.identity_for(None) == model_identity("det-a", "sface")


def test_a_cache_switched_off_is_not_touched() -> None:
    pipe, graph, kv = _pipeline()
    assert pipe.cache is not None
    pipe.cache.config = CacheConfig(ttl_s=0)

    async def go() -> None:
        await pipe.refresh_identity()
        for _ in range(2):
            await pipe.analyse(b"photo-8", IDENTIFY)

    asyncio.run(go())
    assert len(graph.passes) == 2 and kv.calls == 0


def test_image_digest_is_the_sha256() -> None:
    import hashlib

    assert image_digest(b"abc") == hashlib.sha256(b"abc").hexdigest()
