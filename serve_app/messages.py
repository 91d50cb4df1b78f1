"""What travels between deployments: small typed dataclasses.

The ingress sends the detector the *compressed* bytes (DetectRequest). The
detector decodes them reduced, and hands on aligned 112x112 crops, the
liveness context crops and, for enrolment, one JPEG crop per face, so Ray
pickles kilobytes per face instead of megabytes per image. Values keep full
precision here; rounding happens only at the HTTP edge.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in original-image pixels


@dataclass(frozen=True)
class DetectOptions:
    liveness_crops: bool = False
    enrol_crops: bool = False  # a JPEG of each face (with margin) for storage


@dataclass
class DetectRequest:
    data: bytes  # the upload as received: JPEG/PNG/... bytes, never decoded pixels
    options: DetectOptions = DetectOptions()
    trace: dict[str, str] = field(default_factory=dict)  # W3C context of the caller's span


@dataclass
class FaceInfo:
    box: Box
    landmarks: np.ndarray  # (5, 2) float32, ArcFace order, original pixels
    score: float
    quality: dict[str, object] | None = None  # score + reasons, when the detector computes them


@dataclass
class DetectionResult:
    faces: list[FaceInfo]  # largest first
    aligned: np.ndarray  # (n, 112, 112, 3) uint8 RGB
    liveness_crops: dict[float, np.ndarray] | None  # scale -> (n, 80, 80, 3) BGR
    enrol_crops: list[bytes] | None  # JPEG per face
    image_size: tuple[int, int]  # (width, height), after EXIF orientation
    image_format: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    trace: dict[str, str] = field(default_factory=dict)
    # The detector options it was made with (embedding_cache.detector_identity):
    # the embedding cache keys results by it.
    config_id: str = ""

    def __len__(self) -> int:
        return len(self.faces)


@dataclass
class EmbeddingResult:
    model: str
    dim: int
    vectors: np.ndarray  # (n, dim) float32, L2-normalised
    timings_ms: dict[str, float] = field(default_factory=dict)
    trace: dict[str, str] = field(default_factory=dict)


@dataclass
class LivenessResult:
    scores: np.ndarray  # (n,) live probability
    threshold: float
    timings_ms: dict[str, float] = field(default_factory=dict)

    def live(self) -> list[bool]:
        return [bool(s >= self.threshold) for s in self.scores]


@dataclass
class Hit:
    subject_id: str
    face_id: int
    similarity: float
    # What identify answers with, from the matcher's own state (kept by the
    # change log), so identify needs no database read: the subject's name,
    # and whether the probe is close to one reported "not this person".
    name: str | None = None
    demoted: bool = False


@dataclass
class MatchResult:
    hits: list[list[Hit]]  # per face, best subject first, one hit per subject
    seq: int  # change-log position the index reflected when searched
    timings_ms: dict[str, float] = field(default_factory=dict)
