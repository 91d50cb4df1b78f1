"""Detection rate on synthetic tight face crops (the set tests/unit/test_tight_crops.py uses).

    FACE_MODELS_DIR=../shared/models python scripts/eval_tight_crops.py [--detector yunet] [--per-face 10]

Prints found / total, where "found" means exactly one face whose landmarks lie
within 0.5 eye-distances of the reference landmarks (YuNet's plain pass on the
full-resolution photo, mapped into the crop), then the misses by parameter.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
SHARED = Path(os.environ.get("FACESERVE_SHARED_DIR") or Path(__file__).resolve().parents[2] / "shared")
os.environ.setdefault("FACE_MODELS_DIR", str(SHARED / "models"))

from models.degrade import TightCrop, reference_faces, tight_crop_variants  # noqa: E402
from models.detection import FaceDetector, YuNetDetector, make_detector  # noqa: E402

LANDMARK_TOLERANCE = 0.5  # max point error, in reference eye distances


def landmark_error(found: np.ndarray, ref: np.ndarray) -> float:
    eye = float(np.linalg.norm(ref[1] - ref[0]))
    return float(np.linalg.norm(found - ref, axis=1).max() / max(eye, 1e-6))


def judge(detector: FaceDetector, crop: TightCrop) -> str | None:
    """None if the crop's face is found correctly, else why not."""
    faces = detector.detect(crop.image)
    if not faces:
        return "none"
    if len(faces) > 1:
        return "several"
    if landmark_error(faces[0].landmarks, crop.landmarks) > LANDMARK_TOLERANCE:
        return "landmarks"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", default="yunet")
    ap.add_argument("--per-face", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    det = make_detector(args.detector)
    refs = reference_faces(SHARED / "faces", YuNetDetector(max_side=None))
    misses: Counter[str] = Counter()
    by_param: dict[str, Counter[str]] = {k: Counter() for k in ("margin", "aspect", "long_side", "grey", "jpeg",
                                                                "tilt", "look")}
    total = found = 0
    for crop in tight_crop_variants(refs, args.per_face, seed=args.seed):
        total += 1
        why = judge(det, crop)
        keys = {"margin": crop.margin, "aspect": round(crop.aspect, 2), "long_side": crop.long_side,
                "grey": crop.grey, "jpeg": crop.jpeg_quality, "tilt": crop.tilt, "look": crop.look}
        for k, v in keys.items():
            by_param[k][f"{v}:all"] += 1
            if why is not None:
                by_param[k][f"{v}:miss"] += 1
        if why is None:
            found += 1
        else:
            misses[why] += 1
    print(f"{args.detector}: {found}/{total} tight crops found ({100 * found / total:.1f}%) "
          f"from {len(refs)} faces; misses: {dict(misses)}")
    for k, c in by_param.items():
        vals = sorted({key.rsplit(':', 1)[0] for key in c})
        print(f"  {k}: " + ", ".join(f"{v} {c[v + ':all'] - c[v + ':miss']}/{c[v + ':all']}" for v in vals))


if __name__ == "__main__":
    main()
