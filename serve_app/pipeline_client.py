"""The ingress's view of the model graph: one call runs detect -> (embed, liveness) -> match.

DeploymentResponses are passed straight into the next handle call, so the
embedder, liveness and matcher start as soon as their inputs exist and the
ingress only awaits what it needs. Liveness and embedding run concurrently
on the same detection.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
from ray.serve.handle import DeploymentHandle

from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from models.errors import InvalidRequest, ServiceUnavailable
from serve_app.http_errors import unwrap
from serve_app.telemetry import carrier_from_current
from serve_app.messages import (
    DetectionResult,
    DetectRequest,
    EmbeddingResult,
    LivenessResult,
    MatchResult,
)


_REPLICA_LOST = (ActorDiedError, ActorUnavailableError, NodeDiedError)
_OVERLOADED = (BackPressureError, DeploymentUnavailableError)


class LivenessPolicy(str, Enum):
    OFF = "off"
    FLAG = "flag"
    BLOCK = "block"

    @classmethod
    def parse(cls, value: Any, default: "LivenessPolicy") -> "LivenessPolicy":
        if value is None or value == "":
            return default
        try:
            return cls(str(value).lower())
        except ValueError:
            raise InvalidRequest(
                f"liveness must be one of off, flag, block; got {value!r}", field="liveness"
            ) from None


@dataclass
class Analysis:
    detection: DetectionResult
    embeddings: EmbeddingResult | None
    liveness: LivenessResult | None
    matches: MatchResult | None

    def timings(self) -> dict[str, float]:
        out: dict[str, float] = dict(self.detection.timings_ms)
        for part in (self.embeddings, self.liveness, self.matches):
            if part is not None:
                out.update(part.timings_ms)
        return out


@dataclass
class MatchSpec:
    collection_id: int
    k: int
    min_seq: int = 0


class PipelineClient:
    def __init__(
        self,
        detector: DeploymentHandle,
        embedder: DeploymentHandle,
        liveness: DeploymentHandle,
        matcher: DeploymentHandle,
    ) -> None:
        self.detector = detector
        self.embedder = embedder
        self.liveness = liveness
        self.matcher = matcher

    async def analyse(
        self,
        image: np.ndarray,
        *,
        embed: bool,
        liveness: bool,
        match: MatchSpec | None = None,
    ) -> Analysis:
        """Run the graph once; if a replica dies under the call, run it once more.

        Every stage is a pure read, so a retry is safe; the router sends it to
        a live replica. A second loss (or a saturated deployment) is a 503.
        """
        for attempt in (1, 2):
            try:
                return await self._analyse_once(image, embed=embed, liveness=liveness, match=match)
            except _REPLICA_LOST as exc:
                if attempt == 2:
                    raise ServiceUnavailable(
                        "a model replica was lost while answering; retry shortly",
                        reason=type(exc).__name__,
                    ) from None
            except _OVERLOADED as exc:
                raise ServiceUnavailable(
                    "the service is at capacity; retry shortly", reason=type(exc).__name__
                ) from None
        raise AssertionError("unreachable")

    async def _analyse_once(
        self,
        image: np.ndarray,
        *,
        embed: bool,
        liveness: bool,
        match: MatchSpec | None,
    ) -> Analysis:
        request = DetectRequest(image=image, liveness_crops=liveness, trace=carrier_from_current())
        det_resp = self.detector.detect.remote(request)
        emb_resp = self.embedder.embed.remote(det_resp) if (embed or match) else None
        live_resp = self.liveness.check.remote(det_resp) if liveness else None
        match_resp = (
            self.matcher.search.remote(emb_resp, match.collection_id, match.k, match.min_seq)
            if match is not None and emb_resp is not None
            else None
        )
        pending = [r for r in (det_resp, emb_resp, live_resp, match_resp) if r is not None]
        try:
            results = await asyncio.gather(*pending)
        except Exception as exc:
            # A bad input found downstream is still the caller's 4xx.
            inner = unwrap(exc)
            if inner is not exc:
                raise inner from None
            raise
        it = iter(results)
        detection = next(it)
        return Analysis(
            detection=detection,
            embeddings=next(it) if emb_resp is not None else None,
            liveness=next(it) if live_resp is not None else None,
            matches=next(it) if match_resp is not None else None,
        )

    async def ready(self) -> dict[str, bool]:
        names = ("detector", "embedder", "liveness", "matcher")
        handles = (self.detector, self.embedder, self.liveness, self.matcher)
        results = await asyncio.gather(
            *(asyncio.wait_for(_ready(h), 5.0) for h in handles), return_exceptions=True
        )
        return {n: r is True for n, r in zip(names, results)}


async def _ready(handle: DeploymentHandle) -> bool:
    return bool(await handle.ready.remote())
