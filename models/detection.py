"""Face detectors: YuNet (OpenCV, ONNX) and MTCNN (facenet-pytorch).

Both return ``DetectedFace`` objects in original-image pixel coordinates with
5 landmarks in the ArcFace order: right eye (viewer's left), left eye, nose
tip, right mouth corner, left mouth corner.

Frame-filling faces (ID photos, thumbnails cropped to the face, the 92x112
crops older face datasets ship) are a known weak spot of anchor detectors:
there is no context around the face and it touches the border. ``detect()``
therefore runs a second pass on a padded canvas: the image is padded first
(a black border of 35 % of its long side on each side) and the padded canvas
is then scaled to a 320 px long side, so a frame-filling face ends up about
120-190 px, the scale YuNet finds most reliably; only if that finds nothing is
the older, larger geometry (face ~320 px on a 640 px canvas) tried. The second
pass runs only when the first found nothing, or found a face covering most of
the frame; in the latter case each such face is replaced by its
best-overlapping second-pass face (one for one, so no duplicates) and every
other face is kept, so group photos are unaffected. Measured on synthetic
tight crops of the test photos (scripts/eval_tight_crops.py, figures in
docs/ACCURACY.md).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from models.weights import ResolvedWeights, resolve_weights, verify_file

# Fallback pass geometries, tried in order until one finds a face: (border on
# each side as a fraction of the image's long side, long side of the padded
# canvas). The first puts a frame-filling face at ~120-190 px on a 320 px
# canvas (cheap, and where YuNet is surest); the second is the earlier
# geometry (face ~320 px on 640 px), kept as the backstop.
FALLBACK_GEOMETRIES: tuple[tuple[float, int], ...] = ((0.35, 320), (0.5, 640))
# A face whose box spans at least this fraction of the image width or height
# counts as frame-filling and is re-detected on the padded canvas.
FRAME_FILL_FRACTION = 0.6
# First pass: images with a longer side than this are shrunk before detection.
DEFAULT_MAX_SIDE = 1280
# Minimum IoU for a second-pass face to stand in for a first-pass one.
REPLACE_MIN_IOU = 0.3

_Raw = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (N,4) xyxy, landmarks (N,5,2), scores (N,)


@dataclass(eq=False)  # compared by identity: == on ndarray fields would be ambiguous
class DetectedFace:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in image pixels
    landmarks: np.ndarray  # (5, 2) float32, ArcFace order
    score: float

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    def to_dict(self) -> dict[str, Any]:
        x1, y1, x2, y2 = self.box
        return {
            "box": {"x1": round(x1, 1), "y1": round(y1, 1), "x2": round(x2, 1), "y2": round(y2, 1)},
            "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in self.landmarks],
            "score": round(float(self.score), 4),
        }


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        got = f"{type(rgb).__name__} {getattr(rgb, 'shape', '')} {getattr(rgb, 'dtype', '')}"
        raise ValueError(f"detector expects an (H, W, 3) uint8 RGB array, got {got}")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError("detector got an empty image")
    return np.ascontiguousarray(rgb)


def _empty() -> _Raw:
    return (np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros((0,), np.float32))


def _resolve(name: str, weights_path: Path | str | None) -> ResolvedWeights:
    return verify_file(name, weights_path) if weights_path is not None else resolve_weights(name)


class FaceDetector:
    """Shared post-processing and the frame-filling-face fallback; subclasses
    implement ``_detect_raw`` on an RGB uint8 array."""

    name = "base"

    def __init__(self, score_threshold: float, min_face_size: int, max_side: int | None = DEFAULT_MAX_SIDE) -> None:
        self.score_threshold = float(score_threshold)
        self.min_face_size = int(min_face_size)
        if max_side is not None and int(max_side) < 64:
            raise ValueError(f"max_side must be at least 64 pixels, got {max_side}")
        self.max_side = int(max_side) if max_side else None

    def _first_pass(self, rgb: np.ndarray) -> _Raw:
        """Detect on the image shrunk to max_side, in original coordinates.

        Detector cost grows with pixels while faces that matter for
        recognition stay large: a 12 MP phone photo is searched at ~1.6 MP.
        """
        h, w = rgb.shape[:2]
        if not self.max_side or max(h, w) <= self.max_side:
            return self._detect_raw(rgb)
        scale = self.max_side / max(h, w)
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        small = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
        sx, sy = sw / w, sh / h
        boxes, lms, scores = self._detect_raw(small)
        return (boxes / np.array([sx, sy, sx, sy], np.float32),
                lms / np.array([sx, sy], np.float32), scores)

    def _detect_raw(self, rgb: np.ndarray) -> _Raw:
        raise NotImplementedError

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        rgb = _check_rgb(rgb)
        h, w = rgb.shape[:2]
        faces = self._finish(*self._first_pass(rgb), width=w, height=h)
        if not faces:
            return self._detect_padded(rgb)
        filling = [i for i, f in enumerate(faces)
                   if f.width >= FRAME_FILL_FRACTION * w or f.height >= FRAME_FILL_FRACTION * h]
        if filling:
            second = self._detect_padded(rgb)
            taken: set[int] = set()
            for i in filling:
                ious = [(_iou(faces[i].box, g.box), j) for j, g in enumerate(second) if j not in taken]
                best = max(ious, default=(0.0, -1))
                if best[0] >= REPLACE_MIN_IOU:
                    faces[i] = second[best[1]]
                    taken.add(best[1])
            faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def _detect_padded(self, rgb: np.ndarray) -> list[DetectedFace]:
        for pad_fraction, canvas in FALLBACK_GEOMETRIES:
            faces = self._detect_on_canvas(rgb, pad_fraction, canvas)
            if faces:
                return faces
        return []

    def _detect_on_canvas(self, rgb: np.ndarray, pad_fraction: float, canvas: int) -> list[DetectedFace]:
        """Pad by ``pad_fraction`` of the long side, scale the padded canvas to
        ``canvas`` px, detect, map back. Done as scale-then-pad, the same
        geometry without ever building the padded full-size image."""
        h, w = rgb.shape[:2]
        scale = canvas / ((1 + 2 * pad_fraction) * max(h, w))
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        work = cv2.resize(rgb, (sw, sh), interpolation=interp) if (sw, sh) != (w, h) else rgb
        pad = round(pad_fraction * max(sw, sh))
        padded = cv2.copyMakeBorder(work, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        # Exact per-axis scale, since sizes were rounded.
        sx, sy = sw / w, sh / h
        boxes, lms, scores = self._detect_raw(padded)
        boxes = (boxes - pad) / np.array([sx, sy, sx, sy], np.float32)
        lms = (lms - pad) / np.array([sx, sy], np.float32)
        return self._finish(boxes, lms, scores, width=w, height=h)

    def _finish(self, boxes: np.ndarray, lms: np.ndarray, scores: np.ndarray, *,
                width: int, height: int) -> list[DetectedFace]:
        faces: list[DetectedFace] = []
        for box, lm, score in zip(boxes, lms, scores):
            if not np.all(np.isfinite(box)) or not np.all(np.isfinite(lm)) or score < self.score_threshold:
                continue
            x1, y1, x2, y2 = (float(v) for v in box)
            # Clip the box (a partial face at the border keeps its visible part);
            # landmarks are left unclipped so alignment stays geometrically right.
            x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
            y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
            if min(x2 - x1, y2 - y1) < self.min_face_size:
                continue
            points = np.asarray(lm, dtype=np.float32).reshape(5, 2).copy()
            faces.append(DetectedFace((x1, y1, x2, y2), points, float(score)))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces


class YuNetDetector(FaceDetector):
    """OpenCV's YuNet (face_detection_yunet_2023mar.onnx)."""

    name = "yunet"

    def __init__(self, score_threshold: float = 0.7, nms_threshold: float = 0.3,
                 min_face_size: int = 20, weights_path: Path | str | None = None,
                 top_k: int = 5000, max_side: int | None = DEFAULT_MAX_SIDE) -> None:
        super().__init__(score_threshold, min_face_size, max_side)
        self.nms_threshold = float(nms_threshold)
        self.weights = _resolve("yunet", weights_path)
        self._net = cv2.FaceDetectorYN.create(
            str(self.weights.path), "", (320, 320), self.score_threshold, self.nms_threshold, top_k)
        # The cv2 object holds its input size as state: one call at a time.
        self._lock = threading.Lock()

    def _detect_raw(self, rgb: np.ndarray) -> _Raw:
        bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # YuNet was trained on BGR input
        h, w = bgr.shape[:2]
        with self._lock:
            self._net.setInputSize((w, h))
            _, out = self._net.detect(bgr)
        if out is None or len(out) == 0:
            return _empty()
        out = np.asarray(out, dtype=np.float32).reshape(-1, 15)
        boxes = np.stack([out[:, 0], out[:, 1], out[:, 0] + out[:, 2], out[:, 1] + out[:, 3]], axis=1)
        return boxes, out[:, 4:14].reshape(-1, 5, 2), out[:, 14]


class MTCNNDetector(FaceDetector):
    """facenet-pytorch's MTCNN with its shipped P/R/O-net weights."""

    name = "mtcnn"

    def __init__(self, score_threshold: float = 0.9, min_face_size: int = 20, device: str = "cpu",
                 torch_threads: int | None = None, max_side: int | None = DEFAULT_MAX_SIDE) -> None:
        super().__init__(score_threshold, min_face_size, max_side)
        import torch
        from facenet_pytorch import MTCNN

        if torch_threads is not None:
            # Process-wide. MTCNN runs many tiny ops; on a busy or CPU-limited
            # host (a replica with num_cpus < cores) torch's spinning
            # per-core threads cost far more than they gain: measured 5-25x
            # slower with 2 threads than 1 on a loaded 2-core machine.
            torch.set_num_threads(int(torch_threads))

        # Resolve and checksum first, then load exactly those files: MTCNN's
        # constructor reads its package copies unchecked, we overwrite them.
        self.weights = {part: resolve_weights(f"mtcnn_{part}") for part in ("pnet", "rnet", "onet")}
        self.device = torch.device(device)
        self._mtcnn = MTCNN(keep_all=True, min_face_size=self.min_face_size,
                            thresholds=[0.6, 0.7, self.score_threshold], device=self.device)
        for part, rw in self.weights.items():
            state = torch.load(rw.path, map_location=self.device, weights_only=True)
            getattr(self._mtcnn, part).load_state_dict(state)
        self._mtcnn.eval()

    def _detect_raw(self, rgb: np.ndarray) -> _Raw:
        boxes, probs, points = self._mtcnn.detect(rgb, landmarks=True)
        if boxes is None or len(boxes) == 0:
            return _empty()
        # Under NumPy 2 facenet-pytorch hands back dtype=object arrays.
        return (np.asarray(boxes.tolist(), dtype=np.float32).reshape(-1, 4),
                np.asarray(points.tolist(), dtype=np.float32).reshape(-1, 5, 2),
                np.asarray(probs.tolist(), dtype=np.float32).reshape(-1))


DETECTORS: dict[str, type[FaceDetector]] = {"yunet": YuNetDetector, "mtcnn": MTCNNDetector}


def make_detector(name: str, **kwargs: Any) -> FaceDetector:
    try:
        cls = DETECTORS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}") from None
    return cls(**kwargs)
