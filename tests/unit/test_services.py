"""The decisions, driven through the services with fakes: no Ray, no servers."""
from __future__ import annotations

import uuid

import numpy as np
import pytest

from models.images import ImageUnreadable
from serve_app.errors import (
    InvalidRequest,
    MultipleFaces,
    NoFaceFound,
    ServiceUnavailable,
    SpoofDetected,
    SubjectNotFound,
)
from serve_app.services.erasure import ErasureService
from serve_app.services.gallery import GalleryService
from serve_app.services.liveness_policy import LivenessPolicy
from serve_app.services.decisions import DecisionPolicy
from serve_app.services.recognition import RecognitionService, decide_identity
from serve_app.messages import Hit
from serve_app.timing import StageTimer
from tests.unit.fakes import DIM, CountingOutcomes, FakeObjects, FakePipeline, FakeRepo, unit

def at(threshold: float, maybe: float | None = None) -> DecisionPolicy:
    return DecisionPolicy(threshold, maybe, None)


A = unit(1, 0, 0, 0)
A2 = unit(1, 0.2, 0, 0)  # similar to A (cos ~0.98)
B = unit(0, 1, 0, 0)
C = unit(0, 0, 1, 0.1)


@pytest.fixture()
def world() -> tuple[FakeRepo, FakePipeline, FakeObjects, RecognitionService, GalleryService, CountingOutcomes]:
    repo = FakeRepo()
    pipe = FakePipeline(repo)
    objects = FakeObjects()
    outcomes = CountingOutcomes()
    rec = RecognitionService(pipe, repo, outcomes)
    gal = GalleryService(pipe, repo, objects, model="fake", dim=DIM, default_collection="default")
    gal.erasures = ErasureService(repo.erasures, objects)
    return repo, pipe, objects, rec, gal, outcomes


async def _enrolled(gal: GalleryService, pipe: FakePipeline, name: str, vec: np.ndarray) -> uuid.UUID:
    col = await gal.collection(None, create=True)
    subject = await gal.create_subject(col, name, {})
    data = pipe.script(f"{name}-enrol".encode(), vec)
    await gal.enrol(col, subject.id, data, StageTimer(), largest=False, policy=LivenessPolicy.OFF)
    return subject.id


# --- verify -------------------------------------------------------------------------------
async def test_verify_pair_match_and_no_match(world) -> None:
    _, pipe, _, rec, _, outcomes = world
    a, a2, b = pipe.script(b"a", A), pipe.script(b"a2", A2), pipe.script(b"b", B)
    same = await rec.verify_pair(a, a2, StageTimer(), LivenessPolicy.OFF, at(0.5))
    diff = await rec.verify_pair(a, b, StageTimer(), LivenessPolicy.OFF, at(0.5))
    assert same.match and same.similarity == pytest.approx(float(A @ A2))
    assert not diff.match and diff.similarity == pytest.approx(0.0, abs=1e-6)
    assert outcomes.verifications == ["match", "no_match"]


async def test_verify_uses_largest_face_and_requires_one(world) -> None:
    _, pipe, _, rec, _, outcomes = world
    group, none, a = pipe.script(b"g", A, B), pipe.script(b"none"), pipe.script(b"a", A)
    v = await rec.verify_pair(group, a, StageTimer(), LivenessPolicy.OFF, at(0.5))
    assert v.match and v.first_face == 0  # faces come largest first
    with pytest.raises(NoFaceFound):
        await rec.verify_pair(none, a, StageTimer(), LivenessPolicy.OFF, at(0.5))
    assert outcomes.verifications == ["match"]  # the caller's bad input is not an outcome


async def test_verify_against_subject(world) -> None:
    repo, pipe, _, rec, gal, _ = world
    sid = await _enrolled(gal, pipe, "ada", A)
    col = await gal.collection(None)
    v = await rec.verify_subject(pipe.script(b"probe", A2), col, sid, StageTimer(), LivenessPolicy.OFF, at(0.5))
    assert v.match and v.faces_compared == 1 and v.subject is not None and v.subject.name == "ada"
    empty = await gal.create_subject(col, "nobody", {})
    with pytest.raises(InvalidRequest, match="no enrolled faces"):
        await rec.verify_subject(b"probe", col, empty.id, StageTimer(), LivenessPolicy.OFF, at(0.5))
    with pytest.raises(SubjectNotFound):
        await rec.verify_subject(b"probe", col, uuid.uuid4(), StageTimer(), LivenessPolicy.OFF, at(0.5))
    assert pipe.calls[-1].embed  # the 404 came before any model work


# --- identify -------------------------------------------------------------------------------
async def test_identify_decisions_per_face(world) -> None:
    _, pipe, _, rec, gal, outcomes = world
    ada = await _enrolled(gal, pipe, "ada", A)
    await _enrolled(gal, pipe, "bob", B)
    col = await gal.collection(None)
    probe = pipe.script(b"group", A2, C)
    result = await rec.identify(probe, col, StageTimer(), k=5, min_seq=0, policy=LivenessPolicy.OFF, decide=at(0.5))
    first, second = result.faces
    assert first.decision == "match" and first.subject is not None and first.subject.subject_id == str(ada)
    assert first.subject.name == "ada" and [c.name for c in first.candidates][0] == "ada"
    assert second.decision == "unknown" and second.subject is None
    assert outcomes.identifications == ["match", "unknown"]


async def test_identify_no_face_is_the_callers_error(world) -> None:
    _, pipe, _, rec, gal, outcomes = world
    col = await gal.collection(None, create=True)
    with pytest.raises(NoFaceFound):
        await rec.identify(pipe.script(b"empty"), col, StageTimer(), k=5, min_seq=0,
                           policy=LivenessPolicy.OFF, decide=at(0.5))
    pipe.images[b"bad"] = type(pipe.images[b"empty"])([], error=ImageUnreadable("corrupt"))
    with pytest.raises(ImageUnreadable):
        await rec.identify(b"bad", col, StageTimer(), k=5, min_seq=0, policy=LivenessPolicy.OFF, decide=at(0.5))
    pipe.images[b"down"] = type(pipe.images[b"empty"])([], error=ServiceUnavailable("overloaded"))
    with pytest.raises(ServiceUnavailable):
        await rec.identify(b"down", col, StageTimer(), k=5, min_seq=0, policy=LivenessPolicy.OFF, decide=at(0.5))
    assert outcomes.identifications == ["error"]  # only our own failure counts as an error


def test_decide_identity_skips_demoted_and_applies_threshold() -> None:
    wrong, kept = uuid.uuid4(), uuid.uuid4()
    hits = [Hit(str(wrong), 1, 0.9, "wrong", demoted=True), Hit(str(kept), 2, 0.6, "kept")]
    decision, best, cands = decide_identity(hits, at(0.5))
    assert decision == "match" and best is not None and best.subject_id == str(kept) and best.name == "kept"
    assert [c.demoted for c in cands] == [True, False]  # listed, but never decides
    decision, best, _ = decide_identity(hits, at(0.7, maybe=0.55))
    assert decision == "maybe" and best is None
    decision, best, _ = decide_identity(hits, at(0.7, maybe=0.65))
    assert decision == "unknown" and best is None


# --- liveness policy ---------------------------------------------------------------------------
async def test_liveness_policy_off_flag_block(world) -> None:
    _, pipe, _, rec, _, _ = world
    spoof = pipe.script(b"spoof", A, live=[0.1])
    off = await rec.detect(spoof, StageTimer(), LivenessPolicy.OFF)
    assert off.liveness is None and not pipe.calls[-1].liveness
    flagged = await rec.detect(spoof, StageTimer(), LivenessPolicy.FLAG)
    assert flagged.liveness is not None and flagged.liveness.live() == [False]
    with pytest.raises(SpoofDetected) as err:
        await rec.detect(spoof, StageTimer(), LivenessPolicy.BLOCK)
    assert err.value.details["faces"] == [0]
    live = pipe.script(b"live", A, live=[0.9])
    assert (await rec.detect(live, StageTimer(), LivenessPolicy.BLOCK)).liveness is not None


def test_liveness_policy_parse() -> None:
    assert LivenessPolicy.parse(None, LivenessPolicy.FLAG) is LivenessPolicy.FLAG
    assert LivenessPolicy.parse("BLOCK", LivenessPolicy.OFF) is LivenessPolicy.BLOCK
    with pytest.raises(InvalidRequest):
        LivenessPolicy.parse("maybe", LivenessPolicy.OFF)


# --- enrolment ---------------------------------------------------------------------------------
async def test_enrol_stores_crop_then_row(world) -> None:
    repo, pipe, objects, _, gal, _ = world
    col = await gal.collection(None, create=True)
    s = await gal.create_subject(col, "ada", {})
    out = await gal.enrol(col, s.id, pipe.script(b"ada", A), StageTimer(), largest=False, policy=LivenessPolicy.OFF)
    assert out.seq == 1 and gal.last_seq == 1
    (key,) = objects.data
    assert out.face.crop_key == key and key.startswith(f"crops/{col.id}/{s.id}/")  # ids, never names
    assert objects.data[key] == b"jpeg0"


async def test_enrol_failure_leaves_no_object(world) -> None:
    repo, pipe, objects, _, gal, _ = world
    col = await gal.collection(None, create=True)
    s = await gal.create_subject(col, "ada", {})
    repo.fail_add_face = ConnectionError("postgres went away")
    with pytest.raises(ConnectionError):
        await gal.enrol(col, s.id, pipe.script(b"ada", A), StageTimer(), largest=False, policy=LivenessPolicy.OFF)
    assert objects.data == {} and repo.faces == {}


async def test_enrol_refusals_write_nothing(world) -> None:
    repo, pipe, objects, _, gal, _ = world
    col = await gal.collection(None, create=True)
    s = await gal.create_subject(col, "ada", {})
    cases = [
        (pipe.script(b"two", A, B), LivenessPolicy.OFF, MultipleFaces),
        (pipe.script(b"none"), LivenessPolicy.OFF, NoFaceFound),
        (pipe.script(b"spoof", A, live=[0.05]), LivenessPolicy.BLOCK, SpoofDetected),
    ]
    for data, policy, err in cases:
        with pytest.raises(err):
            await gal.enrol(col, s.id, data, StageTimer(), largest=False, policy=policy)
    with pytest.raises(SubjectNotFound):
        await gal.enrol(col, uuid.uuid4(), b"two", StageTimer(), largest=True, policy=LivenessPolicy.OFF)
    assert objects.data == {} and repo.faces == {}
    # largest=true takes the first (largest) face of a group photo
    out = await gal.enrol(col, s.id, b"two", StageTimer(), largest=True, policy=LivenessPolicy.OFF)
    assert np.allclose(repo.faces[out.face.id][2], A)


async def test_enrol_object_store_down_writes_no_row(world) -> None:
    repo, pipe, objects, _, gal, _ = world
    col = await gal.collection(None, create=True)
    s = await gal.create_subject(col, "ada", {})
    objects.fail_put = True
    with pytest.raises(OSError):
        await gal.enrol(col, s.id, pipe.script(b"ada", A), StageTimer(), largest=False, policy=LivenessPolicy.OFF)
    assert repo.faces == {} and repo.seq == 0


async def test_delete_subject_removes_crops(world) -> None:
    repo, pipe, objects, _, gal, _ = world
    sid = await _enrolled(gal, pipe, "ada", A)
    col = await gal.collection(None)
    assert len(objects.data) == 1
    removed = await gal.delete_subject(col, sid)
    assert removed.faces_removed == 1 and removed.crops_pending_cleanup == 0 and objects.data == {}
    assert gal.last_seq == removed.seq


async def test_min_seq_beyond_the_log_is_refused(world) -> None:
    repo, pipe, _, rec, gal, _ = world
    await _enrolled(gal, pipe, "ada", A)
    col = await gal.collection(None)
    probe = pipe.script(b"probe", A2)
    ok = await rec.identify(probe, col, StageTimer(), k=5, min_seq=repo.seq, policy=LivenessPolicy.OFF, decide=at(0.5))
    assert ok.faces[0].decision == "match"
    with pytest.raises(InvalidRequest, match="min_seq"):
        await rec.identify(probe, col, StageTimer(), k=5, min_seq=repo.seq + 1000, policy=LivenessPolicy.OFF,
                           decide=at(0.5))


async def test_not_this_person_demotes_the_same_wrong_match(world) -> None:
    from serve_app.services.feedback import FeedbackService, ProbeCache

    repo, pipe, _, rec, gal, _ = world
    ada = await _enrolled(gal, pipe, "ada", A)
    col = await gal.collection(None)
    lookalike = pipe.script(b"lookalike", A2)  # someone else, matched to ada
    first = await rec.identify(lookalike, col, StageTimer(), k=5, min_seq=0, policy=LivenessPolicy.OFF,
                               decide=at(0.5))
    assert first.faces[0].decision == "match" and first.faces[0].subject.subject_id == str(ada)
    fb = FeedbackService(pipe, repo, ProbeCache())
    made = await fb.report(col, ada, actor="t", image=lookalike)
    again = await rec.identify(lookalike, col, StageTimer(), k=5, min_seq=0, policy=LivenessPolicy.OFF,
                               decide=at(0.5))
    face = again.faces[0]
    assert face.decision == "unknown" and face.subject is None
    assert face.candidates[0].subject_id == str(ada) and face.candidates[0].demoted
    # ada's own photo is far from the reported probe? here A2 ~ A, so it is demoted too at margin 0.5;
    # with a strict margin only near-identical probes are demoted
    strict = await rec.identify(pipe.script(b"ada-again", A), col, StageTimer(), k=5, min_seq=0,
                                policy=LivenessPolicy.OFF, decide=at(0.5), feedback_similarity=0.999)
    assert strict.faces[0].decision == "match"
    await fb.delete(col, made["id"])
    back = await rec.identify(lookalike, col, StageTimer(), k=5, min_seq=0, policy=LivenessPolicy.OFF,
                              decide=at(0.5))
    assert back.faces[0].decision == "match"
    # erasing the subject erases its feedback
    await fb.report(col, ada, actor="t", image=lookalike)
    await gal.delete_subject(col, ada)
    assert await fb.list(col, None) == []


def test_decision_policy_by_target_fmr() -> None:
    from models.calibration import load_calibration
    from serve_app.services.decisions import parse_fmr, policy_for

    cal = load_calibration("sface")
    strict = policy_for(cal, target_fmr=1e-5, default_threshold=0.363, maybe_fmr=1e-3)
    loose = policy_for(cal, target_fmr=1e-2, default_threshold=0.363, maybe_fmr=1e-3)
    default = policy_for(cal, target_fmr=None, default_threshold=0.363, maybe_fmr=1e-3)
    assert strict.threshold > default.threshold > loose.threshold
    assert default.maybe_threshold is not None and default.maybe_threshold < default.threshold
    assert loose.maybe_threshold is None  # the maybe point lies above a loose threshold: no band
    sim = (default.maybe_threshold + default.threshold) / 2
    assert default.decide(sim) == "maybe" and loose.decide(sim) == "match"
    assert strict.decide(default.threshold + 0.01) == "maybe" and strict.decide(0.1) == "no_match"
    assert default.target_fmr is not None and 1e-5 < default.target_fmr < 1e-3
    for bad in ("abc", "0", "1.5", "-1"):
        with pytest.raises(InvalidRequest):
            parse_fmr(bad)
    with pytest.raises(InvalidRequest):
        policy_for(cal, target_fmr=1e-12, default_threshold=0.363, maybe_fmr=1e-3)  # beyond the table
    with pytest.raises(InvalidRequest):
        policy_for(None, target_fmr=1e-3, default_threshold=0.363, maybe_fmr=1e-3)


async def test_enrolment_below_the_quality_bar_is_refused(world) -> None:
    from serve_app.errors import LowQuality

    repo, pipe, objects, _, gal, _ = world
    col = await gal.collection(None, create=True)
    s = await gal.create_subject(col, "blurry", {})
    data = pipe.script(b"blurry", A)
    pipe.images[data].quality = {"score": 0.3, "reasons": ["blurred"]}
    with pytest.raises(LowQuality) as err:
        await gal.enrol(col, s.id, data, StageTimer(), largest=False, policy=LivenessPolicy.OFF, min_quality=0.5)
    assert err.value.details["reasons"] == ["blurred"]
    assert repo.faces == {} and objects.data == {}
    ok = await gal.enrol(col, s.id, data, StageTimer(), largest=False, policy=LivenessPolicy.OFF, min_quality=0.2)
    assert ok.seq == 1
