"""Embedder deployment: aligned crops in, L2-normalised embeddings out.

Batches are sized by faces (batch_size_fn), not by requests: a group photo
of 20 faces weighs what it costs. A request with more faces than a batch
holds is split before it enters the queue.
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
from ray import serve

from models.embedding import make_embedder
from serve_app.deployment_config import EmbedderConfig
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
        self._model = make_embedder(self._config.embedder, intra_op_threads=self._threads)
        self._stage = BatchedStage("embed", ServiceMetrics(settings.metrics_enabled), span="Embedder.embed")

    def reconfigure(self, config: dict[str, Any]) -> None:
        cfg = EmbedderConfig.model_validate(config)
        if cfg.embedder != self._config.embedder:
            kwargs = {"intra_op_threads": self._threads} if cfg.embedder == "sface" else {}
            self._model = make_embedder(cfg.embedder, **kwargs)
        self.embed_batch.set_max_batch_size(cfg.max_batch_size)
        self.embed_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._config = cfg

    def info(self) -> dict[str, Any]:
        return {"model": self._model.name, "dim": int(self._model.dim)}

    async def embed(self, detection: DetectionResult) -> EmbeddingResult:
        parts = chunk_detection(detection, self._config.max_batch_size)
        if len(parts) == 1:
            return await self.embed_batch(detection)
        done = await asyncio.gather(*(self.embed_batch(p) for p in parts))
        return EmbeddingResult(model=done[0].model, dim=done[0].dim,
                               vectors=np.concatenate([d.vectors for d in done]),
                               timings_ms={"embed": max(d.timings_ms["embed"] for d in done)},
                               trace=detection.trace)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, batch_size_fn=count_faces)
    async def embed_batch(self, detections: list[DetectionResult]) -> list[EmbeddingResult]:
        counts = [len(d.aligned) for d in detections]
        model = self._model

        def work(batch: Sequence[DetectionResult]) -> list[np.ndarray]:
            if not sum(counts):
                return [np.zeros((0, model.dim), np.float32) for _ in batch]
            return split_rows(model.embed(np.concatenate([d.aligned for d in batch if len(d.aligned)])), counts)

        vectors, ms = await self._stage.run(detections, work, faces=sum(counts), attributes={"model": model.name})
        return [
            EmbeddingResult(model=model.name, dim=int(model.dim), vectors=v,
                            timings_ms={"embed": ms}, trace=d.trace)
            for v, d in zip(vectors, detections)
        ]

    def ready(self) -> bool:
        return self._model is not None
