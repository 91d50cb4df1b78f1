"""Decode untrusted image bytes into an RGB uint8 array, once, at the ingress.

Limits are checked before any pixel is decoded: the byte size first, then the
pixel count from the header, so a small file that expands to gigabytes (a
decompression bomb) is refused without allocating its pixels.
"""
from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps

from models.detailed_error import DetailedError
# Register the decoders we accept: Image.open(formats=...) looks them up in
# the registry, which a bare preinit() only partly fills (no WebP).
from PIL import (  # noqa: F401
    BmpImagePlugin,
    GifImagePlugin,
    JpegImagePlugin,
    MpoImagePlugin,
    PngImagePlugin,
    PpmImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)


class ImageError(DetailedError, ValueError):
    """Bytes that cannot become a picture; ``code`` names why, for callers."""

    code = "image_error"


class ImageUnreadable(ImageError):
    """Claims to be an image but cannot be decoded (truncated, corrupt)."""

    code = "image_unreadable"


class ImageUnsupported(ImageError):
    """Not one of the accepted formats (or not an image at all)."""

    code = "unsupported_media_type"


class ImageTooLarge(ImageError):
    """Over the byte, pixel or memory limit (decompression bombs)."""

    code = "image_too_large"


# Old names, kept for callers written before the rename.
ImageDecodeError = ImageUnreadable
UnsupportedImageType = ImageUnsupported

DEFAULT_MAX_BYTES = 15_000_000
DEFAULT_MAX_PIXELS = 40_000_000

# Pillow plugins we let parse untrusted input. Restricting Image.open to these
# keeps exotic decoders (EPS calls Ghostscript, etc.) out of reach. Phone
# "MPO" JPEGs come through the JPEG opener.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "PPM")
_FORMAT_LIST = "JPEG, PNG, WebP, BMP, TIFF, GIF or PGM/PPM"


def sniff_format(data: bytes | bytearray | memoryview) -> str | None:
    """Name the container from its magic bytes (None if unrecognised).

    Also names a few image formats we do not decode (HEIC, AVIF, JPEG 2000 ...)
    so callers can tell "unsupported image" apart from "not an image".
    """
    head = bytes(data[:32])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM") and len(head) >= 18:
        # "BM" alone is too weak (any text may start with it): also require a
        # known DIB header size.
        if int.from_bytes(head[14:18], "little") in (12, 16, 40, 52, 56, 64, 108, 124):
            return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    # Netpbm (PBM/PGM/PPM, ASCII P1-P3 and binary P4-P6): "P" + digit + whitespace.
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"123456" and head[2:3] in b" \t\r\n#":
        return "PPM"
    if len(head) >= 12 and head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1", b"heim", b"heis"):
            return "HEIC"
    if head.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n") or head.startswith(b"\xff\x4f\xff\x51"):
        return "JPEG2000"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL "):
        return "JXL"
    return None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageUnreadable(f"image has invalid dimensions {width}x{height}", width=width, height=height)
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
            width=width, height=height, max_pixels=max_pixels,
        )


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit grayscale to 8-bit by scaling, not clipping: Pillow's own
    convert("L") clips I;16 values at 255, which turns most photos white."""
    arr = np.asarray(im)
    if im.mode == "F":
        a = arr.astype(np.float64)
        finite = a[np.isfinite(a)]
        hi = float(finite.max()) if finite.size else 1.0
        scale = 255.0 if hi <= 1.0 else (255.0 / hi if hi > 255.0 else 1.0)
        out = np.nan_to_num(a * scale, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        # I;16* is 16-bit by definition; Pillow also reads 16-bit PNG/TIFF
        # grayscale as "I" in some versions, so "I" is treated as 16-bit too,
        # unless values show it is wider.
        a = arr.astype(np.int64)
        hi = int(a.max()) if a.size else 0
        denom = 65535.0 if hi <= 65535 else float(hi)
        out = np.clip(a, 0, None) * (255.0 / denom)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im) or im
    except (ValueError, KeyError, TypeError, OSError, SyntaxError, struct.error):
        # A mangled EXIF block should not cost the user their photo: the
        # pixels decoded fine, only the orientation hint is unusable.
        return im


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _high_bit_depth_to_l(im).convert("RGB")
    if mode == "P":
        # Palette images may carry transparency; go through RGBA so it is honoured.
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        # Composite on white: transparent backgrounds (cut-out portraits) then
        # look like a plain ID-photo backdrop instead of arbitrary hidden RGB.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV ...


@contextmanager
def open_checked(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[tuple[Image.Image, str]]:
    """Open untrusted bytes with Pillow, header only: size, format and pixel
    count are checked before any pixel is decoded. Yields (image, format)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"image must be bytes, got {type(data).__name__}")
    size = len(data)
    if size == 0:
        raise ImageUnreadable("image is empty (0 bytes)")
    if size > max_bytes:
        raise ImageTooLarge(f"image is {size} bytes, over the limit of {max_bytes}",
                            size=size, max_bytes=max_bytes)
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageUnsupported(f"not a recognised image; send {_FORMAT_LIST}",
                               supported=list(SUPPORTED_FORMATS))
    if fmt not in SUPPORTED_FORMATS:
        raise ImageUnsupported(f"{fmt} images are not supported; send {_FORMAT_LIST}",
                               format=fmt, supported=list(SUPPORTED_FORMATS))
    # No warnings.catch_warnings() here: it swaps process-global state and this
    # runs in thread pools. Our pixel limit is checked first anyway; Pillow's
    # own bomb error (over 2 x Image.MAX_IMAGE_PIXELS) is mapped below.
    try:
        with Image.open(io.BytesIO(bytes(data)), formats=SUPPORTED_FORMATS) as im:
            _check_pixels(im.width, im.height, max_pixels)  # header only, nothing decoded yet
            yield im, fmt
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image rejected as a decompression bomb: {exc}", format=fmt) from exc
    except ImageError:
        raise
    except Image.UnidentifiedImageError as exc:
        raise ImageUnreadable(f"{fmt} image could not be read: the header is corrupt", format=fmt) from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
            ZeroDivisionError, struct.error) as exc:
        # Pillow reports truncated/corrupt data with a grab bag of exception types.
        raise ImageUnreadable(f"{fmt} image is truncated or corrupt: {exc}", format=fmt) from exc


def decode_opened(im: Image.Image) -> np.ndarray:
    """An image from open_checked -> (H, W, 3) uint8 RGB, EXIF orientation applied."""
    im.load()
    im = _apply_exif_orientation(im)
    rgb = _to_rgb(im)
    arr = np.array(rgb, dtype=np.uint8)  # own copy: detached from PIL's buffer
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageUnreadable(f"decoded image has unexpected shape {arr.shape}")
    return np.ascontiguousarray(arr)


def decode_image(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Bytes -> (H, W, 3) uint8 RGB, C-contiguous, EXIF orientation applied."""
    with open_checked(data, max_bytes=max_bytes, max_pixels=max_pixels) as (im, _fmt):
        return decode_opened(im)
