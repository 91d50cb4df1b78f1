"""The detector's per-image path, and everything it cuts around a face.

run_detection() is what the Detector deployment runs for each upload:
reduced decode, detection on the working image, crops from the best pixels.

The working image (long side <= max_side) is enough for faces that are
large in it. A face that came out small is re-read at full resolution, but
only the region around it (WorkingImage.region), so alignment, liveness and
the stored enrolment crop see the real pixels without decoding the whole
upload. Pure functions, no Ray: unit-tested directly.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.alignment import Relandmarker, align_face
from models.detection import DetectedFace, FaceDetector
from models.liveness import LIVENESS_SPECS, liveness_crop
from models.quality import FaceQuality, QualityBars, assess_face
from models.working_image import WorkingImage, decode_working
from serve_app.deployment_config import DetectorConfig
from serve_app.messages import DetectionResult, DetectOptions, FaceInfo

ALIGNED_SIZE = 112
LIVENESS_SIZE = 80
# A face narrower than this in the working image is re-read at full resolution.
FULL_RES_BELOW_PX = 2 * ALIGNED_SIZE
ENROL_MARGIN = 0.25
ENROL_MAX_SIDE = 1024
# The region read back covers the widest liveness context (x4.0) around the face.
REGION_SCALE = max(spec.scale for spec in LIVENESS_SPECS)


@dataclass
class FaceCrops:
    aligned: np.ndarray  # (112, 112, 3) uint8 RGB
    liveness: dict[float, np.ndarray] | None  # scale -> (80, 80, 3) BGR
    enrol_jpeg: bytes | None
    quality: FaceQuality | None = None


def _scaled(face: DetectedFace, factor: float, dx: float = 0.0, dy: float = 0.0) -> tuple[tuple[float, float, float, float], np.ndarray]:
    x1, y1, x2, y2 = face.box
    box = ((x1 - dx) * factor, (y1 - dy) * factor, (x2 - dx) * factor, (y2 - dy) * factor)
    lms = (face.landmarks - np.array([dx, dy], np.float32)) * np.float32(factor)
    return box, lms


def cut_face(work: WorkingImage, face: DetectedFace, *, liveness: bool, enrol: bool,
             bars: QualityBars | None = None, relandmarker: Relandmarker | None = None) -> FaceCrops:
    """``face`` is in original-image coordinates. Quality is measured on the
    same pixels the aligned crop comes from (full resolution for small faces)."""
    small = min(face.width, face.height) * work.scale < FULL_RES_BELOW_PX and work.scale < 1.0
    if small or enrol:
        pixels, (ox, oy) = _region(work, face)
        factor = 1.0
    else:
        pixels, ox, oy, factor = work.pixels, 0.0, 0.0, work.scale
    box, lms = _scaled(face, factor, ox, oy)
    align_lms = lms
    if relandmarker is not None:  # a second opinion on the points where the first are unreliable
        align_lms = relandmarker.landmarks(pixels, DetectedFace(box, lms, face.score))
    aligned = align_face(pixels, align_lms, ALIGNED_SIZE)
    live = None
    if liveness:
        live = {spec.scale: liveness_crop(pixels, box, spec.scale, LIVENESS_SIZE) for spec in LIVENESS_SPECS}
    enrol_jpeg = _enrol_jpeg(pixels, box) if enrol else None
    quality = assess_face(pixels, lms, face.score, bars) if bars is not None else None
    return FaceCrops(aligned, live, enrol_jpeg, quality)


def _region(work: WorkingImage, face: DetectedFace) -> tuple[np.ndarray, tuple[float, float]]:
    """Full-resolution pixels around the face, and their top-left corner."""
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    half = max(face.width, face.height) * REGION_SCALE / 2
    region, origin = work.region((cx - half, cy - half, cx + half, cy + half))
    return region, (float(origin[0]), float(origin[1]))


def _enrol_jpeg(pixels: np.ndarray, box: tuple[float, float, float, float]) -> bytes:
    h, w = pixels.shape[:2]
    bw, bh = box[2] - box[0], box[3] - box[1]
    x1 = int(max(0, box[0] - ENROL_MARGIN * bw))
    y1 = int(max(0, box[1] - ENROL_MARGIN * bh))
    x2 = int(min(w, box[2] + ENROL_MARGIN * bw))
    y2 = int(min(h, box[3] + ENROL_MARGIN * bh))
    im = Image.fromarray(pixels[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)])
    im.thumbnail((ENROL_MAX_SIDE, ENROL_MAX_SIDE))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def run_detection(detector: FaceDetector, data: bytes, cfg: DetectorConfig, opts: DetectOptions,
                  trace: dict[str, str] | None = None, relandmarker: Relandmarker | None = None) -> DetectionResult:
    """Compressed bytes -> faces (original coordinates) and their crops.

    Peak memory: one image's reduced decode (at most cfg.full_decode_bytes
    for a whole-image decode; libvips strips beyond that), the working image
    (max_side^2 x 3 bytes) and one face region at a time (<= 16 MP x 3).
    """
    t0 = time.perf_counter()
    work = decode_working(data, max_side=cfg.max_side, max_bytes=cfg.max_image_bytes,
                          max_pixels=cfg.max_image_pixels, full_decode_bytes=cfg.full_decode_bytes)
    t1 = time.perf_counter()
    found = detector.detect(work.pixels)
    t2 = time.perf_counter()
    inv = 1.0 / work.scale
    faces = [DetectedFace((f.box[0] * inv, f.box[1] * inv, f.box[2] * inv, f.box[3] * inv),
                          f.landmarks * np.float32(inv), float(f.score)) for f in found]
    bars = cfg.bars
    crops = [cut_face(work, f, liveness=opts.liveness_crops, enrol=opts.enrol_crops, bars=bars,
                      relandmarker=relandmarker) for f in faces]
    t3 = time.perf_counter()
    aligned = (np.stack([c.aligned for c in crops]) if crops
               else np.zeros((0, ALIGNED_SIZE, ALIGNED_SIZE, 3), np.uint8))
    live = None
    if opts.liveness_crops:
        live = {s.scale: (np.stack([c.liveness[s.scale] for c in crops if c.liveness]) if crops
                          else np.zeros((0, LIVENESS_SIZE, LIVENESS_SIZE, 3), np.uint8))
                for s in LIVENESS_SPECS}
    return DetectionResult(
        faces=[FaceInfo(f.box, f.landmarks, f.score, c.quality.to_dict() if c.quality else None)
               for f, c in zip(faces, crops)],
        aligned=aligned,
        liveness_crops=live,
        enrol_crops=[c.enrol_jpeg for c in crops if c.enrol_jpeg is not None] if opts.enrol_crops else None,
        image_size=work.original_size,
        image_format=work.format,
        timings_ms={"decode": (t1 - t0) * 1000.0, "detect": (t2 - t1) * 1000.0, "align": (t3 - t2) * 1000.0},
        trace=trace or {},
    )
