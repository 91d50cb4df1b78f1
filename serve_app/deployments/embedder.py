"""Embedder deployment: aligned crops in, L2-normalised embeddings out.

Batches are sized by faces (batch_size_fn), not by requests: a group photo
of 20 faces weighs what it costs. A request with more faces than a batch
holds is split before it enters the queue.

Each call names the model its vectors are for (the collection's; None: the
configured default). A replica loads a model the first time it is asked
for and keeps it: a collection moved to another model by the re-embed job
(serve_app/jobs/reembed.py) and the collections still on the old one are
served side by side, each probe with its own collection's model.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from ray import serve

from models.embedding import Embedder as Model
from models.embedding import make_embedder
from models.weights import WeightsError
from serve_app.deployment_config import EMBEDDER_NAMES, EmbedderConfig
from serve_app.errors import InvalidRequest, ModelUnavailable
from serve_app.messages import DetectionResult, EmbeddingResult
from serve_app.metrics import ServiceMetrics
from serve_app.settings import Settings
from serve_app.stage import BatchedStage, model_threads, split_rows


def count_faces(detections: Sequence[DetectionResult]) -> int:
    return sum(len(d.aligned) for d in detections)


def chunk_detection(det: DetectionResult, size: int) -> list[DetectionResult]:
    """The detection's faces in slices of at most ``size`` (for big groups)."""
    if len(det.aligned) <= size:
        return [det]
    return [
        DetectionResult(faces=det.faces[i : i + size], aligned=det.aligned[i : i + size],
                        liveness_crops=None if det.liveness_crops is None else
                        {s: c[i : i + size] for s, c in det.liveness_crops.items()},
                        enrol_crops=None, image_size=det.image_size, image_format=det.image_format,
                        trace=det.trace)
        for i in range(0, len(det.aligned), size)
    ]


@serve.deployment(name="Embedder", ray_actor_options={"num_cpus": 0.5, "memory": 512 * 1024**2})
class Embedder:
    def __init__(self, settings: Settings) -> None:
        settings.apply_models_dir()
        settings.setup_telemetry("Embedder")
        self._threads = settings.inference_threads or model_threads()
        self._config = EmbedderConfig()
        self._models: dict[str, Model] = {}
        self._loading = threading.Lock()  # models load in the compute thread, or here at start
        self._model = self._load(self._config.embedder)
        self._stage = BatchedStage("embed", ServiceMetrics(settings.metrics_enabled), span="Embedder.embed")

    def _load(self, name: str) -> Model:
        """The model of that name, loaded on first use and kept."""
        with self._loading:
            model = self._models.get(name)
            if model is None:
                if name not in EMBEDDER_NAMES:
                    raise InvalidRequest(f"unknown embedder {name!r}", model=name)
                kwargs = {"intra_op_threads": self._threads} if name.startswith("sface") else {}
                try:
                    model = self._models[name] = make_embedder(name, **kwargs)
                except WeightsError as exc:
                    raise ModelUnavailable(f"the {name} embedder's weights are not available: {exc}",
                                           model=name) from None
            return model

    def reconfigure(self, config: dict[str, Any]) -> None:
        cfg = EmbedderConfig.model_validate(config)
        if cfg.embedder != self._config.embedder:
            self._model = self._load(cfg.embedder)
        self.embed_batch.set_max_batch_size(cfg.max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._config = cfg

    def info(self) -> dict[str, Any]:
        """The default model (new collections get it) and every model loaded here."""
        return {"model": self._model.name, "dim": int(self._model.dim),
                "loaded": {n: int(m.dim) for n, m in self._models.items()}}

    async def embed(self, detection: DetectionResult, model: str | None = None) -> EmbeddingResult:
        """Vectors of `model` (None: the default) for each aligned face."""
        parts = chunk_detection(detection, self._config.max_batch_size)
        done = await asyncio.gather(*(self.embed_batch(p, model) for p in parts))
        for d in done:  # a batch answers a model it could not load with the error, per request
            if isinstance(d, BaseException):
                raise d
        if len(done) == 1:
            return done[0]
        return EmbeddingResult(model=done[0].model, dim=done[0].dim,
                               vectors=np.concatenate([d.vectors for d in done]),
                               timings_ms={"embed": max(d.timings_ms["embed"] for d in done)},
                               trace=detection.trace)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, batch_size_fn=count_faces)
    async def embed_batch(self, detections: list[DetectionResult],
                          names: list[str | None]) -> list[EmbeddingResult | BaseException]:
        counts = [len(d.aligned) for d in detections]
        wanted = [n or self._model.name for n in names]

        def work(batch: Sequence[DetectionResult]) -> list[tuple[Model, np.ndarray] | BaseException]:
            """One model call per model in the batch (usually one)."""
            out: list[Any] = [None] * len(batch)
            for name in dict.fromkeys(wanted):
                rows = [i for i, n in enumerate(wanted) if n == name]
                try:
                    model = self._load(name)
                except Exception as exc:  # that model's requests fail; the others are answered
                    for i in rows:
                        out[i] = exc
                    continue
                faces = [batch[i].aligned for i in rows if counts[i]]
                vecs = model.embed(np.concatenate(faces)) if faces else np.zeros((0, model.dim), np.float32)
                for i, v in zip(rows, split_rows(vecs, [counts[i] for i in rows])):
                    out[i] = (model, v)
            return out

        results, ms = await self._stage.run(detections, work, faces=sum(counts),
                                            attributes={"model": ",".join(dict.fromkeys(wanted))})
        return [
            r if isinstance(r, BaseException) else
            EmbeddingResult(model=r[0].name, dim=int(r[0].dim), vectors=r[1], timings_ms={"embed": ms}, trace=d.trace)
            for r, d in zip(results, detections)
        ]

    def ready(self) -> bool:
        return self._model is not None
