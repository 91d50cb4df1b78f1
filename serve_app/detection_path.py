"""The detector's per-image path, and everything it cuts around a face.

run_detection() is what the Detector deployment runs for each upload:
reduced decode, detection on the working image, crops from the best pixels.

The working image (long side <= max_side) is enough for faces that are
large in it. A face that came out small is re-read at full resolution, but
only the region around it (WorkingImage.region), so alignment, liveness and
the stored enrolment crop see the real pixels without decoding the whole
upload. Pure functions, no Ray: unit-tested directly.

Enrolment can search a coarser image still (``smallest_face_px``, the bulk
job's size gate): faces the quality gate would refuse as too small need not
be found, so the detector searches at the size where the smallest face that
would pass is still comfortably detectable (search_side), faces found small
there are re-detected on the working image's pixels around them, and a
search that finds no face of the size asked for is repeated on the whole
working image. docs/BULK.md has the policy and the measurements.
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

from models.alignment import Relandmarker, align_face
from models.detection import REPLACE_MIN_IOU, DetectedFace, FaceDetector, _iou
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
# YuNet finds faces whose box's short side is at least this in the image it
# searches: faces pasted at 24 px onto photos were all found (60/60, scores
# 0.88-0.93), at 20 px 59/60, at 16 px 45/60.
DETECTABLE_BOX_PX = 24
# Quality's face_px (the aligned crop's side, from the landmarks) over the
# box's short side: 1.21-1.46 on the test photos upright and rotated by 30
# degrees, 1.77 for a face cut by the border. 1.6 sizes the search so that
# every face of face_px >= the gate has a box of >= DETECTABLE_BOX_PX.
FACE_PX_PER_BOX = 1.6
# A face whose box came out smaller than this in a reduced search is
# re-detected on the working image around it: its landmarks and score are
# then those of a full-size search.
REFINE_BELOW_PX = 2 * DETECTABLE_BOX_PX


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


def search_side(work: WorkingImage, smallest_face_px: float) -> int | None:
    """Long side of the image the detector searches so that a face whose
    face_px is ``smallest_face_px`` (original pixels) is still found, or
    None when that is not smaller than the working image."""
    if smallest_face_px <= 0:
        return None
    per_original = DETECTABLE_BOX_PX * FACE_PX_PER_BOX / smallest_face_px
    long_side = max(work.original_size)
    side = max(64, int(np.ceil(long_side * per_original)))
    return side if side < max(work.pixels.shape[:2]) else None


def _refine(detector: FaceDetector, pixels: np.ndarray, face: DetectedFace) -> DetectedFace:
    """``face`` (working-image coordinates, found in a coarser search) as
    the detector sees it on the working image's own pixels around it."""
    h, w = pixels.shape[:2]
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    half = 1.5 * max(face.width, face.height)  # a crop 3 faces wide: context, but little else
    x1, y1 = max(0, int(cx - half)), max(0, int(cy - half))
    x2, y2 = min(w, int(np.ceil(cx + half))), min(h, int(np.ceil(cy + half)))
    if x2 - x1 < 2 or y2 - y1 < 2:
        return face
    shift = np.array([x1, y1], np.float32)
    best, best_iou = face, REPLACE_MIN_IOU  # the detector's own bar for "the same face"
    for g in detector.detect(np.ascontiguousarray(pixels[y1:y2, x1:x2])):
        moved = DetectedFace((g.box[0] + x1, g.box[1] + y1, g.box[2] + x1, g.box[3] + y1),
                             g.landmarks + shift, g.score)
        overlap = _iou(moved.box, face.box)
        if overlap > best_iou:
            best, best_iou = moved, overlap
    return best


def _search(detector: FaceDetector, work: WorkingImage, side: int | None) -> list[DetectedFace]:
    """Faces in working-image coordinates; ``side`` shrinks the first pass."""
    if side is None:
        return detector.detect(work.pixels)
    found = detector.detect(work.pixels, max_side=side)
    shrink = side / max(work.pixels.shape[:2])
    faces = [_refine(detector, work.pixels, f) if min(f.width, f.height) * shrink < REFINE_BELOW_PX else f
             for f in found]
    faces.sort(key=lambda f: f.area, reverse=True)
    return faces


def run_detection(detector: FaceDetector, data: bytes, cfg: DetectorConfig, opts: DetectOptions,
                  trace: dict[str, str] | None = None, relandmarker: Relandmarker | None = None,
                  smallest_face_px: float = 0.0) -> DetectionResult:
    """Compressed bytes -> faces (original coordinates) and their crops.

    ``smallest_face_px`` > 0 (enrolment only): faces whose quality face_px
    is below it may be missed (module docstring); faces at or above it are
    found as by the full search. 0: the working image is searched whole.

    Peak memory: one image's reduced decode (at most cfg.full_decode_bytes
    for a whole-image decode; libvips strips beyond that), the working image
    (max_side^2 x 3 bytes) and one face region at a time (<= 16 MP x 3).
    """
    t0 = time.perf_counter()
    work = decode_working(data, max_side=cfg.max_side, max_bytes=cfg.max_image_bytes,
                          max_pixels=cfg.max_image_pixels, full_decode_bytes=cfg.full_decode_bytes)
    t1 = time.perf_counter()
    side = search_side(work, smallest_face_px)
    found = _search(detector, work, side)
    t2 = time.perf_counter()
    faces, crops = _cut_all(work, found, cfg, opts, relandmarker)
    if side is not None and not any(c.quality is not None and c.quality.measures["face_px"] >= smallest_face_px
                                    for c in crops):
        # No face of the size asked for: judge the photo by the full search, as without the option.
        found = _search(detector, work, None)
        t2 = time.perf_counter()
        faces, crops = _cut_all(work, found, cfg, opts, relandmarker)
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


def _cut_all(work: WorkingImage, found: list[DetectedFace], cfg: DetectorConfig, opts: DetectOptions,
             relandmarker: Relandmarker | None) -> tuple[list[DetectedFace], list[FaceCrops]]:
    """Working-image faces -> original coordinates, and each one's crops."""
    inv = 1.0 / work.scale
    faces = [DetectedFace((f.box[0] * inv, f.box[1] * inv, f.box[2] * inv, f.box[3] * inv),
                          f.landmarks * np.float32(inv), float(f.score)) for f in found]
    crops = [cut_face(work, f, liveness=opts.liveness_crops, enrol=opts.enrol_crops, bars=cfg.bars,
                      relandmarker=relandmarker) for f in faces]
    return faces, crops
