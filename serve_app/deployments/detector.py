"""Detector deployment: compressed bytes in, faces and their crops out.

It decodes each upload already reduced to the working size (JPEG draft,
streamed shrink for big non-JPEGs; models/working_image.py), finds the
faces there, and cuts what later stages need from the best pixels it has
(serve_app.detection_path.py): aligned 112x112 crops, liveness context crops,
enrolment JPEGs. Only those crops leave this replica.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ray import serve

from models.detection import make_detector
from serve_app.deployment_config import DetectorConfig
from serve_app.detection_path import run_detection
from serve_app.embedding_cache import detector_identity
from serve_app.messages import DetectionResult, DetectRequest
from serve_app.metrics import ServiceMetrics
from serve_app.settings import Settings
from serve_app.stage import BatchedStage, model_threads
from serve_app.telemetry import now_ns, record_span


@serve.deployment(name="Detector", ray_actor_options={"num_cpus": 0.5, "memory": 1024**3})
class Detector:
    def __init__(self, settings: Settings) -> None:
        settings.apply_models_dir()
        settings.setup_telemetry("Detector")
        self._threads = settings.inference_threads or model_threads()
        self._metrics = ServiceMetrics(settings.metrics_enabled)
        # One executor thread: decodes are serialised too, which bounds the
        # replica's decode memory to one image's worth (see ARCHITECTURE.md).
        # Spans are recorded per image in _run_one (decode/detect/align under the hop).
        self._stage = BatchedStage("detect", self._metrics, span=None)
        self._config = DetectorConfig()
        self._identity = detector_identity(self._config)
        self._detector = self._make(self._config)
        self._relandmarker: Any = None
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
        if cfg.relandmark != "never" and (self._relandmarker is None or self._relandmarker.policy != cfg.relandmark):
            from models.alignment import Relandmarker
            from models.detection import MTCNNDetector

            self._relandmarker = Relandmarker(MTCNNDetector(torch_threads=self._threads), policy=cfg.relandmark)
        elif cfg.relandmark == "never":
            self._relandmarker = None
        self.detect_batch.set_max_batch_size(cfg.max_batch_size)
        self.detect_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._config = cfg
        self._identity = detector_identity(cfg)

    def identity(self) -> str:
        """The options that shape results (the embedding cache's key part)."""
        return self._identity

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
        n0 = now_ns()
        result = run_detection(self._detector, request.data, self._config, request.options, request.trace,
                               self._relandmarker)
        result.config_id = self._identity
        _record_spans(request.trace, n0, now_ns(), result)
        self._metrics.faces_per_image.observe(len(result))
        self._metrics.observe_stages({"decode": result.timings_ms["decode"]})
        return result

    def ready(self) -> bool:
        return self._detector is not None


def _record_spans(trace: dict[str, str], n0: int, n1: int, result: DetectionResult) -> None:
    if not trace:
        return
    hop = record_span(trace, "Detector.detect", n0, n1, {"faces": len(result), "format": result.image_format})
    start = n0
    for stage in ("decode", "detect", "align"):
        end = start + int(result.timings_ms.get(stage, 0.0) * 1e6)
        record_span(hop, stage, start, end)
        start = end


def _limit_threads(n: int) -> None:
    import cv2

    cv2.setNumThreads(max(1, n))
