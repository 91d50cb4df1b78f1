"""Detector deployment: compressed bytes in, faces and their crops out.

It decodes each upload already reduced to the working size (JPEG draft,
streamed shrink for big non-JPEGs; models/working_image.py), finds the
faces there, and cuts what later stages need from the best pixels it has
(serve_app/face_crops.py): aligned 112x112 crops, liveness context crops,
enrolment JPEGs. Only those crops leave this replica.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from ray import serve

from models.detection import DetectedFace, make_detector
from models.working_image import decode_working
from serve_app.deployment_config import DetectorConfig
from serve_app.face_crops import ALIGNED_SIZE, cut_face
from serve_app.messages import DetectionResult, DetectRequest, FaceInfo
from serve_app.metrics import ServiceMetrics
from serve_app.settings import Settings
from serve_app.stage import BatchedStage, model_threads


@serve.deployment(name="Detector", ray_actor_options={"num_cpus": 0.5, "memory": 1024**3})
class Detector:
    def __init__(self, settings: Settings) -> None:
        settings.apply_models_dir()
        settings.setup_telemetry("Detector")
        self._threads = settings.inference_threads or model_threads()
        self._metrics = ServiceMetrics(settings.metrics_enabled)
        # One executor thread: decodes are serialised too, which bounds the
        # replica's decode memory to one image's worth (see ARCHITECTURE.md).
        self._stage = BatchedStage("detect", self._metrics, span="Detector.detect")
        self._config = DetectorConfig()
        self._detector = self._make(self._config)
        _limit_threads(self._threads)

    def _make(self, cfg: DetectorConfig) -> Any:
        kwargs: dict[str, Any] = {"score_threshold": cfg.score_threshold,
                                  "min_face_size": cfg.min_face_size, "max_side": cfg.max_side}
        if cfg.detector == "mtcnn":
            kwargs["torch_threads"] = self._threads  # torch's default swamps a fractional CPU
        return make_detector(cfg.detector, **kwargs)

    def reconfigure(self, config: dict[str, Any]) -> None:
        cfg = DetectorConfig.model_validate(config)
        model_keys = ("detector", "score_threshold", "min_face_size", "max_side")
        if any(getattr(cfg, k) != getattr(self._config, k) for k in model_keys):
            self._detector = self._make(cfg)
        self.detect_batch.set_max_batch_size(cfg.max_batch_size)
        self.detect_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._config = cfg

    async def detect(self, request: DetectRequest) -> DetectionResult:
        result = await self.detect_batch(request)
        if isinstance(result, BaseException):
            raise result  # this request's own bad input; the batch's others are unaffected
        return result

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def detect_batch(self, requests: list[DetectRequest]) -> list[DetectionResult | Exception]:
        results, _ = await self._stage.run(requests, self._run_batch)
        return results

    def _run_batch(self, requests: Sequence[DetectRequest]) -> list[DetectionResult | Exception]:
        # Images differ in size, so they run one at a time; the batch still
        # saves the per-call scheduling and lets the queue drain.
        out: list[DetectionResult | Exception] = []
        for request in requests:
            try:
                out.append(self._run_one(request))
            except ValueError as exc:  # undecodable or refused input: the caller's error
                out.append(exc)
        return out

    def _run_one(self, request: DetectRequest) -> DetectionResult:
        cfg = self._config
        t0 = time.perf_counter()
        work = decode_working(request.data, max_side=cfg.max_side, max_bytes=cfg.max_image_bytes,
                              max_pixels=cfg.max_image_pixels, full_decode_bytes=cfg.full_decode_bytes)
        t1 = time.perf_counter()
        found = self._detector.detect(work.pixels)
        t2 = time.perf_counter()
        inv = 1.0 / work.scale
        faces = [
            DetectedFace(tuple(float(v) * inv for v in f.box), f.landmarks * np.float32(inv), f.score)  # type: ignore[arg-type]
            for f in found
        ]
        opts = request.options
        crops = [cut_face(work, f, liveness=opts.liveness_crops, enrol=opts.enrol_crops) for f in faces]
        t3 = time.perf_counter()
        self._metrics.faces_per_image.observe(len(faces))
        self._metrics.observe_stages({"decode": (t1 - t0) * 1000.0})
        aligned = (np.stack([c.aligned for c in crops]) if crops
                   else np.zeros((0, ALIGNED_SIZE, ALIGNED_SIZE, 3), np.uint8))
        liveness = None
        if opts.liveness_crops:
            from models.liveness import LIVENESS_SPECS

            liveness = {
                s.scale: (np.stack([c.liveness[s.scale] for c in crops if c.liveness]) if crops
                          else np.zeros((0, 80, 80, 3), np.uint8))
                for s in LIVENESS_SPECS
            }
        return DetectionResult(
            faces=[FaceInfo(f.box, f.landmarks, float(f.score)) for f in faces],
            aligned=aligned,
            liveness_crops=liveness,
            enrol_crops=[c.enrol_jpeg for c in crops if c.enrol_jpeg is not None] if opts.enrol_crops else None,
            image_size=work.original_size,
            image_format=work.format,
            timings_ms={"decode": (t1 - t0) * 1000.0, "detect": (t2 - t1) * 1000.0,
                        "align": (t3 - t2) * 1000.0},
            trace=request.trace,
        )

    def ready(self) -> bool:
        return self._detector is not None


def _limit_threads(n: int) -> None:
    import cv2

    cv2.setNumThreads(max(1, n))
