"""What travels between deployments: small dataclasses of numpy arrays.

Only the ingress ever holds the full image; the detector hands on aligned
112x112 crops (and, when liveness is asked for, two 80x80 context crops per
face), so Ray pickles kilobytes per face instead of megabytes per image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class DetectRequest:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    liveness_crops: bool = False
    trace: dict[str, str] = field(default_factory=dict)  # W3C context of the caller's span


@dataclass
class DetectionResult:
    faces: list[dict[str, Any]]  # DetectedFace.to_dict(), largest first
    aligned: np.ndarray  # (n, 112, 112, 3) uint8 RGB
    liveness_crops: dict[float, np.ndarray] | None  # scale -> (n, 80, 80, 3)
    image_size: tuple[int, int]  # (width, height)
    timings_ms: dict[str, float] = field(default_factory=dict)
    trace: dict[str, str] = field(default_factory=dict)

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


@dataclass
class MatchResult:
    hits: list[list[Hit]]  # per face, best subject first, one hit per subject
    seq: int  # change-log position the index reflected when searched
    timings_ms: dict[str, float] = field(default_factory=dict)
