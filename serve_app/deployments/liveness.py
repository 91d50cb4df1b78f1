"""Liveness deployment: passive anti-spoofing on the detector's context crops.

Batched by faces like the embedder (serve_app/deployments/embedder.py); the
models run on OpenCV's DNN (models/liveness.py, runtime "opencv").
"""
from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
from ray import serve

from models.liveness import DEFAULT_LIVE_THRESHOLD, LivenessModel
from serve_app.deployment_config import LivenessConfig
from serve_app.deployments.embedder import chunk_detection, count_faces
from serve_app.messages import DetectionResult, LivenessResult
from serve_app.metrics import ServiceMetrics
from serve_app.settings import Settings
from serve_app.stage import BatchedStage, model_threads, split_rows


@serve.deployment(name="Liveness", ray_actor_options={"num_cpus": 0.3, "memory": 512 * 1024**2})
class Liveness:
    def __init__(self, settings: Settings) -> None:
        settings.apply_models_dir()
        settings.setup_telemetry("Liveness")
        threads = settings.inference_threads or model_threads()
        import cv2

        cv2.setNumThreads(threads)
        # OpenCV's DNN runs the same MiniFASNet weights (exported to ONNX in
        # memory at load) with torch's probabilities for about half its CPU
        # on these small depthwise nets (docs/BULK.md, benchmarks/bulk_worker_profile.py).
        self._model = LivenessModel(num_threads=threads, runtime="opencv")
        self._config = LivenessConfig(threshold=DEFAULT_LIVE_THRESHOLD)
        self._metrics = ServiceMetrics(settings.metrics_enabled)
        self._stage = BatchedStage("liveness", self._metrics, span="Liveness.check")

    def reconfigure(self, config: dict[str, Any]) -> None:
        cfg = LivenessConfig.model_validate(config)
        self.check_batch.set_max_batch_size(cfg.max_batch_size)
        self.check_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._config = cfg

    async def check(self, detection: DetectionResult) -> LivenessResult:
        if len(detection) and detection.liveness_crops is None:
            raise ValueError("detection was made without liveness crops")
        parts = chunk_detection(detection, self._config.max_batch_size)
        if len(parts) == 1:
            return await self.check_batch(detection)
        done = await asyncio.gather(*(self.check_batch(p) for p in parts))
        return LivenessResult(scores=np.concatenate([d.scores for d in done]), threshold=done[0].threshold,
                              timings_ms={"liveness": max(d.timings_ms["liveness"] for d in done)})

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0, batch_size_fn=count_faces)
    async def check_batch(self, detections: list[DetectionResult]) -> list[LivenessResult]:
        counts = [len(d.aligned) for d in detections]
        threshold = self._config.threshold
        model = self._model

        def work(batch: Sequence[DetectionResult]) -> list[np.ndarray]:
            with_faces = [d for d in batch if len(d.aligned)]
            if not with_faces:
                return [np.zeros((0,), np.float32) for _ in batch]
            crops = {s: np.concatenate([d.liveness_crops[s] for d in with_faces])  # type: ignore[index]
                     for s in with_faces[0].liveness_crops or {}}
            return split_rows(model.predict(crops).astype(np.float32), counts)

        try:
            scores, ms = await self._stage.run(detections, work, faces=sum(counts))
        except Exception:
            # Counted so the Liveness Failure alert sees checks that could not run.
            self._metrics.liveness_checks.inc(sum(counts), tags={"outcome": "error"})
            raise
        for part in scores:
            for s in part:
                self._metrics.liveness_checks.inc(tags={"outcome": "live" if s >= threshold else "spoof"})
                self._metrics.liveness_score.observe(float(s))
        return [LivenessResult(scores=s, threshold=threshold, timings_ms={"liveness": ms}) for s in scores]

    def ready(self) -> bool:
        return self._model is not None
