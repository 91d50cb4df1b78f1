"""A collection moved to another model (serve_app/jobs/reembed.py), as the
ingress's services see it: probes are embedded with the collection's model,
a search that finds the collection switched is asked again with the new model
once, and a stale cached lookup is dropped. Fakes only: no Ray, no servers."""
from __future__ import annotations

import dataclasses
import uuid

import pytest

from serve_app.errors import ModelChanged, ModelMismatch, ServiceUnavailable
from serve_app.gallery.repository import Collection
from serve_app.pipeline_client import AnalyseSpec, Analysis
from serve_app.services.decisions import DecisionPolicy
from serve_app.services.feedback import FeedbackService, ProbeCache
from serve_app.services.gallery import GalleryService
from serve_app.services.liveness_policy import LivenessPolicy
from serve_app.services.recognition import RecognitionService
from serve_app.timing import StageTimer
from tests.unit.fakes import DIM, CountingOutcomes, FakeObjects, FakePipeline, FakeRepo, unit

A = unit(1, 0, 0, 0)
DECIDE = DecisionPolicy(0.5, None, None)


class SwitchedPipeline(FakePipeline):
    """The matcher holds collection `cid` under `held`: a search with a probe
    of another model is refused as the real matcher refuses it."""

    def __init__(self, repo: FakeRepo, cid: int, held: str) -> None:
        super().__init__(repo)
        self.cid, self.held = cid, held

    async def analyse(self, data: bytes, spec: AnalyseSpec) -> Analysis:
        if spec.match is not None and spec.match.collection_id == self.cid and spec.model != self.held:
            self.calls.append(spec)
            raise ModelChanged("switched", retry_after_s=1, model=self.held, collection_id=self.cid)
        return await super().analyse(data, spec)


@pytest.fixture()
def repo() -> FakeRepo:
    return FakeRepo()


async def _collection(repo: FakeRepo, embedder: str = "fake") -> Collection:
    return await repo.ensure_collection("c", embedder, DIM)


async def test_identify_embeds_with_the_collections_model(repo: FakeRepo) -> None:
    col = await _collection(repo, "sface_flip")
    pipe = FakePipeline(repo)
    rec = RecognitionService(pipe, repo, CountingOutcomes())
    await rec.identify(pipe.script(b"p", A), col, StageTimer(), k=3, min_seq=0, policy=LivenessPolicy.OFF,
                       decide=DECIDE)
    assert pipe.calls[-1].model == "sface_flip"


async def test_a_switched_collection_is_searched_again_with_its_new_model(repo: FakeRepo) -> None:
    col = await _collection(repo, "sface")
    pipe = SwitchedPipeline(repo, col.id, held="sface_flip")
    told: list[tuple[int, str]] = []
    rec = RecognitionService(pipe, repo, CountingOutcomes(), on_model_changed=lambda c, m: told.append((c, m)))
    got = await rec.identify(pipe.script(b"p", A), col, StageTimer(), k=3, min_seq=0,
                             policy=LivenessPolicy.OFF, decide=DECIDE)
    assert [c.model for c in pipe.calls] == ["sface", "sface_flip"]
    assert told == [(col.id, "sface_flip")] and len(got.faces) == 1


async def test_asked_again_once_only(repo: FakeRepo) -> None:
    col = await _collection(repo, "sface")

    class Flapping(SwitchedPipeline):  # switched again between the two searches
        async def analyse(self, data: bytes, spec: AnalyseSpec) -> Analysis:
            self.held = "facenet" if self.calls else "sface_flip"
            return await super().analyse(data, spec)

    pipe = Flapping(repo, col.id, held="sface_flip")
    rec = RecognitionService(pipe, repo, CountingOutcomes())
    with pytest.raises(ModelChanged):
        await rec.identify(pipe.script(b"p", A), col, StageTimer(), k=3, min_seq=0,
                           policy=LivenessPolicy.OFF, decide=DECIDE)
    assert [c.model for c in pipe.calls] == ["sface", "sface_flip"]


async def test_verify_against_a_subject_embeds_with_its_faces_model(repo: FakeRepo) -> None:
    col = await _collection(repo, "fake")
    pipe = FakePipeline(repo)
    gal = GalleryService(pipe, repo, FakeObjects(), model="fake", dim=DIM, default_collection="c")
    sid = (await gal.create_subject(col, "ada", {})).id
    await gal.enrol(col, sid, pipe.script(b"e", A), StageTimer(), largest=False, policy=LivenessPolicy.OFF)
    assert pipe.calls[-1].model == "fake"
    rec = RecognitionService(pipe, repo, CountingOutcomes())
    stale = dataclasses.replace(col, embedder="sface")  # a cached lookup from before a switch
    await rec.verify_subject(pipe.script(b"v", A), stale, sid, StageTimer(), LivenessPolicy.OFF, DECIDE)
    assert pipe.calls[-1].model == "fake"


async def test_stale_lookup_is_dropped_when_a_search_finds_the_switch(repo: FakeRepo) -> None:
    pipe = FakePipeline(repo)
    gal = GalleryService(pipe, repo, FakeObjects(), model="sface", dim=DIM, default_collection="c")
    col = await repo.ensure_collection("c", "sface", DIM)
    assert (await gal.collection("c")).embedder == "sface"
    repo.collections[("default", "c")] = dataclasses.replace(col, embedder="sface_flip")  # the switch
    assert (await gal.collection("c")).embedder == "sface"  # cached for lookup_ttl_s
    gal.model_changed(col.id, "sface_flip")
    assert (await gal.collection("c")).embedder == "sface_flip"
    gal.model_changed(col.id, "sface_flip")  # already current: kept
    assert len(gal._collections) == 1


async def test_enrolment_refused_by_the_one_model_check_is_a_retryable_503(repo: FakeRepo) -> None:
    class SerializationFailure(Exception):
        sqlstate = "40001"

    pipe = FakePipeline(repo)
    objects = FakeObjects()
    gal = GalleryService(pipe, repo, objects, model="sface", dim=DIM, default_collection="c")
    col = await gal.collection("c", create=True)
    sid = (await gal.create_subject(col, "ada", {})).id
    repo.fail_add_face = SerializationFailure("collection holds sface_flip embeddings")
    with pytest.raises(ServiceUnavailable):
        await gal.enrol(col, sid, pipe.script(b"e", A), StageTimer(), largest=False, policy=LivenessPolicy.OFF)
    assert len(gal._collections) == 0  # the next request looks the collection up again
    assert not [k for k in objects.data if k.startswith("crops/")]  # its crop is gone again


async def test_feedback_from_an_answer_of_the_old_model_is_refused(repo: FakeRepo) -> None:
    col = await _collection(repo, "sface_flip")
    sid = (await repo.create_subject(col, "ada", {})).id
    probes = ProbeCache()
    probes.put("t1", 0, A, "sface")
    svc = FeedbackService(FakePipeline(repo), repo, probes)
    with pytest.raises(ModelMismatch):
        await svc.report(col, sid, actor="a", trace_id="t1", face=0)
    probes.put("t2", 0, A, "sface_flip")
    assert (await svc.report(col, sid, actor="a", trace_id="t2", face=0))["subject_id"] == str(sid)
    assert uuid.UUID(str(sid))
