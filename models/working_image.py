"""Decode an upload only as far as detection needs, with bounded memory.

The detector works on a *working image* whose long side is at most
``max_side``; decoding a 40 MP photo whole just to shrink it costs ~120 MB
and tens of milliseconds. So:

- JPEG: Pillow's draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale
  directly (the DCT is scaled), then a small resize reaches ``max_side``.
- Other formats whose full decode fits ``full_decode_bytes``: Pillow decodes
  them whole (models/images.py, all its mode handling), then they are shrunk.
- Anything larger: libvips (pyvips) shrinks them while streaming the rows,
  so a 6300x6300 RGBA PNG never exists in memory at full size.

Faces that come out small in the working image are re-read at full
resolution from the original bytes, but only the region around each face
(``WorkingImage.region``), so alignment and liveness see real pixels.

Every limit is checked from the header before a pixel is decoded; errors
are ValueError subclasses from models/images.py.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

from models.images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    ImageUnreadable,
    decode_opened,
    open_checked,
)

DEFAULT_MAX_SIDE = 1280
# Largest full decode done with Pillow (bytes of decoded samples); above it
# the streaming decoder takes over. 48 MB: a 16 MP RGB photo.
DEFAULT_FULL_DECODE_BYTES = 48_000_000
# Largest full-resolution region read back around faces (pixels).
MAX_REGION_PIXELS = 16_000_000

_VIPS_LOCK = threading.Lock()
_VIPS: Any = None


def _vips() -> Any:
    """pyvips, configured once: no operation cache (it would pin decoded
    images in memory) and only trusted loaders."""
    global _VIPS
    with _VIPS_LOCK:
        if _VIPS is None:
            import pyvips

            pyvips.cache_set_max(0)
            pyvips.cache_set_max_mem(0)
            pyvips.block_untrusted_set(True)
            _VIPS = pyvips
    return _VIPS


# PIL transpose for each EXIF orientation (as ImageOps.exif_transpose does).
_ORIENT_OPS: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _to_stored(rect: tuple[float, float, float, float], orientation: int,
               stored_w: int, stored_h: int) -> tuple[float, float, float, float]:
    """A rectangle in oriented (displayed) coordinates -> the stored image's."""
    x1, y1, x2, y2 = rect
    W, H = stored_w, stored_h
    corners = [(x1, y1), (x2, y2)]
    out = []
    for x, y in corners:
        if orientation == 2:
            p = (W - x, y)
        elif orientation == 3:
            p = (W - x, H - y)
        elif orientation == 4:
            p = (x, H - y)
        elif orientation == 5:
            p = (y, x)
        elif orientation == 6:  # displayed = stored rotated 90 deg clockwise
            p = (y, H - x)
        elif orientation == 7:
            p = (W - y, H - x)
        elif orientation == 8:  # displayed = stored rotated 90 deg counter-clockwise
            p = (W - y, x)
        else:
            p = (x, y)
        out.append(p)
    (ax, ay), (bx, by) = out
    return min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)


def _vips_to_rgb(img: Any) -> np.ndarray:
    """Any libvips image -> (h, w, 3) uint8 RGB, alpha composited on white."""
    if img.interpretation == "cmyk":
        img = img.colourspace("srgb")
    if img.hasalpha():
        img = img.flatten(background=[255.0] * (img.bands - 1))
    if img.format in ("float", "double", "complex", "dpcomplex"):
        hi = float(img.max())
        img = img * (255.0 / hi if hi > 255.0 else (255.0 if hi <= 1.0 else 1.0))
    elif img.format in ("ushort", "short", "uint", "int"):
        hi = 65535.0 if img.format in ("ushort", "short") else float(max(img.max(), 1.0))
        img = img * (255.0 / hi)
    if img.format != "uchar":
        img = img.cast("uchar")  # libvips clips to 0-255
    if img.bands == 1:
        img = img.bandjoin([img, img])
    elif img.bands == 2:  # grey + something that was not alpha
        img = img[0].bandjoin([img[0], img[0]])
    elif img.bands > 3:
        img = img[0:3]
    return np.ascontiguousarray(img.numpy(), dtype=np.uint8)


@dataclass
class WorkingImage:
    """What the detector searches, plus the means to read face regions back."""

    pixels: np.ndarray  # (h, w, 3) uint8 RGB, long side <= max_side
    scale: float  # working pixels per original pixel (<= 1)
    original_size: tuple[int, int]  # (width, height) after EXIF orientation
    format: str
    full: np.ndarray | None = None  # the whole image when it was decoded whole
    source: bytes | None = None  # original bytes, for streamed region reads
    orientation: int = 1
    stored_size: tuple[int, int] = (0, 0)  # (width, height) as stored, before orientation

    def region(self, box: tuple[float, float, float, float]) -> tuple[np.ndarray, tuple[int, int]]:
        """Full-resolution pixels of ``box`` (original coordinates, clamped to
        the image), and the region's top-left corner."""
        W, H = self.original_size
        x1, y1 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
        x2, y2 = min(W, int(np.ceil(box[2]))), min(H, int(np.ceil(box[3])))
        if x2 <= x1 or y2 <= y1:
            raise ValueError(f"region {box} is outside the {W}x{H} image")
        if (x2 - x1) * (y2 - y1) > MAX_REGION_PIXELS:
            raise ValueError(f"region {box} is larger than {MAX_REGION_PIXELS} pixels")
        if self.full is not None:
            return self.full[y1:y2, x1:x2], (x1, y1)
        if self.source is None:
            raise ValueError("a working image holds either the whole image or its source bytes")
        vips = _vips()
        sw, sh = self.stored_size
        sx1, sy1, sx2, sy2 = _to_stored((x1, y1, x2, y2), self.orientation, sw, sh)
        sx1, sy1 = max(0, int(sx1)), max(0, int(sy1))
        sx2, sy2 = min(sw, int(np.ceil(sx2))), min(sh, int(np.ceil(sy2)))
        try:
            img = vips.Image.new_from_buffer(self.source, "", access="sequential", fail_on="truncated")
            crop = _vips_to_rgb(img.crop(sx1, sy1, sx2 - sx1, sy2 - sy1))
        except vips.Error as exc:
            raise ImageUnreadable(f"{self.format} image could not be read: {exc}".strip()) from exc
        if self.orientation in _ORIENT_OPS:
            crop = np.asarray(Image.fromarray(crop).transpose(_ORIENT_OPS[self.orientation]))
        return np.ascontiguousarray(crop), (x1, y1)


def _shrink(rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb, 1.0
    scale = max_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), scale


def decode_working(
    data: bytes,
    *,
    max_side: int = DEFAULT_MAX_SIDE,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    full_decode_bytes: int = DEFAULT_FULL_DECODE_BYTES,
) -> WorkingImage:
    """Bytes -> WorkingImage. Raises ImageError subclasses (ValueError)."""
    with open_checked(data, max_bytes=max_bytes, max_pixels=max_pixels) as (im, fmt):
        stored_w, stored_h = im.size
        orientation = _orientation(im)
        if orientation in (5, 6, 7, 8):
            ow, oh = stored_h, stored_w
        else:
            ow, oh = stored_w, stored_h
        small_enough = max(ow, oh) <= max_side
        if fmt == "JPEG" and not small_enough:
            # Draft mode: libjpeg decodes at the smallest 1/2^k scale that is
            # still at least max_side, so the rest is a light resize.
            target = max_side / max(ow, oh)
            im.draft("RGB", (max(1, int(stored_w * target)), max(1, int(stored_h * target))))
            rgb = decode_opened(im)
            pixels, _ = _shrink(rgb, max_side)
            return WorkingImage(pixels, pixels.shape[1] / ow, (ow, oh), fmt, source=bytes(data),
                                orientation=orientation, stored_size=(stored_w, stored_h))
        if small_enough or _decoded_bytes(im) <= full_decode_bytes:
            full = decode_opened(im)
            pixels, scale = _shrink(full, max_side)
            oh2, ow2 = full.shape[:2]
            return WorkingImage(pixels, pixels.shape[1] / ow2, (ow2, oh2), fmt, full=full)
    return _decode_streaming(bytes(data), fmt, max_side, orientation, (stored_w, stored_h), (ow, oh))


def _decode_streaming(data: bytes, fmt: str, max_side: int, orientation: int,
                      stored: tuple[int, int], oriented: tuple[int, int]) -> WorkingImage:
    vips = _vips()
    try:
        # fail_on: a truncated file is an error, not a half-grey picture.
        thumb = vips.Image.thumbnail_buffer(data, max_side, height=max_side, size="down",
                                            option_string="[fail_on=truncated]")
        pixels = _vips_to_rgb(thumb)
    except vips.Error as exc:
        raise ImageUnreadable(f"{fmt} image is truncated or corrupt: {str(exc).strip()[:200]}",
                              format=fmt) from exc
    ow, oh = oriented
    if ow != oh and (pixels.shape[1] >= pixels.shape[0]) != (ow >= oh):
        # libvips and Pillow read the orientation differently; trust the pixels.
        ow, oh = oh, ow
    return WorkingImage(pixels, pixels.shape[1] / ow, (ow, oh), fmt, source=data,
                        orientation=orientation, stored_size=stored)


def _orientation(im: Image.Image) -> int:
    try:
        if im.format == "PNG":
            # PngImageFile.getexif() decodes the whole image to look for an
            # eXIf chunk after the pixels; only read one that came before them.
            raw = im.info.get("exif")
            exif = Image.Exif()
            if raw:
                exif.load(raw)
        else:
            exif = im.getexif()
        value = int(exif.get(0x0112, 1))
    except Exception:  # a mangled EXIF block: treat as upright, as decode_image does
        return 1
    return value if 1 <= value <= 8 else 1


def _decoded_bytes(im: Image.Image) -> int:
    """Bytes a full Pillow decode allocates for this image (samples only)."""
    bands = len(im.getbands())
    bits = {"1": 1, "L": 8, "P": 8, "RGB": 8, "RGBA": 8, "CMYK": 8, "LA": 8, "I;16": 16,
            "I;16B": 16, "I;16L": 16, "I": 32, "F": 32}.get(im.mode, 8)
    per_pixel = max(1, bands * bits // 8)
    # The RGB conversion holds a second copy while the first is alive.
    return im.width * im.height * (per_pixel + 3)

