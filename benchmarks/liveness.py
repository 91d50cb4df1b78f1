"""Liveness benchmark: what the MiniFASNet ensemble says, how fast, and its HTTP cost.

    python benchmarks/liveness.py [--no-http] [--url http://127.0.0.1:8000]
                                  [--requests 30] [--repeats 20] [--threads 1]

Part A runs in this process (models/ only, no Ray):

* every photo in ../shared/faces/people and re-captures made from each
  (printed-halftone and screen-moire imitations, gaussian blur,
  downscale-upscale, JPEG q=30), plus the three shared liveness photos
  (image_T1 live, image_F1/F2 spoofs): faces boxed by YuNet on each variant,
  the live score of the largest face, and the live rate per variant at the
  default threshold; then the same for changes to the face's surroundings
  that are not re-captures (black borders, a tight face crop), which the
  model's wide context crops also see;
* ms per face for the liveness model alone (both networks, crops already
  cut), batched and at batch 1, timed with time.perf_counter over repeats.

Part B (skip with --no-http) goes through the real Serve app, started here
with benchmarks/live_app.py unless --url is given: a few people are
enrolled, then the same identify requests are sent with liveness=off and
liveness=flag, the two modes alternating which goes first, and p50/p95 and
the on/off ratio from this one run are printed.

Figures only: nothing here asserts. The re-captures are imitations made
from the pixels alone (no paper, no screen bezel, no camera), so they say
how the model reacts to those textures, not how it fares on real attacks.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("FACESERVE_SHARED_DIR", ROOT.parent / "shared"))
os.environ.setdefault("FACE_MODELS_DIR", str(SHARED / "models"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import cv2  # noqa: E402

PEOPLE_DIR = SHARED / "faces" / "people"
LIVENESS_DIR = SHARED / "faces" / "liveness"
LIVENESS_PHOTOS = {"image_T1": True, "image_F1": False, "image_F2": False}  # name -> truly live


# ---------------------------------------------------------------- photos
def people_photos() -> list[tuple[str, Path]]:
    out = []
    for person in sorted(d for d in PEOPLE_DIR.iterdir() if d.is_dir()):
        out += [(person.name, p) for p in sorted(person.iterdir()) if p.is_file()]
    return out


def load_rgb(path: Path) -> np.ndarray:
    """Decoded the way the service decodes uploads (EXIF orientation, alpha dropped)."""
    from models.images import decode_image

    return decode_image(path.read_bytes())


# ---------------------------------------------------------------- re-captures
# Each takes the RGB image and the width of its face in pixels (from the
# original photo), so the strength of a degradation is relative to the face,
# not to the very different resolutions of the test photos.
def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1])


def _rotated_grid(h: int, w: int, angle_deg: float, period: float) -> tuple[np.ndarray, np.ndarray]:
    """Phase (in periods) of a grid rotated by angle, sampled at the pixel centres."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = np.deg2rad(angle_deg)
    u = (x * np.cos(t) + y * np.sin(t)) / period
    v = (-x * np.sin(t) + y * np.cos(t)) / period
    return u, v


def print_halftone(rgb: np.ndarray, face_w: float) -> np.ndarray:
    """A printed photo photographed again: CMYK dot screens, paper and ink, camera blur.

    Amplitude-modulated halftone: each ink is thresholded against its own
    rotated cosine dot screen (C 15, M 75, Y 0, K 45 degrees, about 45 dots
    across the face), the paper is off-white and the ink not quite black,
    then the re-capture softens the dots (gaussian, a third of a dot).
    """
    img = rgb.astype(np.float32) / 255.0
    h, w = img.shape[:2]
    period = max(3.0, face_w / 45.0)
    k = 1.0 - img.max(axis=2)
    cmy = (1.0 - img - k[..., None]) / np.maximum(1.0 - k[..., None], 1e-3)
    inks = [cmy[..., 0], cmy[..., 1], cmy[..., 2], k]
    printed = []
    for ink, angle in zip(inks, (15.0, 75.0, 0.0, 45.0)):
        u, v = _rotated_grid(h, w, angle, period)
        screen = 0.5 - 0.25 * (np.cos(2 * np.pi * u) + np.cos(2 * np.pi * v))  # 0..1
        printed.append((ink > screen).astype(np.float32))
    c, m, y, kk = printed
    out = np.stack([(1 - c), (1 - m), (1 - y)], axis=2) * (1 - kk[..., None])
    paper = np.array([0.95, 0.93, 0.88], np.float32)  # warm off-white
    ink_black = 0.12
    out = ink_black + (paper - ink_black) * out
    out = cv2.GaussianBlur(out, (0, 0), sigmaX=period / 3.0)
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def screen_moire(rgb: np.ndarray, face_w: float) -> np.ndarray:
    """A photo shown on an LCD and photographed: subpixel stripes beating with the sensor grid.

    The image is multiplied by a slightly rotated (2 degrees) RGB stripe
    mask whose triad pitch (3.4 px) does not divide the pixel grid, with dark
    gaps between pixel rows, which aliases into moire fringes; then the
    display's look: a gamma shift, lower contrast, a cool white point, and a
    little optical blur.
    """
    img = rgb.astype(np.float32) / 255.0
    h, w = img.shape[:2]
    u, v = _rotated_grid(h, w, 2.0, 3.4)
    phase = u - np.floor(u)
    mask = np.full((h, w, 3), 0.4, np.float32)
    for c in range(3):
        on = (phase >= c / 3.0) & (phase < (c + 1) / 3.0)
        mask[..., c][on] = 1.0
    row_gap = ((v - np.floor(v)) > 0.85).astype(np.float32)
    mask *= (1.0 - 0.5 * row_gap)[..., None]
    mask /= mask.mean(axis=(0, 1), keepdims=True)  # keep the overall brightness
    out = img * mask
    out = cv2.GaussianBlur(out, (0, 0), sigmaX=0.7)
    out = np.clip(out, 0, 1) ** 0.8  # gamma shift
    out = 0.5 + 0.85 * (out - 0.5)  # lower contrast
    out *= np.array([0.95, 0.98, 1.05], np.float32)  # cool white point
    return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)


def gaussian_blur(rgb: np.ndarray, face_w: float) -> np.ndarray:
    """Defocus: sigma of 1/50 of the face width (4 px on a 200 px face)."""
    return cv2.GaussianBlur(rgb, (0, 0), sigmaX=max(1.0, face_w / 50.0))


def down_up(rgb: np.ndarray, face_w: float) -> np.ndarray:
    """Down to a 40 px wide face (INTER_AREA), back up to the original size (bilinear)."""
    h, w = rgb.shape[:2]
    f = min(1.0, 40.0 / max(face_w, 1.0))
    small = cv2.resize(rgb, (max(8, round(w * f)), max(8, round(h * f))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def jpeg30(rgb: np.ndarray, face_w: float) -> np.ndarray:
    return _jpeg(rgb, 30)


VARIANTS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "original": lambda rgb, fw: rgb,
    "halftone": print_halftone,
    "moire": screen_moire,
    "blur": gaussian_blur,
    "down_up": down_up,
    "jpeg30": jpeg30,
}


# ---------------------------------------------------------------- part A
Row = dict[str, tuple[float, bool]]  # variant -> (live score, YuNet found the face in the variant)


def score_table(detector, model, photos: list[tuple[str, str, np.ndarray]]) -> dict[str, Row]:
    """{photo label: {variant: (live score of the largest face, detected)}}.

    Each variant is detected afresh, as the service would; every variant keeps
    the photo's geometry, so where YuNet finds no face in a variant the face
    is scored on the original photo's box instead and marked as not detected
    (the service itself would answer 422 no_face for that image).
    """
    table: dict[str, Row] = {}
    for label, _, rgb in photos:
        faces = detector.detect(rgb)
        if not faces:
            print(f"  (no face in {label}: skipped)")
            continue
        face_w = faces[0].width
        row: Row = {}
        for name, make in VARIANTS.items():
            img = make(rgb, face_w)
            found = detector.detect(img)
            box = found[0].box if found else faces[0].box
            row[name] = (float(model.score_faces(img, [box])[0]), bool(found))
        table[label] = row
    return table


def black_border(rgb: np.ndarray, box: tuple[float, ...]) -> tuple[np.ndarray, tuple[float, ...]]:
    """The photo on a black canvas, one face width of black on every side (letterboxing, padding)."""
    pad = max(8, round(box[2] - box[0]))
    out = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(0, 0, 0))
    return out, (box[0] + pad, box[1] + pad, box[2] + pad, box[3] + pad)


def tight_crop(rgb: np.ndarray, box: tuple[float, ...]) -> tuple[np.ndarray, tuple[float, ...]]:
    """Only the face: the box grown by 15 % (an ID-photo or thumbnail crop, no surroundings)."""
    h, w = rgb.shape[:2]
    x1, y1, x2, y2 = box
    mx, my = 0.15 * (x2 - x1), 0.15 * (y2 - y1)
    cx1, cy1 = max(0, int(x1 - mx)), max(0, int(y1 - my))
    cx2, cy2 = min(w, int(x2 + mx) + 1), min(h, int(y2 + my) + 1)
    out = np.ascontiguousarray(rgb[cy1:cy2, cx1:cx2])
    return out, (x1 - cx1, y1 - cy1, x2 - cx1, y2 - cy1)


CONTEXT_VARIANTS = {"black_border": black_border, "tight_crop": tight_crop}


def context_table(detector, model, photos: list[tuple[str, str, np.ndarray]]) -> dict[str, Row]:
    """Like score_table, for changes to what surrounds the face (the 2.7x and 4.0x crops see it)."""
    table: dict[str, Row] = {}
    for label, _, rgb in photos:
        faces = detector.detect(rgb)
        if not faces:
            continue
        row: Row = {"original": (float(model.score_faces(rgb, [faces[0].box])[0]), True)}
        for name, make in CONTEXT_VARIANTS.items():
            img, moved = make(rgb, faces[0].box)
            found = detector.detect(img)
            box = found[0].box if found else moved
            row[name] = (float(model.score_faces(img, [box])[0]), bool(found))
        table[label] = row
    return table


def print_scores(title: str, table: dict[str, Row], threshold: float) -> None:
    names = list(next(iter(table.values())))
    print(f"\n{title}: live score of the largest face")
    print(f"  (* judged live at threshold {threshold}; ! YuNet found no face in this variant,"
          " scored on the original's box)")
    widths = [max(12, len(n) + 2) for n in names]
    print(f"  {'photo':<34}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths)))
    for label, row in table.items():
        cells = []
        for n, w in zip(names, widths):
            s, found = row[n]
            cells.append(f"{s:>{w - 2}.4f}{'*' if s >= threshold else ' '}{' ' if found else '!'}")
        print(f"  {label:<34}" + "".join(cells))


def print_rates(table: dict[str, Row], threshold: float) -> None:
    print(f"\nlive rate per variant over {len(table)} genuine photos of people (threshold {threshold})")
    print(f"  {'variant':<13}{'live':>6}{'of':>5}{'rate':>7}{'median':>9}{'min':>9}{'max':>9}"
          f"{'no face':>9}{'live among detected':>21}")
    for n in next(iter(table.values())):
        cells = [row[n] for row in table.values()]
        scores = [s for s, _ in cells]
        live = sum(s >= threshold for s in scores)
        detected = [s for s, found in cells if found]
        live_det = sum(s >= threshold for s in detected)
        print(f"  {n:<13}{live:>6}{len(scores):>5}{live / len(scores):>7.0%}"
              f"{statistics.median(scores):>9.4f}{min(scores):>9.4f}{max(scores):>9.4f}"
              f"{len(cells) - len(detected):>9}{f'{live_det}/{len(detected)}':>21}")


def time_model(model, crops: dict[float, np.ndarray], repeats: int) -> dict[str, float]:
    """ms per face: the whole batch at once, and one face per call."""
    n = len(next(iter(crops.values())))
    model.predict(crops)  # warm-up
    batch_ms = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.predict(crops)
        batch_ms.append((time.perf_counter() - t0) * 1000.0 / n)
    singles = [{s: c[i : i + 1] for s, c in crops.items()} for i in range(n)]
    model.predict(singles[0])
    one_ms = []
    for _ in range(max(1, repeats // 4)):
        for one in singles:
            t0 = time.perf_counter()
            model.predict(one)
            one_ms.append((time.perf_counter() - t0) * 1000.0)
    return {
        "n": n,
        "batch_p50": statistics.median(batch_ms),
        "batch_min": min(batch_ms),
        "one_p50": statistics.median(one_ms),
        "one_p95": float(np.percentile(one_ms, 95)),
    }


def part_a(threads: int, repeats: int) -> dict[str, object]:
    import torch

    from models.detection import YuNetDetector
    from models.liveness import DEFAULT_LIVE_THRESHOLD, LivenessModel

    cv2.setNumThreads(threads)
    t0 = time.perf_counter()
    detector = YuNetDetector()
    model = LivenessModel(num_threads=threads, allow_download=False)
    print(f"models loaded in {time.perf_counter() - t0:.1f} s (torch threads {torch.get_num_threads()})")
    thr = DEFAULT_LIVE_THRESHOLD

    people = [(f"{person}/{p.name}", person, load_rgb(p)) for person, p in people_photos()]
    shared = [(f"liveness/{n} ({'live' if live else 'spoof'})", n, load_rgb(LIVENESS_DIR / f"{n}.jpg"))
              for n, live in LIVENESS_PHOTOS.items()]

    t0 = time.perf_counter()
    people_table = score_table(detector, model, people)
    shared_table = score_table(detector, model, shared)
    print(f"scored {len(people) + len(shared)} photos x {len(VARIANTS)} variants "
          f"in {time.perf_counter() - t0:.1f} s")
    print_scores("shared liveness photos", shared_table, thr)
    print_scores("people photos (genuine photographs) and re-captures made from them",
                 people_table, thr)
    print_rates(people_table, thr)
    context = context_table(detector, model, shared + people)
    print_scores("context around the face (not a re-capture: what the wide crops see)", context, thr)
    print_rates({k: v for k, v in context.items() if not k.startswith("liveness/")}, thr)

    # Timing: the crops of every face in every original photo, cut once.
    crops_list = []
    for _, _, rgb in people + shared:
        faces = detector.detect(rgb)
        if faces:
            crops_list.append(model.make_crops(rgb, [f.box for f in faces]))
    crops = {s: np.concatenate([c[s] for c in crops_list]) for s in model.scales}
    while len(crops[model.scales[0]]) < 32:  # a full default batch (Liveness max_batch_size 32)
        crops = {s: np.concatenate([c, c]) for s, c in crops.items()}
    crops = {s: c[:32] for s, c in crops.items()}
    # Crop cutting (done in the Detector deployment): ms per face, on a mid-size photo.
    rgb = people[0][2]
    box = detector.detect(rgb)[0].box
    cut = []
    for _ in range(repeats):
        t1 = time.perf_counter()
        model.make_crops(rgb, [box])
        cut.append((time.perf_counter() - t1) * 1000.0)
    timing = time_model(model, crops, repeats)
    print(f"\nliveness model alone ({threads} thread(s), both networks, crops already cut):")
    print(f"  batch of {timing['n']}: {timing['batch_p50']:.2f} ms/face p50 "
          f"(best {timing['batch_min']:.2f}) over {repeats} runs")
    print(f"  batch of 1:  {timing['one_p50']:.2f} ms/face p50, {timing['one_p95']:.2f} p95")
    print(f"  batching speed-up: {timing['one_p50'] / timing['batch_p50']:.2f}x")
    print(f"  cutting the two 80x80 crops (detector side): {statistics.median(cut):.3f} ms/face p50")
    return {"people": people_table, "shared": shared_table, "timing": timing}


# ---------------------------------------------------------------- part B
def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def part_b(url: str | None, n_requests: int) -> None:
    import httpx

    from benchmarks.live_app import running_app

    # One replica each and no autoscaling: the two modes must see the same graph.
    fixed = {
        name: {"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
        for name in ("Ingress", "Detector", "Embedder", "Liveness", "Matcher")
    }
    photos = people_photos()
    enrol = {}
    for person, p in photos:
        enrol.setdefault(person, p)
    enrol_people = list(enrol)[:5]
    probes = [p.read_bytes() for person, p in photos if enrol.get(person) != p]
    t_start = time.perf_counter()
    with running_app(url, overrides=None if url else fixed) as base:
        print(f"\napp ready at {base} after {time.perf_counter() - t_start:.0f} s")
        tag = uuid.uuid4().hex[:8]
        created = []
        with httpx.Client(base_url=base, timeout=120) as client:
            seq = 0
            for person in enrol_people:
                r = client.post("/v1/subjects", json={"name": f"bench-liveness-{person}-{tag}"})
                r.raise_for_status()
                sid = r.json()["id"]
                created.append(sid)
                # liveness=off: these are photos of photos; this part measures latency only.
                with enrol[person].open("rb") as fh:
                    r = client.post(f"/v1/subjects/{sid}/faces", files={"image": fh}, data={"liveness": "off"})
                r.raise_for_status()
                seq = max(seq, r.json()["seq"])

            def identify(data: bytes, mode: str) -> tuple[float, dict]:
                t0 = time.perf_counter()
                r = client.post("/v1/identify", params={"liveness": mode, "min_seq": seq},
                                files={"image": ("probe.jpg", data)})
                ms = (time.perf_counter() - t0) * 1000.0
                r.raise_for_status()
                return ms, r.json()

            for data in probes[:3]:  # warm-up both paths
                identify(data, "off")
                identify(data, "flag")
            lat: dict[str, list[float]] = {"off": [], "flag": []}
            stage_ms: list[float] = []
            for i in range(n_requests):
                data = probes[i % len(probes)]
                order = ("off", "flag") if i % 2 == 0 else ("flag", "off")
                for mode in order:
                    ms, body = identify(data, mode)
                    lat[mode].append(ms)
                    if mode == "flag":
                        stage_ms.append(float(body["timings_ms"].get("liveness", 0.0)))
            for sid in created:
                client.delete(f"/v1/subjects/{sid}")
    off, on = lat["off"], lat["flag"]
    print(f"\nidentify over HTTP, {n_requests} requests per mode, sequential, modes alternating:")
    print(f"  {'liveness':<10}{'p50 ms':>9}{'p95 ms':>9}{'mean ms':>9}")
    for mode, v in (("off", off), ("flag", on)):
        print(f"  {mode:<10}{_pct(v, 50):>9.1f}{_pct(v, 95):>9.1f}{statistics.fmean(v):>9.1f}")
    print(f"  ratio flag/off: p50 {_pct(on, 50) / _pct(off, 50):.2f}x, "
          f"p95 {_pct(on, 95) / _pct(off, 95):.2f}x, mean {statistics.fmean(on) / statistics.fmean(off):.2f}x")
    diffs = [b - a for a, b in zip(off, on)]  # the same probe, sent back to back
    print(f"  paired difference flag - off (same probe, back to back): median {statistics.median(diffs):+.1f} ms")
    print(f"  server-side liveness stage (timings_ms.liveness, flag): p50 {_pct(stage_ms, 50):.1f} ms")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-http", action="store_true", help="part A only (no Ray)")
    ap.add_argument("--url", help="use a running faceserve instead of starting one")
    ap.add_argument("--requests", type=int, default=30, help="identify requests per mode in part B")
    ap.add_argument("--repeats", type=int, default=20, help="timing repeats in part A")
    ap.add_argument("--threads", type=int, default=1, help="torch/OpenCV threads in part A (the deployment uses 1)")
    args = ap.parse_args(argv)
    print("== part A: in-process, no Ray ==")
    part_a(args.threads, args.repeats)
    if not args.no_http:
        print("\n== part B: over HTTP ==")
        part_b(args.url, args.requests)


if __name__ == "__main__":
    main()
