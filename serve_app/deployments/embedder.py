"""Embedder deployment: aligned crops in, L2-normalised embeddings out, batched."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve

from models.embedding import make_embedder
from serve_app.messages import DetectionResult, EmbeddingResult
from serve_app.metrics import ServiceMetrics
from serve_app.settings import Settings
from serve_app.telemetry import now_ns, record_span


@serve.deployment(name="Embedder", ray_actor_options={"num_cpus": 0.5})
class Embedder:
    def __init__(self, settings: Settings) -> None:
        settings.apply_models_dir()
        settings.setup_telemetry("Embedder")
        self._threads = settings.inference_threads
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._name = "sface"
        self._model = make_embedder(self._name, intra_op_threads=self._threads)
        self._metrics = ServiceMetrics(settings.metrics_enabled)

    def reconfigure(self, config: dict[str, Any]) -> None:
        name = config.get("embedder", "sface")
        if name != self._name:
            kwargs = {"intra_op_threads": self._threads} if name == "sface" else {}
            self._model = make_embedder(name, **kwargs)
            self._name = name
        self.embed_batch.set_max_batch_size(int(config.get("max_batch_size", 32)))
        self.embed_batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.0)))

    def info(self) -> dict[str, Any]:
        return {"model": self._model.name, "dim": int(self._model.dim)}

    async def embed(self, detection: DetectionResult) -> EmbeddingResult:
        return await self.embed_batch(detection)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def embed_batch(self, detections: list[DetectionResult]) -> list[EmbeddingResult]:
        counts = [len(d.aligned) for d in detections]
        loop = asyncio.get_running_loop()
        n0, t0 = now_ns(), time.perf_counter()
        if sum(counts):
            crops = np.concatenate([d.aligned for d in detections if len(d.aligned)])
            vectors = await loop.run_in_executor(self._executor, self._model.embed, crops)
        else:
            vectors = np.zeros((0, self._model.dim), np.float32)
        ms = (time.perf_counter() - t0) * 1000.0
        n1 = now_ns()
        if sum(counts):
            self._metrics.observe_stages({"embed": ms})
        batch = {"batch.requests": len(detections), "batch.faces": int(sum(counts)), "model": self._name}
        out, start = [], 0
        for n, det in zip(counts, detections):
            record_span(det.trace, "Embedder.embed", n0, n1, batch)
            out.append(
                EmbeddingResult(
                    model=self._model.name,
                    dim=int(self._model.dim),
                    vectors=vectors[start : start + n],
                    timings_ms={"embed": round(ms, 3)},
                    trace=det.trace,
                )
            )
            start += n
        return out

    def ready(self) -> bool:
        return self._model is not None
