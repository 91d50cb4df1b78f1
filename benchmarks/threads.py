"""Threads per model session: 1 vs 2 for SFace (ONNX Runtime) and YuNet (OpenCV).

    python benchmarks/threads.py [--iters 40]

Prints per-call latency at batch 1 and 8 for each thread count, and the
ratio against 1 thread measured in the same run. The replicas use
model_threads(): the whole CPUs Ray gave them (at least 1).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("FACE_MODELS_DIR", str(ROOT.parent / "shared" / "models"))


def _time(fn, iters: int) -> tuple[float, float]:
    fn()
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(out, 50)), float(np.percentile(out, 95))


def main() -> None:
    import cv2

    from models.detection import YuNetDetector
    from models.embedding import SFaceEmbedder
    from models.images import decode_image

    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=40)
    args = ap.parse_args()
    photo = decode_image((ROOT.parent / "shared" / "faces" / "people" / "obama" / "obama_1.jpg").read_bytes())
    crops = np.random.default_rng(0).integers(0, 255, (8, 112, 112, 3), dtype=np.uint8)
    print(f"# threads per model session ({os.cpu_count()} cores here)")
    base: dict[str, float] = {}
    for threads in (1, 2):
        sface = SFaceEmbedder(intra_op_threads=threads)
        cv2.setNumThreads(threads)
        yunet = YuNetDetector()
        rows = {
            "sface batch 1": _time(lambda: sface.embed(crops[:1]), args.iters),
            "sface batch 8": _time(lambda: sface.embed(crops), args.iters),
            "yunet 910x1137": _time(lambda: yunet.detect(photo), args.iters // 2),
        }
        for name, (p50, p95) in rows.items():
            base.setdefault(name, p50)
            print(f"{threads} thread(s)  {name:15} p50 {p50:7.2f} ms  p95 {p95:7.2f} ms  "
                  f"vs 1 thread: {p50 / base[name]:.2f}x")


if __name__ == "__main__":
    main()
