"""The ingress's view of the model graph: one call runs detect -> (embed, liveness) -> match.

The upload's compressed bytes go to the detector; DeploymentResponses are
passed straight into the next handle call, so the embedder, liveness and
matcher start as soon as their inputs exist and only crops and vectors
cross processes. Every call has a deadline: past it, or when a deployment's
queue is full, the answer is a fast 503 (ServiceUnavailable), never a
growing wait.

With several matcher shards (serve_app/graph.py) a search goes to every
shard at once and their answers are merged (serve_app/gallery/shards.py);
the search waits for all of them, so a shard that is down or full makes the
whole answer a 503 with Retry-After, never a partial one.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from models.images import ImageError
from serve_app.errors import ServiceError, ServiceUnavailable
from serve_app.gallery.shards import merge_results
from serve_app.messages import (
    DetectionResult,
    DetectOptions,
    DetectRequest,
    EmbeddingResult,
    LivenessResult,
    MatchResult,
)
from serve_app.telemetry import carrier_from_current

_REPLICA_LOST = (ActorDiedError, ActorUnavailableError, NodeDiedError)
_OVERLOADED = (BackPressureError, DeploymentUnavailableError)
T = TypeVar("T")


@dataclass
class Analysis:
    detection: DetectionResult
    embeddings: EmbeddingResult | None
    liveness: LivenessResult | None
    matches: MatchResult | None
    cache_key: str | None = None  # the embedding-cache entry it was read from or written to

    def timings(self) -> dict[str, float]:
        out: dict[str, float] = dict(self.detection.timings_ms)
        for part in (self.embeddings, self.liveness, self.matches):
            if part is not None:
                out.update(part.timings_ms)
        return out


@dataclass(frozen=True)
class MatchSpec:
    collection_id: int
    k: int
    min_seq: int = 0  # the caller's read-your-writes: reached, or 400/503
    known_seq: int = 0  # this ingress's own newest write: reached when the log can be read
    feedback_similarity: float | None = None  # mark candidates reported "not this person" this close


@dataclass(frozen=True)
class AnalyseSpec:
    embed: bool = False
    liveness: bool = False
    enrol_crops: bool = False
    match: MatchSpec | None = None
    # The embedder the vectors are for: the collection's (None: the default,
    # e.g. verify of two images). Probes are compared with one model's only.
    model: str | None = None


def unwrap(exc: BaseException) -> BaseException:
    """The error raised inside another deployment, out of Ray's RayTaskError
    (whose ``cause`` is the original exception object)."""
    cur: BaseException | None = exc
    for _ in range(6):
        if cur is None:
            break
        cause = getattr(cur, "cause", None) if isinstance(cur, RayTaskError) else None
        if cause is not None:
            cur = cause
            continue
        if isinstance(cur, (ServiceError, ImageError)):
            return cur
        cur = cur.__cause__
    return exc


class PipelineClient:
    def __init__(
        self,
        detector: DeploymentHandle,
        embedder: DeploymentHandle,
        liveness: DeploymentHandle,
        matcher: DeploymentHandle | list[DeploymentHandle],
        *,
        timeout_s: float = 10.0,
        retry_after_s: int = 1,
    ) -> None:
        self.detector = detector
        self.embedder = embedder
        self.liveness = liveness
        # One handle per matcher shard (one: the whole gallery).
        self.matchers: list[DeploymentHandle] = list(matcher) if isinstance(matcher, (list, tuple)) else [matcher]
        if not self.matchers:
            raise ValueError("no matcher deployment")
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s

    async def analyse(self, data: bytes, spec: AnalyseSpec) -> Analysis:
        """Run the graph once; if a replica dies under the call, run it once more.

        Every stage is a pure read, so a retry is safe; the router sends it to
        a live replica. A second loss, a full queue or the deadline is a 503.
        """
        return await self._once_more_on_loss(lambda: self._analyse_once(data, spec))

    async def _once_more_on_loss(self, call: Callable[[], Awaitable[T]]) -> T:
        """call(), again once if a replica died under it; a second loss or a
        full queue is a 503 with Retry-After."""
        for attempt in (1, 2):
            try:
                return await call()
            except _REPLICA_LOST as exc:
                if attempt == 2:
                    raise ServiceUnavailable(
                        "a model replica was lost while answering; retry shortly",
                        retry_after_s=self.retry_after_s, reason=type(exc).__name__,
                    ) from None
            except _OVERLOADED as exc:
                raise ServiceUnavailable(
                    "the service is at capacity; retry shortly",
                    retry_after_s=self.retry_after_s, reason=type(exc).__name__,
                ) from None
        raise AssertionError("unreachable")

    async def _analyse_once(self, data: bytes, spec: AnalyseSpec) -> Analysis:
        request = DetectRequest(
            data=data,
            options=DetectOptions(liveness_crops=spec.liveness, enrol_crops=spec.enrol_crops),
            trace=carrier_from_current(),
        )
        det = self.detector.detect.remote(request)
        emb = self.embedder.embed.remote(det, spec.model) if (spec.embed or spec.match) else None
        live = self.liveness.check.remote(det) if spec.liveness else None
        match = (
            self._search_remote(emb, spec.match)
            if spec.match is not None and emb is not None
            else None
        )
        pending: list[DeploymentResponse] = [r for r in (det, emb, live) if r is not None] + (match or [])
        try:
            results = await asyncio.wait_for(asyncio.gather(*pending), self.timeout_s)
        except asyncio.TimeoutError:
            for r in pending:
                r.cancel()
            raise ServiceUnavailable(
                f"no answer within {self.timeout_s:g} s; the service is overloaded, retry shortly",
                retry_after_s=self.retry_after_s, reason="deadline",
            ) from None
        except RequestCancelledError:
            raise ServiceUnavailable("the request was cancelled", retry_after_s=self.retry_after_s) from None
        except Exception as exc:
            for r in pending:
                r.cancel()
            # A bad input found downstream is still the caller's 4xx.
            inner = unwrap(exc)
            if inner is not exc:
                raise inner from None
            raise
        it = iter(results)
        return Analysis(
            detection=next(it),
            embeddings=next(it) if emb is not None else None,
            liveness=next(it) if live is not None else None,
            matches=merge_results(list(it), spec.match.k) if match is not None and spec.match else None,
        )

    async def search(self, embeddings: EmbeddingResult, match: MatchSpec) -> MatchResult:
        """The matcher alone, for vectors the ingress already holds (an
        embedding-cache hit): the same deadline, one retry on a lost replica
        and the same 503s as analyse()."""
        return await self._once_more_on_loss(lambda: self._search_once(embeddings, match))

    async def _search_once(self, embeddings: EmbeddingResult, match: MatchSpec) -> MatchResult:
        responses = self._search_remote(embeddings, match)
        try:
            results = await asyncio.wait_for(asyncio.gather(*responses), self.timeout_s)
            return merge_results(list(results), match.k)
        except asyncio.TimeoutError:
            for r in responses:
                r.cancel()
            raise ServiceUnavailable(
                f"no answer within {self.timeout_s:g} s; the service is overloaded, retry shortly",
                retry_after_s=self.retry_after_s, reason="deadline",
            ) from None
        except RequestCancelledError:
            raise ServiceUnavailable("the request was cancelled", retry_after_s=self.retry_after_s) from None
        except (*_REPLICA_LOST, *_OVERLOADED):
            for r in responses:
                r.cancel()
            raise  # _once_more_on_loss decides
        except Exception as exc:
            for r in responses:
                r.cancel()
            inner = unwrap(exc)  # min_seq refused by the matcher is still the caller's 4xx
            if inner is not exc:
                raise inner from None
            raise

    def _search_remote(self, embeddings: Any, match: MatchSpec) -> list[DeploymentResponse]:
        """Every shard's search, sent at once; embeddings: an EmbeddingResult
        or the embedder's response. Each shard answers its own top-k subjects
        per face (merge_results makes them one answer); min_seq holds per
        shard, as each follows the same log."""
        return [m.search.remote(embeddings, match.collection_id, match.k, match.min_seq,
                                match.known_seq, match.feedback_similarity) for m in self.matchers]

    async def model_parts(self) -> tuple[str, str]:
        """(detector config identity, embedder model name): what cached results are keyed by."""
        det, info = await asyncio.gather(self.detector.identity.remote(), self.embedder.info.remote())
        return str(det), str(info["model"])

    async def embedder_info(self) -> dict[str, Any]:
        return await self.embedder.info.remote()

    async def ready(self) -> dict[str, bool]:
        """Each deployment's readiness; with shards "matcher" is all of them
        and "matcher-<s>" each one (identify needs every shard)."""
        names = ["detector", "embedder", "liveness"]
        handles = [self.detector, self.embedder, self.liveness, *self.matchers]
        if len(self.matchers) > 1:
            names += [f"matcher-{s}" for s in range(len(self.matchers))]
        else:
            names.append("matcher")
        results = await asyncio.gather(
            *(asyncio.wait_for(_ready(h), 5.0) for h in handles), return_exceptions=True
        )
        checks = {n: r is True for n, r in zip(names, results)}
        if len(self.matchers) > 1:
            checks["matcher"] = all(checks[f"matcher-{s}"] for s in range(len(self.matchers)))
        return checks


async def _ready(handle: DeploymentHandle) -> bool:
    return bool(await handle.ready.remote())
