"""The bulk job's enrolment search against the full search, on many variations.

    python scripts/eval_enrol_search.py [--seed 5] [--min-quality 0.5] [--show 40]

For each variation of the shared test photos (scales of 200-4000 px long
side, small faces pasted into large frames alone and beside a portrait,
group photos, greyscale, blur, rotation, JPEG quality), runs
serve_app/detection_path.run_detection twice:

  old: the whole working image searched, every face counted (the job before);
  new: the search sized by the size gate (smallest_face_px), only faces
       passing the size gate counted (serve_app/jobs/worker.py choose_face);

and compares the job's outcome (enrolled, or rejected with its reason), the
number of faces counted, the chosen face's SFace embedding (cosine between
the two paths) and its liveness score. Differences are split into what the
counting policy intends (a second face below the size gate no longer
rejects the photo as multiple_faces) and anything else, which is printed.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SHARED = Path(os.environ.get("FACESERVE_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
os.environ.setdefault("FACE_MODELS_DIR", str(SHARED / "models"))

from models.detection import DetectedFace, FaceDetector, make_detector  # noqa: E402
from models.embedding import SFaceEmbedder  # noqa: E402
from models.images import decode_image  # noqa: E402
from models.liveness import LivenessModel  # noqa: E402
from serve_app.deployment_config import DetectorConfig  # noqa: E402
from serve_app.detection_path import run_detection  # noqa: E402
from serve_app.jobs.worker import judge_faces, size_gate  # noqa: E402
from serve_app.messages import DetectionResult, DetectOptions  # noqa: E402


@dataclass
class Variant:
    name: str
    data: bytes


def _jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _resize_long(rgb: np.ndarray, side: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    s = side / max(h, w)
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    return cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))), interpolation=interp)


def _background(w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A plain textured frame: a colour gradient with mild noise, no faces."""
    gy, gx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(60, 190, 3).astype(np.float32)
    tilt = rng.uniform(-40, 40, 3).astype(np.float32)
    img = base + tilt * (gx / w)[..., None] + (gy / h)[..., None] * 20
    img += rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _face_patch(rgb: np.ndarray, face: DetectedFace, box_px: float) -> np.ndarray:
    """The region 3 faces wide around ``face``, scaled so its box is ``box_px``."""
    s = box_px / min(face.width, face.height)
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    half = 1.5 * max(face.width, face.height)
    h, w = rgb.shape[:2]
    x1, y1 = max(0, int(cx - half)), max(0, int(cy - half))
    x2, y2 = min(w, int(cx + half)), min(h, int(cy + half))
    region = rgb[y1:y2, x1:x2]
    return cv2.resize(region, (max(1, round(region.shape[1] * s)), max(1, round(region.shape[0] * s))),
                      interpolation=cv2.INTER_AREA)


def _paste(canvas: np.ndarray, patch: np.ndarray, rng: np.random.Generator,
           avoid: tuple[int, int, int, int] | None = None) -> tuple[int, int, int, int]:
    H, W = canvas.shape[:2]
    ph, pw = patch.shape[:2]
    for _ in range(50):
        x, y = int(rng.integers(0, max(1, W - pw))), int(rng.integers(0, max(1, H - ph)))
        if avoid is None or x + pw < avoid[0] or x > avoid[2] or y + ph < avoid[1] or y > avoid[3]:
            break
    canvas[y:y + ph, x:x + pw] = patch[: H - y, : W - x]
    return x, y, x + pw, y + ph


def variants(detector: FaceDetector, seed: int) -> Iterator[Variant]:
    rng = np.random.default_rng(seed)
    people = sorted(p for p in (SHARED / "faces" / "people").glob("*/*") if p.is_file())
    groups = sorted((SHARED / "faces" / "groups").glob("*"))
    live = sorted((SHARED / "faces" / "liveness").glob("*"))
    photos = [(p, decode_image(p.read_bytes())) for p in people + groups + live]
    faces = {p: detector.detect(rgb) for p, rgb in photos}
    for p, rgb in photos:
        stem = p.stem
        for side in (200, 360, 640, 1000, 1600, 2500, 4000):
            yield Variant(f"{stem} scale {side}", _jpeg(_resize_long(rgb, side)))
        mid = _resize_long(rgb, 800)
        grey = cv2.cvtColor(cv2.cvtColor(mid, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        yield Variant(f"{stem} greyscale", _jpeg(grey))
        for sigma in (1.0, 2.5, 5.0):
            yield Variant(f"{stem} blur {sigma}", _jpeg(cv2.GaussianBlur(mid, (0, 0), sigma)))
        for angle in (12, 30, 60):
            h, w = mid.shape[:2]
            m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
            yield Variant(f"{stem} rotate {angle}", _jpeg(cv2.warpAffine(mid, m, (w, h), borderMode=cv2.BORDER_REFLECT)))
        for q in (8, 25, 50):
            yield Variant(f"{stem} jpeg q{q}", _jpeg(mid, q))
    # Small faces in large frames, alone and beside a portrait (the policy case).
    singles = [(p, rgb, faces[p][0]) for p, rgb in photos if p in people and faces[p]]
    for frame in (800, 1200, 1600, 2500):
        for box_px in (22, 28, 34, 40, 50, 70):
            p, rgb, f = singles[int(rng.integers(len(singles)))]
            canvas = _background(frame, frame * 3 // 4, rng)
            _paste(canvas, _face_patch(rgb, f, box_px), rng)
            yield Variant(f"{p.stem} alone at box {box_px} in {frame}px", _jpeg(canvas))
            q, rgb2, g = singles[int(rng.integers(len(singles)))]
            canvas = _background(frame, frame * 3 // 4, rng)
            main = _paste(canvas, _face_patch(rgb2, g, frame / 4), rng)
            _paste(canvas, _face_patch(rgb, f, box_px), rng, avoid=main)
            yield Variant(f"{q.stem} with {p.stem} at box {box_px} in {frame}px", _jpeg(canvas))


def outcome(det: DetectionResult, min_quality: float, gate: float) -> tuple[str, int | None, int]:
    i, reason, _ = judge_faces(det.faces, largest=False, min_quality=min_quality, min_face_px=gate)
    counted = sum(1 for f in det.faces if gate <= 0 or float(f.quality["measures"]["face_px"]) >= gate)  # type: ignore[index]
    return ("enrolled" if i is not None else reason), i, counted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--min-quality", type=float, default=0.5)
    ap.add_argument("--show", type=int, default=40, help="differences printed")
    args = ap.parse_args()
    cv2.setNumThreads(1)
    cfg = DetectorConfig()
    detector = make_detector(cfg.detector, score_threshold=cfg.score_threshold, min_face_size=cfg.min_face_size,
                             max_side=cfg.max_side)
    embedder = SFaceEmbedder(intra_op_threads=1)
    torch_live = LivenessModel(num_threads=1)
    cv_live = LivenessModel(num_threads=1, runtime="opencv")
    gate = size_gate(args.min_quality, cfg.bars.min_face_px)
    opts = DetectOptions(liveness_crops=True, enrol_crops=True)
    tally: Counter[str] = Counter()
    cosines: list[float] = []
    live_diff: list[float] = []
    shown = 0
    spent = {"old": 0.0, "new": 0.0}
    for v in variants(detector, args.seed):
        t = time.thread_time()
        old = run_detection(detector, v.data, cfg, opts)
        spent["old"] += time.thread_time() - t
        t = time.thread_time()
        new = run_detection(detector, v.data, cfg, opts, smallest_face_px=gate)
        spent["new"] += time.thread_time() - t
        o_out, o_i, o_n = outcome(old, args.min_quality, 0.0)
        n_out, n_i, n_n = outcome(new, args.min_quality, gate)
        tally["variants"] += 1
        tally[f"old {o_out}"] += 1
        tally[f"new {n_out}"] += 1
        note = ""
        if o_i is not None and n_i is not None:
            a, b = embedder.embed(np.stack([old.aligned[o_i], new.aligned[n_i]]))
            cosines.append(float(a @ b))
            lo = torch_live.predict({s: c[o_i:o_i + 1] for s, c in old.liveness_crops.items()})  # type: ignore[union-attr]
            ln = cv_live.predict({s: c[n_i:n_i + 1] for s, c in new.liveness_crops.items()})  # type: ignore[union-attr]
            live_diff.append(abs(float(lo[0]) - float(ln[0])))
            if cosines[-1] < 0.98:
                note = f"cosine {cosines[-1]:.3f}"
        if o_out != n_out:
            small = [float(f.quality["measures"]["face_px"]) for f in old.faces]  # type: ignore[index]
            policy = o_out == "multiple_faces" and sum(1 for x in small if x >= gate) <= 1
            tally["policy: small second face no longer counts" if policy else "outcome changed"] += 1
            note = (note + " " if note else "") + f"{o_out} -> {n_out} (faces {o_n}->{n_n}, face_px {[round(x) for x in small]})"
            if policy:
                note += " [policy]"
        elif o_n != n_n:
            tally["same outcome, counted faces differ"] += 1
            note = (note + " " if note else "") + f"counted {o_n} -> {n_n}"
        if note and shown < args.show:
            print(f"  {v.name}: {note}")
            shown += 1
    n = tally["variants"]
    print(f"{n} variants, gate face_px >= {gate:g}")
    for k in sorted(tally):
        if k != "variants":
            print(f"  {k}: {tally[k]}")
    if cosines:
        c = np.array(cosines)
        print(f"chosen face, SFace cosine old/new: min {c.min():.4f}, 1st percentile {np.percentile(c, 1):.4f}, "
              f"median {np.median(c):.4f}, below 0.98: {int((c < 0.98).sum())} of {len(c)}")
        print(f"liveness score |old (torch) - new (opencv)|: max {max(live_diff):.4f}, "
              f"median {float(np.median(live_diff)):.5f}")
    print(f"run_detection CPU a variant: old {1000 * spent['old'] / n:.1f} ms, new {1000 * spent['new'] / n:.1f} ms")


if __name__ == "__main__":
    main()
