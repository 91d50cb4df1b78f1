"""The whole per-image path in one process (decode -> detect -> align -> embed).

The service splits these stages across Ray Serve deployments; this in-process
version is the reference the benchmark and tests compare against.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from models.alignment import align_faces
from models.detection import DetectedFace, FaceDetector
from models.embedding import Embedder
from models.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, decode_image


@dataclass
class PipelineResult:
    faces: list[DetectedFace]
    embeddings: np.ndarray  # (N, dim) float32, row i belongs to faces[i]
    timings_ms: dict[str, float] = field(default_factory=dict)  # decode, detect, align, embed


class FacePipeline:
    def __init__(self, detector: FaceDetector, embedder: Embedder, *,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.detector = detector
        self.embedder = embedder
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def run(self, image_bytes: bytes) -> PipelineResult:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        rgb = decode_image(image_bytes, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
        t1 = time.perf_counter()
        faces = self.detector.detect(rgb)
        t2 = time.perf_counter()
        # Align straight to the embedder's network size (112 SFace, 160 FaceNet)
        # rather than resizing a 112 crop later.
        crops = align_faces(rgb, faces, self.embedder.input_size)
        t3 = time.perf_counter()
        embeddings = self.embedder.embed(crops)
        t4 = time.perf_counter()
        timings.update(decode=(t1 - t0) * 1e3, detect=(t2 - t1) * 1e3,
                       align=(t3 - t2) * 1e3, embed=(t4 - t3) * 1e3)
        return PipelineResult(faces=faces, embeddings=embeddings, timings_ms=timings)
