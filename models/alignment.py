"""5-point face alignment onto the ArcFace template.

SFace was trained on crops made exactly like OpenCV's
``FaceRecognizerSF.alignCrop``: a least-squares similarity transform (Umeyama,
no reflection) from the 5 landmarks onto the 112x112 ArcFace template, then
``warpAffine`` with bilinear interpolation and the default constant black
border. We reproduce that here (in numpy, batched-friendly, no cv2 object) so
crops match OpenCV's to within interpolation rounding.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from models.detection import DetectedFace, FaceDetector

# Order: right eye (viewer's left), left eye, nose tip, right mouth corner,
# left mouth corner -- the order YuNet and MTCNN emit.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)


def arcface_template(size: int = 112) -> np.ndarray:
    """The template scaled to a ``size``x``size`` crop (same framing as 112)."""
    return ARCFACE_TEMPLATE_112 * (size / 112.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping
    src points onto dst points (Umeyama 1991, reflections excluded).
    Deterministic, unlike RANSAC/LMEDS estimators. Returns a 2x3 matrix."""
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    n = src.shape[0]
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_d, dst_d = src - src_mean, dst - dst_mean
    cov = dst_d.T @ src_d / n
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(cov) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    var_src = (src_d**2).sum() / n
    if var_src <= 0:
        raise ValueError("degenerate landmarks: all points coincide")
    scale = float((s * d).sum() / var_src)
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = scale * rot
    m[:, 2] = dst_mean - scale * rot @ src_mean
    return m


def estimate_alignment(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    pts = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    if not np.all(np.isfinite(pts)):
        raise ValueError("landmarks contain NaN/inf")
    return similarity_transform(pts, arcface_template(size))


def align_face(rgb: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """Warp one face to a (size, size, 3) uint8 crop (same channel order as input)."""
    m = estimate_alignment(landmarks, size)
    # Constant 0 border, as OpenCV's alignCrop (what SFace was used with);
    # matters only for faces at the image edge.
    return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))


def align_faces(rgb: np.ndarray, faces: Sequence[DetectedFace], size: int = 112) -> np.ndarray:
    """Aligned crops for every face: (N, size, size, 3) uint8; N=0 gives an empty batch."""
    out = np.empty((len(faces), size, size, 3), dtype=np.uint8)
    for i, face in enumerate(faces):
        out[i] = align_face(rgb, face.landmarks, size)
    return out


# --- optional re-landmarking ---------------------------------------------------------
RELANDMARK_POLICIES: tuple[str, ...] = ("never", "always", "small_or_flagged")


class Relandmarker:
    """Re-estimates a face's 5 points with a second detector (MTCNN) run on
    the region around the face, for alignment only.

    Measured on degraded photos (scripts/calibrate.py --relandmark, figures in
    docs/ACCURACY.md): on small faces YuNet's points can ignore an in-plane
    tilt altogether (obama_240p turned 30 degrees reads as 3 degrees, SFace
    similarity to the person's other photos 0.27-0.30; with MTCNN's points
    0.76-0.96). Policies: "never"; "always"; "small_or_flagged" (the face is
    smaller than ``small_face_px`` by models.quality's measure, or the quality
    check gives any reason), which is where the gain was, at a fraction of
    the cost. Off unless asked for: it costs an MTCNN run per face it touches.
    """

    def __init__(self, detector: FaceDetector, policy: str = "small_or_flagged", margin: float = 0.5,
                 min_iou: float = 0.3, small_face_px: float = 160.0) -> None:
        if policy not in RELANDMARK_POLICIES:
            raise ValueError(f"unknown re-landmarking policy {policy!r}; choose one of {RELANDMARK_POLICIES}")
        self.detector, self.policy = detector, policy
        self.margin, self.min_iou, self.small_face_px = float(margin), float(min_iou), float(small_face_px)

    def wants(self, rgb: np.ndarray, face: DetectedFace) -> bool:
        if self.policy == "never":
            return False
        if self.policy == "always":
            return True
        from models.quality import assess

        q = assess(rgb, face)
        return bool(q.reasons) or q.measures["face_px"] < self.small_face_px

    def landmarks(self, rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
        """(5, 2) float32 points for aligning ``face``: the second detector's
        when the policy asks for it and it finds the same face, else the face's own."""
        if not self.wants(rgb, face):
            return face.landmarks
        from models.detection import _iou

        h, w = rgb.shape[:2]
        x1, y1, x2, y2 = face.box
        mx, my = self.margin * (x2 - x1), self.margin * (y2 - y1)
        ox, oy = int(max(0.0, x1 - mx)), int(max(0.0, y1 - my))
        ex, ey = int(min(w, x2 + mx)), int(min(h, y2 + my))
        if ex - ox < 8 or ey - oy < 8:
            return face.landmarks
        found = self.detector.detect(np.ascontiguousarray(rgb[oy:ey, ox:ex]))
        shifted = [(_iou(face.box, (f.box[0] + ox, f.box[1] + oy, f.box[2] + ox, f.box[3] + oy)), f) for f in found]
        best = max(shifted, key=lambda p: p[0], default=(0.0, None))
        if best[1] is None or best[0] < self.min_iou:
            return face.landmarks
        return (best[1].landmarks + np.array([ox, oy], np.float32)).astype(np.float32)

    def align(self, rgb: np.ndarray, face: DetectedFace, size: int = 112) -> np.ndarray:
        return align_face(rgb, self.landmarks(rgb, face), size)
