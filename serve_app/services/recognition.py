"""Detect, liveness, verify (1:1) and identify (1:N): the decisions.

Takes ports, not concrete classes: anything with the PipelinePort and
RecognitionRepo methods will do (the unit tests pass fakes). Values keep
full precision; rounding is the HTTP edge's job.
"""
from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

import logging

from serve_app.errors import InvalidRequest, ModelChanged, ModelMismatch, MultipleFaces, NoFaceFound
from serve_app.errors import dependency_outage
from serve_app.services.decisions import DecisionPolicy
from serve_app.gallery.repository import Collection, Subject
from serve_app.messages import Hit
from serve_app.pipeline_client import AnalyseSpec, Analysis, MatchSpec
from serve_app.services.liveness_policy import LivenessPolicy, enforce
from serve_app.timing import StageTimer


log = logging.getLogger("ray.serve")


class PipelinePort(Protocol):
    async def analyse(self, data: bytes, spec: AnalyseSpec) -> Analysis: ...


class RecognitionRepo(Protocol):
    async def subject_embeddings(self, collection: Collection, subject_id: uuid.UUID) -> tuple[list[str], np.ndarray]: ...
    async def get_subject(self, collection: Collection, subject_id: uuid.UUID) -> Subject: ...
    async def latest_seq(self) -> int: ...


class Outcomes(Protocol):
    """Where decisions are counted (metrics); a no-op in tests."""

    def verification(self, outcome: str) -> None: ...
    def identification(self, outcome: str) -> None: ...


@dataclass
class Candidate:
    subject_id: str
    name: str | None
    similarity: float
    fmr: float | None = None  # estimated false-match rate of accepting at this similarity
    demoted: bool = False  # reported "not this person" for a probe like this one


@dataclass
class IdentifiedFace:
    index: int
    decision: str  # match | maybe | unknown
    subject: Candidate | None  # the match (None for maybe/unknown: see candidates)
    candidates: list[Candidate]


@dataclass
class Identification:
    analysis: Analysis
    faces: list[IdentifiedFace]
    collection: str
    policy: DecisionPolicy
    seq: int


@dataclass
class Verification:
    similarity: float
    policy: DecisionPolicy
    decision: str  # match | maybe | no_match
    model: str
    first: Analysis
    first_face: int
    second: Analysis | None = None
    second_face: int | None = None
    subject: Subject | None = None
    faces_compared: int = 0

    @property
    def match(self) -> bool:
        return self.decision == "match"


def single_face(analysis: Analysis, what: str, *, largest: bool) -> int:
    """Index of the face a one-face operation uses (faces come largest first)."""
    n = len(analysis.detection)
    if n == 0:
        raise NoFaceFound(f"no face found in {what}")
    if n > 1 and not largest:
        raise MultipleFaces(
            f"{n} faces found in {what}; send an image with one face or ask for the largest (largest=true)",
            faces=n,
        )
    return 0


def decide_identity(hits: list[Hit], policy: DecisionPolicy) -> tuple[str, Candidate | None, list[Candidate]]:
    """(match | maybe | unknown, the matched candidate or None, every candidate).

    Names and "not this person" demotions come with the hits (the matcher
    carries them); demoted candidates stay listed but never decide."""
    candidates = [
        Candidate(h.subject_id, h.name, float(h.similarity), policy.fmr_at(float(h.similarity)), h.demoted)
        for h in hits
    ]
    top = next((c for c in candidates if not c.demoted), None)
    verdict = policy.decide(top.similarity) if top is not None else "no_match"
    decision = {"match": "match", "maybe": "maybe", "no_match": "unknown"}[verdict]
    return decision, (top if decision == "match" else None), candidates


class RecognitionService:
    def __init__(self, pipeline: PipelinePort, repo: RecognitionRepo, outcomes: Outcomes,
                 probes: Any = None, on_model_changed: Callable[[int, str], None] | None = None) -> None:
        self.pipeline = pipeline
        self.repo = repo
        self.outcomes = outcomes
        self.probes = probes  # feedback.ProbeCache: identify's probes, for "not this person" by trace id
        # Told (collection id, its model) when a search finds the collection on
        # another model than the caller looked up: the gallery service's cache.
        self.on_model_changed = on_model_changed

    async def analyse(self, data: bytes, timer: StageTimer, spec: AnalyseSpec,
                      policy: LivenessPolicy = LivenessPolicy.OFF) -> Analysis:
        try:
            analysis = await self.pipeline.analyse(data, spec)
        except ModelChanged as exc:
            # The collection was re-embedded since it was looked up: embed the
            # probe with the model the matcher holds and search again, once.
            model = exc.details.get("model")
            if spec.match is None or not isinstance(model, str) or model == spec.model:
                raise
            if self.on_model_changed is not None:
                self.on_model_changed(spec.match.collection_id, model)
            analysis = await self.pipeline.analyse(data, dataclasses.replace(spec, model=model))
        for stage, ms in analysis.timings().items():
            timer.add(stage, ms)
        enforce(policy, analysis.liveness)
        return analysis

    async def detect(self, data: bytes, timer: StageTimer, policy: LivenessPolicy) -> Analysis:
        return await self.analyse(data, timer, AnalyseSpec(liveness=policy.checks), policy)

    async def liveness(self, data: bytes, timer: StageTimer) -> Analysis:
        analysis = await self.analyse(data, timer, AnalyseSpec(liveness=True), LivenessPolicy.FLAG)
        if not len(analysis.detection):
            raise NoFaceFound("no face found in the image")
        return analysis

    async def verify_pair(self, first: bytes, second: bytes, timer: StageTimer,
                          policy: LivenessPolicy, decide: DecisionPolicy) -> Verification:
        spec = AnalyseSpec(embed=True, liveness=policy.checks)
        try:
            a, b = await asyncio.gather(self.analyse(first, timer, spec, policy),
                                        self.analyse(second, timer, spec, policy))
            i = single_face(a, "image1", largest=True)
            j = single_face(b, "image2", largest=True)
        except Exception as exc:
            self._count_error(exc, self.outcomes.verification)
            raise
        assert a.embeddings is not None and b.embeddings is not None
        if a.embeddings.model != b.embeddings.model:
            raise ModelMismatch("the two images were embedded by different models")
        sim = float(a.embeddings.vectors[i] @ b.embeddings.vectors[j])
        result = Verification(sim, decide, decide.decide(sim), a.embeddings.model, a, i, b, j)
        self.outcomes.verification("match" if result.match else "no_match")
        return result

    async def verify_subject(self, data: bytes, collection: Collection, subject_id: uuid.UUID,
                             timer: StageTimer, policy: LivenessPolicy, decide: DecisionPolicy) -> Verification:
        try:
            subject = await self.repo.get_subject(collection, subject_id)  # 404 before model work
            models, stored = await self.repo.subject_embeddings(collection, subject_id)
            if not len(stored):
                raise InvalidRequest(f"subject {subject_id} has no enrolled faces to verify against")
            if len(set(models)) > 1:
                raise ModelMismatch("the subject's faces were embedded by different models")
            # The probe is embedded with the stored faces' model, whatever the
            # collection lookup (cached) says: a re-embed may have just switched it.
            a = await self.analyse(data, timer, AnalyseSpec(embed=True, liveness=policy.checks, model=models[0]),
                                   policy)
            i = single_face(a, "image", largest=True)
        except Exception as exc:
            self._count_error(exc, self.outcomes.verification)
            raise
        assert a.embeddings is not None
        if any(m != a.embeddings.model for m in models):
            raise ModelMismatch("the subject's faces were embedded by another model")
        sim = float(np.max(stored @ a.embeddings.vectors[i]))
        result = Verification(sim, decide, decide.decide(sim), a.embeddings.model, a, i,
                              subject=subject, faces_compared=len(stored))
        self.outcomes.verification("match" if result.match else "no_match")
        return result

    async def _check_min_seq(self, min_seq: int, known_seq: int) -> None:
        """A min_seq no write has reached yet would wait for ever: refuse it
        before any model work. Only asks Postgres when the caller's min_seq is
        ahead of what this replica has seen itself (its own writes); with
        Postgres out of reach the matcher decides (it answers if it holds
        min_seq, else 503)."""
        if min_seq <= known_seq:
            return
        try:
            latest = await self.repo.latest_seq()
        except Exception as exc:
            if dependency_outage(exc) is None:
                raise
            return
        if min_seq > latest:
            raise InvalidRequest(f"min_seq {min_seq} is beyond the latest change in the gallery",
                                 field="min_seq")

    async def identify(self, data: bytes, collection: Collection, timer: StageTimer, *, k: int,
                       min_seq: int, policy: LivenessPolicy, decide: DecisionPolicy,
                       known_seq: int = 0, feedback_similarity: float = 0.5) -> Identification:
        """1:N search. Everything it answers (subjects, names, demotions) comes
        from the matcher's state: no database read, so identify keeps
        answering while Postgres is down."""
        await self._check_min_seq(min_seq, known_seq)
        spec = AnalyseSpec(embed=True, liveness=policy.checks,
                           match=MatchSpec(collection.id, k, min_seq, known_seq, feedback_similarity),
                           model=collection.embedder)
        try:
            analysis = await self.analyse(data, timer, spec, policy)
        except Exception as exc:
            self._count_error(exc, self.outcomes.identification)
            raise
        if not len(analysis.detection):
            raise NoFaceFound("no face found in the image")
        hits = analysis.matches.hits if analysis.matches else [[] for _ in range(len(analysis.detection))]
        vectors = analysis.embeddings.vectors if analysis.embeddings is not None else None
        faces = []
        for i in range(len(analysis.detection)):
            decision, best, candidates = decide_identity(hits[i], decide)
            demoted = [c.subject_id for c in candidates if c.demoted]
            if demoted:
                log.info("identify: demoted %s for face %d after 'not this person' feedback (collection %s)",
                         demoted, i, collection.name)
            self.outcomes.identification("match" if decision == "match" else "unknown")
            faces.append(IdentifiedFace(i, decision, best, candidates))
        if self.probes is not None and vectors is not None:
            from serve_app.telemetry import current_trace_id

            trace_id = current_trace_id()
            if trace_id:
                for i in range(len(vectors)):
                    self.probes.put(trace_id, i, vectors[i], analysis.embeddings.model)  # type: ignore[union-attr]
        seq = analysis.matches.seq if analysis.matches else 0
        return Identification(analysis, faces, collection.name, decide, seq)

    @staticmethod
    def _count_error(exc: BaseException, count: object) -> None:
        from serve_app.errors import CallerError

        # The caller's bad input is not a failed verification/identification.
        if not isinstance(exc, CallerError) and not _is_image_error(exc):
            count("error")  # type: ignore[operator]


def _is_image_error(exc: BaseException) -> bool:
    from models.images import ImageError

    return isinstance(exc, ImageError)
