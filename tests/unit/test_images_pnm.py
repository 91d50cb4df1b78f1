"""PGM/PPM (Netpbm) decode: the format older face datasets ship in.

Built from a real photo: grey PGM and colour PPM, binary (P5/P6) and ASCII
(P2/P3), 16-bit PGM, a maxval below 255, and a truncated file.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models import images as I
from models.images import decode_image


@pytest.fixture(scope="module")
def rgb(faces_dir: Path) -> np.ndarray:
    """obama_240p (427x240), cut to 200x160 to keep the ASCII files small."""
    im = Image.open(faces_dir / "people" / "obama" / "obama_240p.jpg").convert("RGB")
    return np.asarray(im)[20:180, 100:300].copy()


@pytest.fixture(scope="module")
def grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"))


def _binary(magic: bytes, arr: np.ndarray, maxval: int = 255) -> bytes:
    h, w = arr.shape[:2]
    header = magic + b"\n# faceserve test\n" + f"{w} {h}\n{maxval}\n".encode()
    body = arr.astype(">u2").tobytes() if maxval > 255 else arr.astype(np.uint8).tobytes()
    return header + body


def _ascii(magic: bytes, arr: np.ndarray, maxval: int = 255) -> bytes:
    h, w = arr.shape[:2]
    rows = [" ".join(str(int(v)) for v in row.reshape(-1)) for row in arr]
    return magic + f"\n{w} {h}\n{maxval}\n".encode() + "\n".join(rows).encode() + b"\n"


def _check_grey(out: np.ndarray, grey: np.ndarray, tol: int = 0) -> None:
    assert out.shape == (*grey.shape, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert np.array_equal(out[:, :, 0], out[:, :, 1]) and np.array_equal(out[:, :, 0], out[:, :, 2])
    assert np.abs(out[:, :, 0].astype(int) - grey.astype(int)).max() <= tol


def test_p5_binary_pgm(grey: np.ndarray) -> None:
    _check_grey(decode_image(_binary(b"P5", grey)), grey)


def test_p5_written_by_pillow(grey: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PPM")  # mode L -> P5
    assert buf.getvalue().startswith(b"P5")
    _check_grey(decode_image(buf.getvalue()), grey)


def test_p2_ascii_pgm(grey: np.ndarray) -> None:
    _check_grey(decode_image(_ascii(b"P2", grey)), grey)


def test_p6_binary_ppm(rgb: np.ndarray) -> None:
    out = decode_image(_binary(b"P6", rgb))
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert np.array_equal(out, rgb)


def test_p3_ascii_ppm(rgb: np.ndarray) -> None:
    assert np.array_equal(decode_image(_ascii(b"P3", rgb)), rgb)


def test_16_bit_pgm_is_scaled_not_clipped(grey: np.ndarray) -> None:
    """65535-maxval samples (v * 257) must come back as v, not saturate at 255."""
    out = decode_image(_binary(b"P5", grey.astype(np.uint16) * 257, maxval=65535))
    _check_grey(out, grey, tol=1)


def test_maxval_below_255_is_scaled(grey: np.ndarray) -> None:
    """A 4-bit PGM (maxval 15) spans the full 0-255 range once decoded."""
    nibbles = (grey // 17).astype(np.uint8)
    out = decode_image(_binary(b"P5", nibbles, maxval=15))
    _check_grey(out, (nibbles.astype(int) * 17).astype(np.uint8), tol=1)


def test_a_face_is_found_in_a_pgm(grey: np.ndarray, yunet) -> None:
    assert len(yunet.detect(decode_image(_binary(b"P5", grey)))) == 1


def test_truncated_pgm_is_a_decode_error(grey: np.ndarray) -> None:
    data = _binary(b"P5", grey)
    error = getattr(I, "ImageUnreadable", None) or getattr(I, "ImageDecodeError")
    with pytest.raises(error):
        decode_image(data[: len(data) // 2])
