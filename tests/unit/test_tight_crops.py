"""Frame-filling faces are found at any size from 64 px, grey or colour,
whatever the margin: 240 synthetic tight crops of the test photos (models/degrade.py),
every one must give exactly its face with landmarks near the reference's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.degrade import (TIGHT_LONG_SIDES, TIGHT_MARGINS, TightCrop, reference_faces,
                            tight_crop_variants)
from models.detection import YuNetDetector

PER_FACE = 10
# Max landmark error in reference eye distances: on this set YuNet's worst
# point per crop has median 0.15 and maximum 0.42; a fragment or a
# neighbouring structure is off by well over 1.
LANDMARK_TOLERANCE = 0.5


@pytest.fixture(scope="module")
def crops(faces_dir: Path) -> list[TightCrop]:
    refs = reference_faces(faces_dir, YuNetDetector(max_side=None))
    return list(tight_crop_variants(refs, PER_FACE, seed=0))


def _error(found: np.ndarray, ref: np.ndarray) -> float:
    eye = float(np.linalg.norm(ref[1] - ref[0]))
    return float(np.linalg.norm(found - ref, axis=1).max() / eye)


def test_set_covers_the_brief(crops: list[TightCrop]) -> None:
    assert len(crops) >= 200
    assert {c.grey for c in crops} == {True, False}
    assert {c.margin for c in crops} == set(TIGHT_MARGINS)
    assert min(max(c.image.shape[:2]) for c in crops) == min(TIGHT_LONG_SIDES) == 64
    assert max(max(c.image.shape[:2]) for c in crops) == 160
    assert len({round(c.aspect, 2) for c in crops}) >= 3
    assert any(c.jpeg_quality for c in crops) and any(c.tilt for c in crops)
    # Deterministic: the same seed rebuilds the same pixels.
    again = next(tight_crop_variants([("x", crops[0].image, (10.0, 10.0, 50.0, 60.0),
                                       np.zeros((5, 2), np.float32))], 1, seed=3))
    same = next(tight_crop_variants([("x", crops[0].image, (10.0, 10.0, 50.0, 60.0),
                                      np.zeros((5, 2), np.float32))], 1, seed=3))
    assert np.array_equal(again.image, same.image)


def test_every_tight_crop_is_found(yunet, crops: list[TightCrop]) -> None:
    missed = []
    errors = []
    for c in crops:
        faces = yunet.detect(c.image)
        if len(faces) != 1:
            missed.append(f"{c.name}: {len(faces)} faces")
            continue
        f = faces[0]
        err = _error(f.landmarks, c.landmarks)
        errors.append(err)
        (rex, _), (lex, _), _, (rmx, _), (lmx, _) = f.landmarks.tolist()
        if err > LANDMARK_TOLERANCE or not (rex < lex and rmx < lmx):
            missed.append(f"{c.name}: landmarks off by {err:.2f} eye distances")
        h, w = c.image.shape[:2]
        if not (f.width > 0.3 * w or f.height > 0.3 * h):
            missed.append(f"{c.name}: a {f.width:.0f}x{f.height:.0f} fragment")
    assert not missed, f"{len(missed)}/{len(crops)} missed: {missed[:10]}"
    assert float(np.median(errors)) < 0.2


def test_mtcnn_on_a_sample(mtcnn, crops: list[TightCrop]) -> None:
    """MTCNN (not the default detector) costs ~1 s a crop on the 2-core
    machine: every 8th crop only. It misses one of these 30, the hardest: the
    spoof photo image_F1 cut inside the face box (margin -0.1, aspect 0.7),
    out of focus and tilted 12 degrees (YuNet finds it); more is a regression."""
    sample = crops[::8]
    missed = [c.name for c in sample
              if len(faces := mtcnn.detect(c.image)) != 1
              or _error(faces[0].landmarks, c.landmarks) > LANDMARK_TOLERANCE]
    assert len(missed) <= 1, f"{len(missed)}/{len(sample)} missed: {missed}"
