"""Deterministic image degradations and tight face crops, for tests and calibration.

Real photos made worse in the ways users' photos are worse (small, blurred,
JPEG-crushed, tilted, dark, grey, cropped to the face), rather than synthetic
noise: noise has no face in it. Everything here is a pure function of its
arguments (no global RNG), so a test or a calibration run can rebuild exactly
the same set.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from models.detection import FaceDetector

Box = tuple[float, float, float, float]  # x1, y1, x2, y2


def _check(rgb: np.ndarray) -> np.ndarray:
    if not isinstance(rgb, np.ndarray) or rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {getattr(rgb, 'shape', type(rgb))}")
    return rgb


def to_grey(rgb: np.ndarray) -> np.ndarray:
    """Greyscale kept as 3 identical channels (how a decoded PGM arrives)."""
    g = cv2.cvtColor(_check(rgb), cv2.COLOR_RGB2GRAY)
    return np.ascontiguousarray(np.repeat(g[:, :, None], 3, axis=2))


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(_check(rgb), cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return np.ascontiguousarray(cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB))


def blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(_check(rgb), (0, 0), sigmaX=float(sigma))


def scale_long_side(rgb: np.ndarray, long_side: int) -> np.ndarray:
    h, w = _check(rgb).shape[:2]
    s = long_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)


def downscale(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Lose detail, keep the size: shrink by ``factor`` then enlarge back
    (a small or distant face that was upscaled by the client)."""
    h, w = _check(rgb).shape[:2]
    small = cv2.resize(rgb, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def rotate(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """In-plane rotation about the centre, same size, edges replicated."""
    h, w = _check(rgb).shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), float(degrees), 1.0)
    return cv2.warpAffine(rgb, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def brightness(rgb: np.ndarray, gain: float, gamma: float = 1.0) -> np.ndarray:
    """Scale intensities (gain < 1 darkens) after a gamma curve (gamma > 1 darkens midtones)."""
    x = _check(rgb).astype(np.float32) / 255.0
    x = np.power(x, float(gamma)) * float(gain)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def noise(rgb: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """Sensor-like Gaussian noise; ``seed`` makes it reproducible."""
    rng = np.random.default_rng(seed)
    x = _check(rgb).astype(np.float32) + rng.normal(0.0, float(sigma), rgb.shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def crop_around(rgb: np.ndarray, box: Box, margin: float, aspect: float | None = None,
                shift: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, tuple[int, int]]:
    """Crop centred on ``box``: height = box height x (1 + 2 margin), width =
    height x aspect (the box's own aspect when None); ``shift`` moves the
    centre by fractions of the box size. Clipped to the image. Returns the
    crop and its top-left corner in the source image (to map points)."""
    h, w = _check(rgb).shape[:2]
    bw, bh = box[2] - box[0], box[3] - box[1]
    if bw <= 0 or bh <= 0:
        raise ValueError(f"empty box {box}")
    cx = (box[0] + box[2]) / 2 + shift[0] * bw
    cy = (box[1] + box[3]) / 2 + shift[1] * bh
    ch = bh * (1 + 2 * margin)
    cw = ch * (aspect if aspect is not None else bw / bh)
    x1, y1 = max(int(round(cx - cw / 2)), 0), max(int(round(cy - ch / 2)), 0)
    x2, y2 = min(int(round(cx + cw / 2)), w), min(int(round(cy + ch / 2)), h)
    if x2 - x1 < 2 or y2 - y1 < 2:
        raise ValueError(f"crop of {box} with margin {margin} is empty")
    return np.ascontiguousarray(rgb[y1:y2, x1:x2]), (x1, y1)


# --- tight crops -------------------------------------------------------------------
@dataclass(frozen=True)
class TightCrop:
    """One frame-filling face: the image and where the face's landmarks are in it."""

    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    landmarks: np.ndarray  # (5, 2) float32, reference landmarks mapped into the crop
    margin: float
    aspect: float
    long_side: int
    grey: bool
    jpeg_quality: int | None
    tilt: float = 0.0
    look: str = "plain"


# The grid the variants are drawn from. Margins are per side, as a fraction of
# the face box height: negative cuts into forehead and chin (tighter than the
# detector's box), 0.45 is an ID photo with hair, neck and background. Aspects
# are width/height: 92/112 (older face datasets), square thumbnails, narrow
# portrait crops, wide crops with background at the sides. Looks are what a
# cheap camera or an old scan does to the whole picture.
TIGHT_MARGINS: tuple[float, ...] = (-0.1, 0.0, 0.1, 0.2, 0.3, 0.45)
TIGHT_ASPECTS: tuple[float, ...] = (92 / 112, 1.0, 0.7, 1.25)
TIGHT_LONG_SIDES: tuple[int, ...] = (64, 80, 92, 112, 128, 160)
TIGHT_JPEG: tuple[int | None, ...] = (None, None, 85, 50)
TIGHT_TILTS: tuple[float, ...] = (0.0, 0.0, -12.0, -6.0, 6.0, 12.0)
TIGHT_LOOKS: tuple[str, ...] = ("plain", "soft", "flat", "dark", "noisy")
# "Frame-filling from 64 px" means the face is most of those pixels: a draw
# whose face box would come out shorter than this gets the next larger size.
TIGHT_MIN_FACE_PX = 40


def _look(rgb: np.ndarray, look: str, face_height: float, seed: int) -> np.ndarray:
    """Applied at the source resolution, before the crop is shrunk."""
    if look == "plain":
        return rgb
    if look == "soft":  # out of focus: about a 60 px face's worth of detail left
        return blur(rgb, max(face_height / 60.0, 0.5))
    if look == "flat":  # low contrast, lifted blacks (old scan, haze)
        return np.clip(np.rint(rgb.astype(np.float32) * 0.5 + 64.0), 0, 255).astype(np.uint8)
    if look == "dark":
        return brightness(rgb, 0.45, 1.5)
    if look == "noisy":  # noise at the final scale is added after the shrink instead
        return rgb
    raise ValueError(f"unknown look {look!r}")


def tight_crop(rgb: np.ndarray, box: Box, landmarks: np.ndarray, *, margin: float, aspect: float,
               long_side: int, grey: bool = False, jpeg_quality: int | None = None,
               shift: tuple[float, float] = (0.0, 0.0), tilt: float = 0.0, look: str = "plain",
               seed: int = 0, name: str = "") -> TightCrop:
    """The face in ``box`` cropped with ``margin`` at ``aspect``, rotated by
    ``tilt`` degrees about the face centre (before cropping, so the frame
    stays filled), shrunk to ``long_side``, then made grey/JPEG as asked."""
    lms = np.asarray(landmarks, np.float32).reshape(5, 2)
    src = _look(_check(rgb), look, box[3] - box[1], seed)
    if tilt:
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        m = cv2.getRotationMatrix2D(centre, float(tilt), 1.0)
        src = cv2.warpAffine(src, m, (src.shape[1], src.shape[0]), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
        lms = (lms @ m[:, :2].T.astype(np.float32) + m[:, 2].astype(np.float32)).astype(np.float32)
    crop, (ox, oy) = crop_around(src, box, margin, aspect, shift)
    ch, cw = crop.shape[:2]
    s = long_side / max(ch, cw)
    size = (max(1, round(cw * s)), max(1, round(ch * s)))
    img = cv2.resize(crop, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    sx, sy = size[0] / cw, size[1] / ch
    lm = (lms - np.array([ox, oy], np.float32)) * np.array([sx, sy], np.float32)
    if look == "noisy":
        img = noise(img, 10.0, seed)
    if grey:
        img = to_grey(img)
    if jpeg_quality is not None:
        img = jpeg(img, jpeg_quality)
    return TightCrop(name, np.ascontiguousarray(img), lm.astype(np.float32), margin, aspect, long_side,
                     grey, jpeg_quality, tilt, look)


# Photos under ../shared/faces whose every face can serve as a reference (the
# partial face and the RGBA copy of obama_2 are left out), and faces left out:
# the child in obama_and_biden.jpg has both eyes hidden in the shadow of her
# hair, so her landmarks move by 0.4-0.6 eye distances between scales and
# cannot judge another detection's.
REFERENCE_SOURCES: tuple[str, ...] = ("people/*/*", "groups/kit_with_rose.jpg", "groups/obama_and_biden.jpg",
                                      "groups/two_people.jpg", "liveness/*")
EXCLUDED_FACES = frozenset({"obama_and_biden#2"})


def reference_faces(faces_dir: Path, detector: FaceDetector) -> list[tuple[str, np.ndarray, Box, np.ndarray]]:
    """(name, rgb, box, landmarks) of every face in the reference photos, from
    the detector's plain pass on the full-resolution photo (no second pass,
    no shrinking), so the reference does not depend on the code under test."""
    from models.images import decode_image

    out = []
    for pattern in REFERENCE_SOURCES:
        for path in sorted(Path(faces_dir).glob(pattern)):
            rgb = decode_image(path.read_bytes())
            h, w = rgb.shape[:2]
            faces = detector._finish(*detector._detect_raw(rgb), width=w, height=h)
            for i, face in enumerate(faces):
                if f"{path.stem}#{i}" not in EXCLUDED_FACES:
                    out.append((f"{path.stem}#{i}", rgb, face.box, face.landmarks))
    return out


def tight_crop_variants(faces: Sequence[tuple[str, np.ndarray, Box, np.ndarray]], per_face: int,
                        seed: int = 0) -> Iterator[TightCrop]:
    """``per_face`` tight crops of each (name, rgb, box, landmarks), every
    parameter drawn from the grids above with a seeded RNG: the same inputs
    and seed give the same crops. Half of them are greyscale, and the margins
    and looks cycle so each face gets each of them when per_face allows."""
    rng = np.random.default_rng(seed)
    for name, rgb, box, lms in faces:
        for k in range(per_face):
            margin = TIGHT_MARGINS[k % len(TIGHT_MARGINS)]
            look = TIGHT_LOOKS[k % len(TIGHT_LOOKS)]
            aspect = float(rng.choice(TIGHT_ASPECTS))
            long_side = int(rng.choice(TIGHT_LONG_SIDES))
            frame_per_face = (1 + 2 * margin) * max(1.0, aspect)  # crop long side / face box height
            long_side = next((s for s in sorted(TIGHT_LONG_SIDES)
                              if s >= long_side and s / frame_per_face >= TIGHT_MIN_FACE_PX),
                             max(TIGHT_LONG_SIDES))
            q = TIGHT_JPEG[int(rng.integers(len(TIGHT_JPEG)))]
            tilt = float(TIGHT_TILTS[int(rng.integers(len(TIGHT_TILTS)))])
            grey = bool(k % 2)
            shift = (float(rng.uniform(-0.06, 0.06)), float(rng.uniform(-0.06, 0.06)))
            label = (f"{name}:m{margin:+.2f}:a{aspect:.2f}:{long_side}px:{'grey' if grey else 'rgb'}"
                     f":q{q if q is not None else '-'}:t{tilt:+.0f}:{look}")
            yield tight_crop(rgb, box, lms, margin=margin, aspect=aspect, long_side=long_side, grey=grey,
                             jpeg_quality=q, shift=shift, tilt=tilt, look=look, seed=seed * 7919 + k,
                             name=label)


# --- named degradations for verification and calibration --------------------------
Degradation = Callable[[np.ndarray], np.ndarray]

DEGRADATIONS: dict[str, Degradation] = {
    "clean": lambda im: im,
    "blur2": lambda im: blur(im, 2.0),
    "blur4": lambda im: blur(im, 4.0),
    "jpeg25": lambda im: jpeg(im, 25),
    "jpeg10": lambda im: jpeg(im, 10),
    # On a portrait cut with margin 0.8 (scripts/calibrate.py) the face box is
    # about long side / 2.6: ~30 px and ~43 px.
    "small80": lambda im: scale_long_side(im, 80),
    "small112": lambda im: scale_long_side(im, 112),
    "lowres4": lambda im: downscale(im, 0.25),
    "rot15": lambda im: rotate(im, 15),
    "rot30": lambda im: rotate(im, -30),
    "dark": lambda im: brightness(im, 0.35, 1.6),
    "bright": lambda im: brightness(im, 1.8, 0.6),
    "grey": to_grey,
    "noise": lambda im: noise(im, 12.0, seed=7),
    "combo": lambda im: jpeg(blur(brightness(rotate(im, 10), 0.5, 1.3), 1.5), 30),
}


def degrade(rgb: np.ndarray, name: str) -> np.ndarray:
    try:
        fn = DEGRADATIONS[name]
    except KeyError:
        raise ValueError(f"unknown degradation {name!r}; choose one of {sorted(DEGRADATIONS)}") from None
    return np.ascontiguousarray(fn(_check(rgb)))
