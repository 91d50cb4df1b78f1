"""Detector deployment: finds faces, aligns them, cuts the crops later stages need."""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve

from models.alignment import align_faces
from models.detection import make_detector
from serve_app.messages import DetectionResult, DetectRequest
from serve_app.metrics import ServiceMetrics
from serve_app.settings import Settings
from serve_app.telemetry import now_ns, record_span

ALIGNED_SIZE = 112


@serve.deployment(name="Detector", ray_actor_options={"num_cpus": 0.5})
class Detector:
    def __init__(self, settings: Settings) -> None:
        settings.apply_models_dir()
        settings.setup_telemetry("Detector")
        self._threads = settings.inference_threads
        # One inference thread per replica: the model is not re-entrant and
        # the replica's CPU share is a fraction of a core anyway.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detect")
        self._config: dict[str, Any] = {}
        self._detector = make_detector("yunet")
        self._metrics = ServiceMetrics(settings.metrics_enabled)
        _limit_threads(self._threads)

    def reconfigure(self, config: dict[str, Any]) -> None:
        model_keys = ("detector", "score_threshold", "min_face_size", "max_side")
        if any(config.get(k) != self._config.get(k) for k in model_keys):
            kwargs = {k: config[k] for k in model_keys[1:] if k in config}
            name = config.get("detector", "yunet")
            if name == "mtcnn":
                # torch's default thread count swamps a fractional-CPU replica.
                kwargs["torch_threads"] = self._threads
            self._detector = make_detector(name, **kwargs)
        self.detect_batch.set_max_batch_size(int(config.get("max_batch_size", 8)))
        self.detect_batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.0)))
        self._config = dict(config)

    async def detect(self, request: DetectRequest) -> DetectionResult:
        return await self.detect_batch(request)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def detect_batch(self, requests: list[DetectRequest]) -> list[DetectionResult]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run_batch, requests)

    def _run_batch(self, requests: list[DetectRequest]) -> list[DetectionResult]:
        # Images differ in size, so the detector runs one image at a time; the
        # batch still saves the per-call scheduling and lets the queue drain.
        return [self._run_one(r) for r in requests]

    def _run_one(self, request: DetectRequest) -> DetectionResult:
        image = request.image
        n0, t0 = now_ns(), time.perf_counter()
        faces = self._detector.detect(image)
        n1, t1 = now_ns(), time.perf_counter()
        aligned = (
            align_faces(image, faces, ALIGNED_SIZE)
            if faces
            else np.zeros((0, ALIGNED_SIZE, ALIGNED_SIZE, 3), np.uint8)
        )
        crops = _liveness_crops(image, faces) if request.liveness_crops else None
        n2, t2 = now_ns(), time.perf_counter()
        timings = {"detect": (t1 - t0) * 1000.0, "align": (t2 - t1) * 1000.0}
        hop = record_span(request.trace, "Detector.detect", n0, n2, {"faces": len(faces)})
        record_span(hop, "detect", n0, n1)
        record_span(hop, "align", n1, n2)
        self._metrics.faces_per_image.observe(len(faces))
        self._metrics.observe_stages({"detect": timings["detect"]})
        h, w = image.shape[:2]
        return DetectionResult(
            faces=[f.to_dict() for f in faces],
            aligned=aligned,
            liveness_crops=crops,
            image_size=(w, h),
            timings_ms={k: round(v, 3) for k, v in timings.items()},
            trace=request.trace,
        )

    def ready(self) -> bool:
        return self._detector is not None


def _liveness_crops(image: np.ndarray, faces: list) -> dict[float, np.ndarray]:
    from models.liveness import LIVENESS_SPECS, liveness_crop

    out: dict[float, np.ndarray] = {}
    for scale in (spec.scale for spec in LIVENESS_SPECS):
        if faces:
            out[scale] = np.stack([liveness_crop(image, f.box, scale) for f in faces])
        else:
            out[scale] = np.zeros((0, 80, 80, 3), np.uint8)
    return out


def _limit_threads(n: int) -> None:
    import cv2

    cv2.setNumThreads(max(1, n))
