""""Not this person": record that a probe is not subject X, and forget it again.

A probe is given as an image (embedded now) or as a face of a recent identify
answer (its trace id and face index): identify keeps the last probes it saw
in a small in-memory cache on each ingress replica, so that form works for an
hour or so on the replica that answered; the image form works everywhere.
"""
from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from serve_app.errors import InvalidRequest, ModelMismatch, NoFaceFound, ServiceUnavailable
from serve_app.gallery.repository import Collection
from serve_app.pipeline_client import AnalyseSpec
from serve_app.services.recognition import PipelinePort, single_face


class ProbeCache:
    """The last identify probes, by (trace id, face index)."""

    def __init__(self, size: int = 10_000) -> None:
        self.size = size
        self._items: OrderedDict[tuple[str, int], tuple[np.ndarray, str]] = OrderedDict()

    def put(self, trace_id: str, face: int, vector: np.ndarray, model: str) -> None:
        self._items[(trace_id, face)] = (np.asarray(vector, np.float32).copy(), model)
        self._items.move_to_end((trace_id, face))
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def get(self, trace_id: str, face: int) -> tuple[np.ndarray, str] | None:
        return self._items.get((trace_id, face))


class FeedbackRepo(Protocol):
    async def add_feedback(self, collection: Collection, subject_id: uuid.UUID, embedding: np.ndarray, *,
                           model: str, source: str, actor: str, note: str = "") -> dict[str, Any]: ...
    async def list_feedback(self, collection: Collection, subject_id: uuid.UUID | None = None,
                            limit: int = 100) -> list[dict[str, Any]]: ...
    async def delete_feedback(self, collection: Collection, feedback_id: int) -> int: ...


class FeedbackService:
    def __init__(self, pipeline: PipelinePort, repo: FeedbackRepo, probes: ProbeCache,
                 saw: Callable[[int], None] | None = None) -> None:
        self.pipeline = pipeline
        self.repo = repo
        self.probes = probes
        # Reports reach identify through the matchers' change log; telling the
        # gallery service the seq makes this replica's next identify wait for it.
        self.saw = saw or (lambda seq: None)

    async def report(self, collection: Collection, subject_id: uuid.UUID, *, actor: str, note: str = "",
                     image: bytes | None = None, trace_id: str | None = None, face: int = 0) -> dict[str, Any]:
        if image is not None:
            analysis = await self.pipeline.analyse(image, AnalyseSpec(embed=True, model=collection.embedder))
            i = single_face(analysis, "image", largest=True)
            assert analysis.embeddings is not None
            vector, model, source = analysis.embeddings.vectors[i], analysis.embeddings.model, "image"
        elif trace_id:
            found = self.probes.get(trace_id, face)
            if found is None:
                raise NoFaceFound(f"no recent identify probe {trace_id}#{face} on this replica; send the image "
                                  "instead", trace_id=trace_id, face=face)
            (vector, model), source = found, f"trace:{trace_id}#{face}"
        else:
            raise InvalidRequest("send the probe image, or the trace_id (and face) of the identify answer")
        if model != collection.embedder:  # an answer from before the collection was re-embedded
            raise ModelMismatch(f"that probe is a {model} vector; collection {collection.name!r} now holds "
                                f"{collection.embedder} embeddings: send the image instead", model=model)
        try:
            made = await self.repo.add_feedback(collection, subject_id, vector, model=model, source=source,
                                                actor=actor, note=note)
        except Exception as exc:
            if getattr(exc, "sqlstate", None) != "40001":  # the database's "one model per collection" check
                raise
            raise ServiceUnavailable("the collection was just moved to another model; retry",
                                     retry_after_s=1, reason="model_changed") from None
        self.saw(int(made["seq"]))
        return made

    async def list(self, collection: Collection, subject_id: uuid.UUID | None) -> list[dict[str, Any]]:
        return await self.repo.list_feedback(collection, subject_id)

    async def delete(self, collection: Collection, feedback_id: int) -> None:
        self.saw(await self.repo.delete_feedback(collection, feedback_id))
