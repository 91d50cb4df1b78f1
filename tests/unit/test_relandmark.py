"""Optional re-landmarking with MTCNN (models.alignment.Relandmarker)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from models.alignment import Relandmarker, align_face


@pytest.fixture(scope="module")
def tilted(faces_dir: Path, load_rgb, yunet):
    """obama_1 turned 35 degrees, with the true landmarks (the upright photo's, rotated along)."""
    rgb = load_rgb(faces_dir / "people" / "obama" / "obama_1.jpg")
    upright = yunet.detect(rgb)[0]
    h, w = rgb.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 35, 1.0)
    img = cv2.warpAffine(rgb, m, (w, h), borderMode=cv2.BORDER_REPLICATE)
    truth = upright.landmarks @ m[:, :2].T.astype(np.float32) + m[:, 2].astype(np.float32)
    return rgb, upright, img, truth


def _err(points: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(points - truth, axis=1).mean() / np.linalg.norm(truth[1] - truth[0]))


def test_mtcnn_points_fix_yunets_tilt(yunet, mtcnn, sface, tilted) -> None:
    rgb, upright, img, truth = tilted
    face = yunet.detect(img)[0]
    rl = Relandmarker(mtcnn, "always")
    better = rl.landmarks(img, face)
    assert _err(better, truth) < _err(face.landmarks, truth)
    ref = sface.embed(align_face(rgb, upright.landmarks)[None])[0]
    plain = float(sface.embed(align_face(img, face.landmarks)[None])[0] @ ref)
    fixed = float(sface.embed(rl.align(img, face)[None])[0] @ ref)
    assert fixed > plain


def test_small_tilted_face_is_relandmarked(yunet, mtcnn, sface, faces_dir: Path, load_rgb) -> None:
    """obama_240p turned 30 degrees: YuNet's points miss the tilt almost
    entirely; the default policy re-landmarks it (a small face) and the match
    to another photo of him goes from a miss to a clear hit."""
    small = load_rgb(faces_dir / "people" / "obama" / "obama_240p.jpg")
    h, w = small.shape[:2]
    img = cv2.warpAffine(small, cv2.getRotationMatrix2D((w / 2, h / 2), -30, 1.0), (w, h),
                         borderMode=cv2.BORDER_REPLICATE)
    face = yunet.detect(img)[0]
    rl = Relandmarker(mtcnn)
    assert rl.policy == "small_or_flagged" and rl.wants(img, face)
    other = load_rgb(faces_dir / "people" / "obama" / "obama_1.jpg")
    ref = sface.embed(align_face(other, yunet.detect(other)[0].landmarks)[None])[0]
    plain = float(sface.embed(align_face(img, face.landmarks)[None])[0] @ ref)
    fixed = float(sface.embed(rl.align(img, face)[None])[0] @ ref)
    assert fixed > plain + 0.1, (plain, fixed)


class _Counting:
    def __init__(self, det) -> None:
        self.det, self.calls = det, 0

    def detect(self, rgb):
        self.calls += 1
        return self.det.detect(rgb)


def test_policies(yunet, mtcnn, tilted) -> None:
    rgb, upright, img, _ = tilted
    counting = _Counting(mtcnn)
    # Large clean face: the default policy leaves it alone, "never" always does, "always" asks MTCNN.
    assert Relandmarker(counting).landmarks(rgb, upright) is upright.landmarks
    assert Relandmarker(counting, "never").landmarks(img, yunet.detect(img)[0]) is not None
    assert counting.calls == 0
    out = Relandmarker(counting, "always").landmarks(rgb, upright)
    assert counting.calls == 1 and out.shape == (5, 2) and out.dtype == np.float32
    assert np.abs(out - upright.landmarks).max() < 0.15 * upright.width
    with pytest.raises(ValueError):
        Relandmarker(mtcnn, "sometimes")


def test_falls_back_when_the_second_detector_finds_nothing(yunet, mtcnn, faces_dir: Path, load_rgb) -> None:
    rgb = load_rgb(faces_dir / "people" / "obama" / "obama_1.jpg")
    face = yunet.detect(rgb)[0]
    blank = np.zeros_like(rgb)  # same geometry, nothing to find
    assert Relandmarker(mtcnn, "always").landmarks(blank, face) is face.landmarks
