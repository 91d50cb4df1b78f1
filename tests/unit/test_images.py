"""decode_image: formats, modes, EXIF orientation, limits and error types.

Every case is built from the real test photos (re-encoded, rotated, truncated)
rather than synthetic noise.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageFile

from models.images import ImageTooLarge, ImageUnreadable as ImageDecodeError, ImageUnsupported as UnsupportedImageType, decode_image, sniff_format

InvalidRequest = TypeError  # not bytes at all


@pytest.fixture(scope="module")
def small_jpeg(faces_dir: Path) -> bytes:
    return (faces_dir / "people" / "obama" / "obama_240p.jpg").read_bytes()


@pytest.fixture(scope="module")
def photo(small_jpeg: bytes) -> Image.Image:
    """obama_240p as a PIL RGB image (427x240), the source for re-encodings."""
    return Image.open(io.BytesIO(small_jpeg)).convert("RGB")


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _check_rgb(arr: np.ndarray, h: int, w: int) -> None:
    assert arr.shape == (h, w, 3) and arr.dtype == np.uint8 and arr.flags.c_contiguous


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --- formats and modes -------------------------------------------------------------
def test_jpeg(small_jpeg: bytes, photo: Image.Image) -> None:
    arr = decode_image(small_jpeg)
    _check_rgb(arr, 240, 427)
    assert np.array_equal(arr, np.asarray(photo))
    assert arr.flags.writeable


def test_png_rgba_transparency_composited_on_white(photo: Image.Image) -> None:
    rgba = photo.convert("RGBA")
    alpha = np.full((240, 427), 255, np.uint8)
    alpha[:, :100] = 0  # transparent left strip (a cut-out background)
    rgba.putalpha(Image.fromarray(alpha))
    arr = decode_image(_encode(rgba, "PNG"))
    _check_rgb(arr, 240, 427)
    assert (arr[:, :100] == 255).all()
    assert np.array_equal(arr[:, 100:], np.asarray(photo)[:, 100:])


def test_png_rgba_opaque_real_file(faces_dir: Path) -> None:
    data = (faces_dir / "people" / "lin_manuel_miranda" / "lin_1.png").read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGBA"
        expected = np.asarray(im.convert("RGB"))
    arr = decode_image(data)
    _check_rgb(arr, 612, 704)
    assert np.array_equal(arr, expected)


def test_grayscale_png(photo: Image.Image) -> None:
    gray = photo.convert("L")
    arr = decode_image(_encode(gray, "PNG"))
    _check_rgb(arr, 240, 427)
    g = np.asarray(gray)
    for c in range(3):
        assert np.array_equal(arr[..., c], g)


def test_16bit_grayscale_png_is_scaled_not_clipped(photo: Image.Image) -> None:
    g8 = np.asarray(photo.convert("L"))
    im16 = Image.fromarray((g8.astype(np.uint16) * 257))  # full 16-bit range
    data = _encode(im16, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    arr = decode_image(data)
    _check_rgb(arr, 240, 427)
    assert np.abs(arr[..., 0].astype(int) - g8).max() <= 1
    assert 0 < arr.mean() < 250  # clipping would turn nearly every pixel white


def test_16bit_rgb_png(photo: Image.Image) -> None:
    rgb16 = np.asarray(photo).astype(np.uint16) * 257
    ok, enc = cv2.imencode(".png", cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))
    assert ok
    arr = decode_image(enc.tobytes())
    _check_rgb(arr, 240, 427)
    assert np.abs(arr.astype(int) - np.asarray(photo)).max() <= 1


def test_palette_png_with_transparency(photo: Image.Image) -> None:
    pal = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    data = _encode(pal, "PNG", transparency=0)
    arr = decode_image(data)
    _check_rgb(arr, 240, 427)
    idx = np.asarray(pal)
    assert (arr[idx == 0] == 255).all()  # the transparent palette entry became white


def test_webp_lossless_and_lossy(photo: Image.Image) -> None:
    arr = decode_image(_encode(photo, "WEBP", lossless=True))
    _check_rgb(arr, 240, 427)
    assert np.array_equal(arr, np.asarray(photo))
    lossy = decode_image(_encode(photo, "WEBP", quality=70))
    _check_rgb(lossy, 240, 427)
    assert _diff(lossy, np.asarray(photo)) < 6


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF"])
def test_other_formats(photo: Image.Image, fmt: str) -> None:
    arr = decode_image(_encode(photo, fmt))
    _check_rgb(arr, 240, 427)
    assert _diff(arr, np.asarray(photo)) < (12 if fmt == "GIF" else 0.01)


def test_cmyk_jpeg(photo: Image.Image) -> None:
    arr = decode_image(_encode(photo.convert("CMYK"), "JPEG", quality=95))
    _check_rgb(arr, 240, 427)
    assert _diff(arr, np.asarray(photo)) < 6


def test_accepts_bytearray_and_memoryview(small_jpeg: bytes) -> None:
    a = decode_image(bytearray(small_jpeg))
    b = decode_image(memoryview(small_jpeg))
    assert np.array_equal(a, b)


# --- EXIF orientation --------------------------------------------------------------
@pytest.mark.parametrize(
    "orientation,stored",
    [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270), (3, Image.Transpose.ROTATE_180)],
)
def test_exif_orientation_applied(photo: Image.Image, yunet, orientation: int, stored: Image.Transpose) -> None:
    """Pixels stored rotated with the tag that tells viewers how to undo it,
    as phone cameras do: the decoder must hand back the upright photo."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(photo.transpose(stored), "JPEG", exif=exif.tobytes(), quality=95)
    arr = decode_image(data)
    _check_rgb(arr, 240, 427)  # landscape again
    assert _diff(arr, np.asarray(photo)) < 3
    faces = yunet.detect(arr)
    assert len(faces) == 1
    lm = faces[0].landmarks
    assert lm[:2, 1].max() < lm[3:, 1].min()  # upright: eyes above the mouth


def test_real_phone_photo_with_exif_rotation(faces_dir: Path) -> None:
    data = (faces_dir / "liveness" / "image_T1.jpg").read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        assert im.getexif().get(0x0112) == 6 and im.size == (640, 480)
    _check_rgb(decode_image(data), 640, 480)  # portrait after rotation


# --- errors ----------------------------------------------------------------------
def test_empty() -> None:
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")


def test_not_bytes() -> None:
    with pytest.raises(InvalidRequest):
        decode_image("/path/to/photo.jpg")  # type: ignore[arg-type]


def test_over_byte_limit(small_jpeg: bytes) -> None:
    with pytest.raises(ImageTooLarge):
        decode_image(small_jpeg, max_bytes=len(small_jpeg) - 1)
    decode_image(small_jpeg, max_bytes=len(small_jpeg))


@pytest.mark.parametrize("what", ["readme", "onnx", "reversed_jpeg", "eps", "pdf"])
def test_not_an_image(faces_dir: Path, models_dir: Path, small_jpeg: bytes, what: str) -> None:
    data = {
        "readme": (faces_dir / "README.md").read_bytes(),
        "onnx": (models_dir / "face_detection_yunet_2023mar.onnx").read_bytes()[:4096],
        "reversed_jpeg": small_jpeg[::-1],
        # Formats Pillow could open but we refuse (EPS would run Ghostscript).
        "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 427 240\n" + small_jpeg[:512],
        "pdf": b"%PDF-1.4\n" + small_jpeg[:512],
    }[what]
    with pytest.raises(UnsupportedImageType):
        decode_image(data)


def test_unsupported_image_format_named() -> None:
    heic_header = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    assert sniff_format(heic_header) == "HEIC"
    with pytest.raises(UnsupportedImageType, match="HEIC"):
        decode_image(heic_header)


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_jpeg(small_jpeg: bytes, keep: float) -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(small_jpeg[: int(len(small_jpeg) * keep)])


def test_truncated_png(faces_dir: Path) -> None:
    data = (faces_dir / "people" / "lin_manuel_miranda" / "lin_1.png").read_bytes()
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_corrupt_header(small_jpeg: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(small_jpeg[:3] + bytes(64))


def test_too_many_pixels(small_jpeg: bytes) -> None:
    with pytest.raises(ImageTooLarge) as err:
        decode_image(small_jpeg, max_pixels=427 * 240 - 1)
    assert err.value.details["width"] == 427 and err.value.details["height"] == 240
    decode_image(small_jpeg, max_pixels=427 * 240)


def _png_claiming_size(png: bytes, width: int, height: int) -> bytes:
    """A real PNG whose IHDR claims another size (with a valid CRC): the shape
    of a decompression bomb, checkable from the header alone."""
    assert png[12:16] == b"IHDR"
    body = struct.pack(">II", width, height) + png[24:29]
    chunk = b"IHDR" + body
    return png[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[33:]


def test_decompression_bomb_refused_before_decoding(photo: Image.Image, monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = _png_claiming_size(_encode(photo, "PNG"), 8000, 6000)  # 48 MP > 40 MP default
    assert Image.open(io.BytesIO(bomb)).size == (8000, 6000)

    def _no_load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", _no_load)
    with pytest.raises(ImageTooLarge):
        decode_image(bomb)


def test_pillow_bomb_error_mapped(photo: Image.Image) -> None:
    # Over Pillow's own hard limit (2 x 89.5 MP): Image.open itself raises.
    bomb = _png_claiming_size(_encode(photo, "PNG"), 20000, 10000)
    with pytest.raises(ImageTooLarge):
        decode_image(bomb, max_pixels=10**9)


# --- sniffing ----------------------------------------------------------------------
def test_sniff_format(photo: Image.Image, small_jpeg: bytes) -> None:
    assert sniff_format(small_jpeg) == "JPEG"
    assert sniff_format(_encode(photo, "PNG")) == "PNG"
    assert sniff_format(_encode(photo, "WEBP")) == "WEBP"
    assert sniff_format(_encode(photo, "GIF")) == "GIF"
    assert sniff_format(_encode(photo, "BMP")) == "BMP"
    assert sniff_format(_encode(photo, "TIFF")) == "TIFF"
    assert sniff_format(b"BMW is a car maker, not a bitmap") is None
    assert sniff_format(b"") is None
