"""Per-face quality: a score in [0, 1] and the reasons a face is a poor sample.

Cheap enough to run on every detected face in the detector: everything is
measured on the face normalised by its 5 landmarks (the same similarity warp
the embedder's crop uses, at 64 px instead of 112), plus a few numbers from
the landmarks themselves. Pure numpy/cv2, no model.

Each check maps its measure to a sub-score that is exactly 0.5 at its bar and
1.0 when comfortably good; the face's score is the worst sub-score. So
``score < 0.5`` exactly when there is at least one reason, and an enrolment
bar of 0.5 means "no reasons"; a stricter bar (0.6-0.7) also asks for margin.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from models.alignment import ARCFACE_TEMPLATE_112, similarity_transform

if TYPE_CHECKING:
    from models.detection import DetectedFace

REASONS: tuple[str, ...] = ("too_small", "blurred", "too_dark", "too_bright", "strong_pose",
                            "partly_outside", "low_detection_score")

# The normalised face: the ArcFace framing at this size. The measures below
# use its central part (brows to chin, cheek to cheek), not hair or background.
_NORM = 64
_INNER = (slice(18, 60), slice(12, 52))  # rows, cols of the 64 px crop
_TEMPLATE = ARCFACE_TEMPLATE_112 * (_NORM / 112.0)
# On the template: nose below the eye line as a fraction of the mouth's depth.
_TEMPLATE_NOSE_DEPTH = float((ARCFACE_TEMPLATE_112[2, 1] - ARCFACE_TEMPLATE_112[:2, 1].mean())
                             / (ARCFACE_TEMPLATE_112[3:, 1].mean() - ARCFACE_TEMPLATE_112[:2, 1].mean()))


@dataclass(frozen=True)
class QualityBars:
    """Where each reason starts. Measured on ../shared/faces and degraded
    copies of them (docs/ACCURACY.md); lives in the Detector's user_config."""

    # Side of the image region that becomes the aligned crop (landmark-derived,
    # so it does not shrink when the box is clipped); ~1.45x YuNet's box
    # width. The test photos' faces: 78 (obama_240p) to 580.
    min_face_px: float = 48.0
    # Laplacian energy of the normalised face relative to its contrast. Test
    # photos: 1.47-4.81; Gaussian blur of sigma 2 % / 3 % / 5 % of face_px
    # brings them to 0.47-1.17 / 0.28-0.72 / 0.14-0.49.
    min_sharpness: float = 0.6
    # Mean luma (0-255) of the inner face. Test photos: 79-193.
    min_brightness: float = 45.0
    max_brightness: float = 215.0
    # In-plane tilt of the eye line, degrees.
    max_roll_deg: float = 35.0
    # Nose offset from the eye midline, in half eye distances (0 frontal, 1
    # nose under an eye). Test photos: 0.0-0.43, and 0.81 for a child looking
    # down and aside.
    max_yaw: float = 0.6
    # Nose depth below the eye line relative to the template's (1 frontal;
    # <1 head up, >1 head down). YuNet's points on the test photos: 1.03-1.30.
    pitch_range: tuple[float, float] = (0.55, 1.6)
    # Fraction of the aligned crop's area that lies outside the image
    # (obama_partial_face.jpg: 0.28; every other test photo <= 0.02).
    max_outside_fraction: float = 0.12
    # YuNet on the test photos: 0.89-0.95 (MTCNN's final stage already keeps >= 0.9).
    min_detection_score: float = 0.8

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            values = value if isinstance(value, tuple) else (value,)
            if not all(isinstance(v, (int, float)) and np.isfinite(v) and v >= 0 for v in values):
                raise ValueError(f"quality bar {f.name} must be finite and >= 0, got {value!r}")
        if not self.min_brightness < self.max_brightness:
            raise ValueError("min_brightness must be below max_brightness")
        lo, hi = self.pitch_range
        if not 0 < lo < 1 < hi:
            raise ValueError(f"pitch_range must satisfy 0 < low < 1 < high, got {self.pitch_range}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> QualityBars:
        """From user_config; unknown keys are an error (a typo would otherwise be silently ignored)."""
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown quality bars {unknown}; known: {sorted(known)}")
        if "pitch_range" in data:
            pr = data["pitch_range"]
            if not isinstance(pr, (list, tuple)) or len(pr) != 2:
                raise ValueError(f"pitch_range must be [low, high], got {pr!r}")
            data["pitch_range"] = (float(pr[0]), float(pr[1]))
        try:
            return cls(**{k: (float(v) if k != "pitch_range" else v) for k, v in data.items()})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad quality bars: {exc}") from None


@dataclass(frozen=True)
class FaceQuality:
    score: float  # in [0, 1]; < 0.5 exactly when reasons is not empty
    reasons: tuple[str, ...]  # subset of REASONS, in REASONS order
    measures: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"score": round(self.score, 3), "reasons": list(self.reasons),
                "measures": {k: round(v, 3) for k, v in self.measures.items()}}


def _higher_is_better(value: float, bar: float, good: float) -> float:
    """0.5 at bar, 1 at good (> bar), 0 at bar - (good - bar)."""
    if good <= bar:  # a zero bar: no ramp, just the side of the bar
        return 1.0 if value >= bar else 0.0
    return float(np.clip(0.5 + 0.5 * (value - bar) / (good - bar), 0.0, 1.0))


def _lower_is_better(value: float, bar: float, good: float) -> float:
    return _higher_is_better(-value, -bar, -good)


def _pose(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(roll degrees, yaw proxy, pitch proxy) from the 5 points."""
    re, le, nose, rm, lm = landmarks.astype(np.float64)
    eye_vec = le - re
    eye_dist = float(np.hypot(*eye_vec))
    if eye_dist < 1e-6:
        return 0.0, 1e3, 1.0
    roll = float(np.degrees(np.arctan2(eye_vec[1], eye_vec[0])))
    # Rotate so the eye line is horizontal, then measure in eye distances.
    c, s = eye_vec / eye_dist
    rot = np.array([[c, s], [-s, c]])
    eyes_mid = (re + le) / 2
    n = rot @ (nose - eyes_mid)
    mouth = rot @ ((rm + lm) / 2 - eyes_mid)
    yaw = abs(float(n[0])) / (eye_dist / 2)
    pitch = float(n[1] / mouth[1]) / _TEMPLATE_NOSE_DEPTH if mouth[1] > 1e-6 else 1e3
    return roll, yaw, pitch


def assess_face(rgb: np.ndarray, landmarks: np.ndarray, detection_score: float,
                bars: QualityBars = QualityBars()) -> FaceQuality:
    """Quality of the face with these 5 landmarks (ArcFace order) in an RGB uint8 image."""
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {getattr(rgb, 'shape', type(rgb))}")
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    if not np.all(np.isfinite(pts)):
        raise ValueError("landmarks contain NaN/inf")
    h, w = rgb.shape[:2]
    m = similarity_transform(pts, _TEMPLATE)  # image -> normalised crop
    scale = float(np.hypot(m[0, 0], m[1, 0]))
    face_px = _NORM / scale if scale > 0 else 0.0

    # Outside fraction: warp a mask of the image into the crop frame.
    inside = cv2.warpAffine(np.full((h, w), 255, np.uint8), m, (_NORM, _NORM), flags=cv2.INTER_NEAREST,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    outside = 1.0 - float(np.count_nonzero(inside)) / inside.size

    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    # INTER_AREA is not available for warps: shrink first when the face is much
    # larger than the crop, so the sharpness measure sees the face, not aliasing.
    shrink = 1.0
    if face_px > 2 * _NORM:
        shrink = (2 * _NORM) / face_px
        grey = cv2.resize(grey, (max(1, round(w * shrink)), max(1, round(h * shrink))), interpolation=cv2.INTER_AREA)
        m = similarity_transform(pts * shrink, _TEMPLATE)
    crop = cv2.warpAffine(grey, m, (_NORM, _NORM), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inner = crop[_INNER].astype(np.float32)
    brightness = float(inner.mean())
    contrast = float(inner.std())
    lap = cv2.Laplacian(inner, cv2.CV_32F, ksize=3)[1:-1, 1:-1]
    sharpness = float(lap.std()) / max(contrast, 4.0)  # contrast floor: flat dark faces are not "sharp"

    roll, yaw, pitch = _pose(pts)
    lo, hi = bars.pitch_range
    pitch_sub = min(_higher_is_better(pitch, lo, (lo + 1) / 2), _lower_is_better(pitch, hi, (hi + 1) / 2))
    subs = {
        "too_small": _higher_is_better(face_px, bars.min_face_px, 2 * bars.min_face_px),
        "blurred": _higher_is_better(sharpness, bars.min_sharpness, 2 * bars.min_sharpness),
        "too_dark": _higher_is_better(brightness, bars.min_brightness, bars.min_brightness + 35),
        "too_bright": _lower_is_better(brightness, bars.max_brightness, bars.max_brightness - 40),
        "strong_pose": min(_lower_is_better(abs(roll), bars.max_roll_deg, bars.max_roll_deg / 2),
                           _lower_is_better(yaw, bars.max_yaw, bars.max_yaw / 2), pitch_sub),
        "partly_outside": _lower_is_better(outside, bars.max_outside_fraction, 0.0),
        "low_detection_score": _higher_is_better(float(detection_score), bars.min_detection_score,
                                                 bars.min_detection_score + (1 - bars.min_detection_score) / 2),
    }
    reasons = tuple(r for r in REASONS if subs[r] < 0.5)
    measures = {"face_px": face_px, "sharpness": sharpness, "brightness": brightness, "roll_deg": roll,
                "yaw": yaw, "pitch": pitch, "outside_fraction": outside,
                "detection_score": float(detection_score)}
    return FaceQuality(score=min(subs.values()), reasons=reasons, measures=measures)


def assess(rgb: np.ndarray, face: DetectedFace, bars: QualityBars = QualityBars()) -> FaceQuality:
    """``assess_face`` for a detector's face."""
    return assess_face(rgb, face.landmarks, face.score, bars)


def bars_to_dict(bars: QualityBars) -> dict[str, Any]:
    d = asdict(bars)
    d["pitch_range"] = list(bars.pitch_range)
    return d
