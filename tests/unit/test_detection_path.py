"""The detector's per-image path: reduced decode, full-resolution regions, memory bound."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.detection import YuNetDetector
from models.embedding import SFaceEmbedder
from models.images import ImageTooLarge, ImageUnreadable, ImageUnsupported, decode_image
from models.pipeline import FacePipeline
from models.working_image import decode_working
from serve_app.deployment_config import DetectorConfig
from serve_app.detection_path import run_detection
from serve_app.messages import DetectOptions

REPO = Path(__file__).resolve().parents[2]
# Stated bound for decoding a 6300x6300 RGBA PNG through the detector path
# (docs/ARCHITECTURE.md, "Memory"): the whole image would be 159 MB of RGBA.
PEAK_RSS_BOUND_MB = 150


@pytest.fixture(scope="module")
def yunet() -> YuNetDetector:
    return YuNetDetector()


@pytest.fixture(scope="module")
def sface() -> SFaceEmbedder:
    return SFaceEmbedder(intra_op_threads=1)


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


def test_reduced_decode_matches_the_full_path(faces_dir: Path, yunet: YuNetDetector, sface: SFaceEmbedder) -> None:
    """Same faces and near-identical embeddings as decoding everything (models/pipeline.py)."""
    cfg, opts = DetectorConfig(), DetectOptions()
    reference = FacePipeline(yunet, sface)
    for photo in sorted((faces_dir / "people").rglob("*.jpg"))[:8]:
        data = photo.read_bytes()
        ref = reference.run(data)
        got = run_detection(yunet, data, cfg, opts)
        assert len(got) == len(ref.faces), photo.name
        if not len(got):
            continue
        vec = sface.embed(got.aligned)
        assert _cos(vec[0], ref.embeddings[0]) > 0.9, photo.name
        assert np.allclose(got.faces[0].box, ref.faces[0].box, atol=0.05 * ref.faces[0].width)


def test_small_face_in_a_big_image_is_cut_from_full_resolution(faces_dir: Path, yunet: YuNetDetector,
                                                                sface: SFaceEmbedder) -> None:
    """A face that is small in the working image is aligned from the original pixels."""
    face = Image.open(faces_dir / "people" / "obama" / "obama_240p.jpg").convert("RGB")
    canvas = Image.new("RGB", (4800, 3200), (90, 110, 100))
    big = face.resize((face.width * 2, face.height * 2), Image.Resampling.LANCZOS)
    canvas.paste(big, (3000, 1800))
    data = _encode(canvas, "JPEG", quality=92)
    work = decode_working(data, max_side=1280)
    assert work.full is None and work.scale < 0.3  # draft-decoded, not whole
    got = run_detection(yunet, data, DetectorConfig(), DetectOptions(liveness_crops=True, enrol_crops=True))
    assert len(got) == 1
    x1, y1, x2, y2 = got.faces[0].box
    assert 3000 < x1 < x2 < 3000 + big.width and 1800 < y1 < y2 < 1800 + big.height
    ref = FacePipeline(yunet, sface).run(_encode(big, "JPEG", quality=92))
    assert _cos(sface.embed(got.aligned)[0], ref.embeddings[0]) > 0.85
    assert got.liveness_crops is not None and all(c.shape == (1, 80, 80, 3) for c in got.liveness_crops.values())
    # full-resolution pixels: the face plus margins, not the ~30 px it is in the working image
    assert got.enrol_crops and Image.open(io.BytesIO(got.enrol_crops[0])).width > 1.4 * (x2 - x1)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_regions_follow_exif_orientation(faces_dir: Path, orientation: int) -> None:
    photo = Image.open(faces_dir / "people" / "obama" / "obama_240p.jpg").convert("RGB")
    stored = photo.resize((photo.width * 8, photo.height * 8))  # big enough for the draft path
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(stored, "JPEG", quality=90, exif=exif.tobytes())
    full = decode_image(data)
    work = decode_working(data, max_side=640)
    assert (work.original_size[0], work.original_size[1]) == (full.shape[1], full.shape[0])
    box = (100.0, 200.0, 700.0, 900.0)
    region, origin = work.region(box)
    assert origin == (100, 200)
    diff = np.abs(region.astype(int) - full[200:900, 100:700].astype(int)).mean()
    assert diff < 4.0, diff  # same pixels, up to JPEG decoder rounding


def test_big_png_streams_and_keeps_its_modes(faces_dir: Path) -> None:
    face = Image.open(faces_dir / "people" / "obama" / "obama_240p.jpg").convert("RGBA")
    canvas = Image.new("RGBA", (5000, 4000), (255, 255, 255, 0))  # transparent: composited on white
    canvas.paste(face.resize((1280, 720)), (1000, 1000))
    data = _encode(canvas, "PNG", compress_level=1)
    work = decode_working(data, max_side=1000, full_decode_bytes=10_000_000)
    assert work.full is None and work.source is not None and work.pixels.shape == (800, 1000, 3)
    assert work.pixels[5, 5].tolist() == [255, 255, 255]
    region, _ = work.region((1000, 1000, 2280, 1720))
    ref = np.asarray(face.resize((1280, 720)).convert("RGB"))
    assert np.abs(region.astype(int) - ref.astype(int)).mean() < 1.0


def test_16bit_grey_png_streamed(faces_dir: Path) -> None:
    grey = np.asarray(Image.open(faces_dir / "people" / "obama" / "obama_240p.jpg").convert("L").resize((3000, 1700)))
    im16 = Image.fromarray(grey.astype(np.uint16) * 257)
    data = _encode(im16, "PNG")
    work = decode_working(data, max_side=600, full_decode_bytes=2_000_000)
    assert work.full is None
    small = np.asarray(Image.fromarray(grey).resize(work.pixels.shape[1::-1], Image.Resampling.BOX))
    assert np.abs(work.pixels[..., 0].astype(int) - small.astype(int)).mean() < 3.0


@pytest.mark.parametrize("bad, error", [
    (b"", ImageUnreadable),
    (b"%PDF-1.4 nope", ImageUnsupported),
])
def test_bad_bytes(bad: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        decode_working(bad)


def test_truncated_big_png_is_unreadable(faces_dir: Path) -> None:
    face = Image.open(faces_dir / "people" / "obama" / "obama_240p.jpg").convert("RGB").resize((4000, 3000))
    data = _encode(face, "PNG", compress_level=1)
    with pytest.raises(ImageUnreadable):
        decode_working(data[: len(data) // 2], max_side=800, full_decode_bytes=1_000_000)


def test_pixel_limit_checked_from_the_header() -> None:
    data = _encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageTooLarge):
        decode_working(data, max_pixels=1_000_000)


def test_peak_memory_of_a_6300px_png_is_bounded(faces_dir: Path, tmp_path: Path) -> None:
    face = Image.open(faces_dir / "people" / "obama" / "obama_240p.jpg").convert("RGBA")
    canvas = Image.new("RGBA", (6300, 6300), (40, 60, 80, 255))
    canvas.paste(face.resize((1708, 960)), (2000, 2500))
    path = tmp_path / "big.png"
    canvas.save(path, "PNG")
    del canvas
    assert path.stat().st_size < 15_000_000
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        from models.detection import YuNetDetector
        from serve_app.deployment_config import DetectorConfig
        from serve_app.detection_path import run_detection
        from serve_app.messages import DetectOptions
        det = YuNetDetector()
        data = open({str(path)!r}, 'rb').read()
        small = open({str(faces_dir / "people" / 'obama' / 'obama_240p.jpg')!r}, 'rb').read()
        opts = DetectOptions(liveness_crops=True, enrol_crops=True)
        run_detection(det, small, DetectorConfig(), opts)  # warm every code path on a small image
        # and the detector's buffers at the working size, which every replica keeps once it has
        # seen one large photo: steady state, not the first call's allocations.
        import numpy as np
        det.detect(np.zeros((1280, 1280, 3), np.uint8))
        def status(key):
            return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1])
        # Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, so the
        # peak read afterwards belongs to this decode alone.
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        before = status('VmRSS:')
        result = run_detection(det, data, DetectorConfig(), opts)
        after = status('VmHWM:')
        print(json.dumps({{"faces": len(result), "growth_mb": (after - before) / 1024}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={"FACE_MODELS_DIR": str(faces_dir.parent / "models"), "PATH": "/usr/bin:/bin",
                              "VIPS_CONCURRENCY": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print("peak RSS growth decoding a 6300x6300 RGBA PNG:", result)
    assert result["faces"] == 1
    assert result["growth_mb"] > 0  # the measurement sees the work
    assert result["growth_mb"] < PEAK_RSS_BOUND_MB


def test_relandmarking_on_a_small_tilted_face_helps_alignment(faces_dir: Path, yunet: YuNetDetector,
                                                               sface: SFaceEmbedder) -> None:
    """The Detector's `relandmark` option: MTCNN's points for faces whose own
    points are unreliable (docs/ACCURACY.md: obama_240p turned 30 degrees)."""
    from models.alignment import Relandmarker
    from models.detection import MTCNNDetector

    src = Image.open(faces_dir / "people" / "obama" / "obama_240p.jpg").convert("RGB")
    tilted = _encode(src.rotate(30, resample=Image.Resampling.BICUBIC, expand=True), "JPEG", quality=92)
    reference = sface.embed(run_detection(yunet, (faces_dir / "people" / "obama" / "obama_1.jpg").read_bytes(),
                                          DetectorConfig(), DetectOptions()).aligned)[0]
    plain = run_detection(yunet, tilted, DetectorConfig(), DetectOptions())
    fixed = run_detection(yunet, tilted, DetectorConfig(relandmark="small_or_flagged"), DetectOptions(),
                          relandmarker=Relandmarker(MTCNNDetector(torch_threads=1), policy="small_or_flagged"))
    assert len(plain) == len(fixed) == 1
    before, after = _cos(sface.embed(plain.aligned)[0], reference), _cos(sface.embed(fixed.aligned)[0], reference)
    print(f"relandmarking, obama_240p turned 30 degrees: similarity to obama_1 {before:.3f} -> {after:.3f}")
    assert after > before, (before, after)
