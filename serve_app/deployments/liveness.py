"""Liveness deployment: passive anti-spoofing on the detector's context crops."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve

from models.liveness import DEFAULT_LIVE_THRESHOLD, LivenessModel
from serve_app.messages import DetectionResult, LivenessResult
from serve_app.metrics import ServiceMetrics
from serve_app.settings import Settings
from serve_app.telemetry import now_ns, record_span


@serve.deployment(name="Liveness", ray_actor_options={"num_cpus": 0.3})
class Liveness:
    def __init__(self, settings: Settings) -> None:
        settings.apply_models_dir()
        settings.setup_telemetry("Liveness")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="liveness")
        self._model = LivenessModel(num_threads=settings.inference_threads)
        self._threshold = DEFAULT_LIVE_THRESHOLD
        self._metrics = ServiceMetrics(settings.metrics_enabled)

    def reconfigure(self, config: dict[str, Any]) -> None:
        threshold = float(config.get("threshold", self._threshold))
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"liveness threshold must be within [0, 1], got {threshold}")
        self._threshold = threshold
        self.check_batch.set_max_batch_size(int(config.get("max_batch_size", 32)))
        self.check_batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.0)))

    async def check(self, detection: DetectionResult) -> LivenessResult:
        return await self.check_batch(detection)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def check_batch(self, detections: list[DetectionResult]) -> list[LivenessResult]:
        counts = [len(d) for d in detections]
        n0, t0 = now_ns(), time.perf_counter()
        if sum(counts):
            crops = {}
            for d in detections:
                if d.liveness_crops is None and len(d):
                    raise ValueError("detection was made without liveness crops")
            scales = next(d.liveness_crops for d in detections if len(d)).keys()
            for scale in scales:
                crops[scale] = np.concatenate(
                    [d.liveness_crops[scale] for d in detections if len(d)]
                )
            loop = asyncio.get_running_loop()
            try:
                scores = await loop.run_in_executor(self._executor, self._model.predict, crops)
            except Exception:
                # Counted so the Liveness Failure alert sees checks that could not run.
                self._metrics.liveness_checks.inc(sum(counts), tags={"outcome": "error"})
                raise
        else:
            scores = np.zeros((0,), np.float32)
        ms = (time.perf_counter() - t0) * 1000.0
        n1 = now_ns()
        for s in scores:
            live = bool(s >= self._threshold)
            self._metrics.liveness_checks.inc(tags={"outcome": "live" if live else "spoof"})
            self._metrics.liveness_score.observe(float(s))
        if sum(counts):
            self._metrics.observe_stages({"liveness": ms})
        out, start = [], 0
        for n, det in zip(counts, detections):
            record_span(det.trace, "Liveness.check", n0, n1, {"batch.requests": len(detections)})
            out.append(
                LivenessResult(
                    scores=scores[start : start + n].astype(np.float32),
                    threshold=self._threshold,
                    timings_ms={"liveness": round(ms, 3)},
                )
            )
            start += n
        return out

    def ready(self) -> bool:
        return self._model is not None
