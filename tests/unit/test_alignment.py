"""5-point alignment: the transform itself and agreement with OpenCV's alignCrop."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from models.alignment import (
    ARCFACE_TEMPLATE_112,
    align_face,
    align_faces,
    arcface_template,
    estimate_alignment,
    similarity_transform,
)


@pytest.fixture(scope="module")
def cv_recognizer(models_dir: Path):
    return cv2.FaceRecognizerSF.create(str(models_dir / "face_recognition_sface_2021dec.onnx"), "")


def test_template_scales_with_size() -> None:
    assert np.allclose(arcface_template(112), ARCFACE_TEMPLATE_112)
    assert np.allclose(arcface_template(224), ARCFACE_TEMPLATE_112 * 2)
    t = arcface_template(160)
    assert t[0, 0] < t[1, 0] and t[3, 0] < t[4, 0]  # viewer's-left points first


def test_similarity_transform_recovers_known_transform() -> None:
    angle, scale, shift = np.deg2rad(17.0), 2.3, np.array([40.0, -12.5])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = ARCFACE_TEMPLATE_112
    dst = scale * src @ rot.T + shift
    m = similarity_transform(src, dst)
    assert np.allclose(m[:, :2], scale * rot, atol=1e-9)
    assert np.allclose(m[:, 2], shift, atol=1e-9)


def test_no_reflection() -> None:
    mirrored = ARCFACE_TEMPLATE_112 * np.array([-1.0, 1.0])
    m = similarity_transform(mirrored, ARCFACE_TEMPLATE_112)
    assert np.linalg.det(m[:, :2]) > 0  # a mirror-image face is not flipped back


def test_template_landmarks_give_identity(load_rgb, faces_dir: Path) -> None:
    rgb = cv2.resize(load_rgb(faces_dir / "people" / "obama" / "obama_240p.jpg"), (112, 112))
    assert np.allclose(estimate_alignment(ARCFACE_TEMPLATE_112), [[1, 0, 0], [0, 1, 0]], atol=1e-9)
    assert np.array_equal(align_face(rgb, ARCFACE_TEMPLATE_112), rgb)


def test_degenerate_landmarks_rejected() -> None:
    with pytest.raises(ValueError):
        estimate_alignment(np.ones((5, 2)))
    with pytest.raises(ValueError):
        estimate_alignment(np.full((5, 2), np.nan))


def test_real_faces_land_on_template(yunet, load_rgb, people_photos: list[Path]) -> None:
    """The fit residual on real landmarks is a few pixels of the 112 crop."""
    worst = 0.0
    for path in people_photos:
        face = yunet.detect(load_rgb(path))[0]
        m = estimate_alignment(face.landmarks)
        mapped = face.landmarks @ m[:, :2].T + m[:, 2]
        worst = max(worst, float(np.abs(mapped - ARCFACE_TEMPLATE_112).max()))
    assert worst < 8.0


def test_matches_opencv_align_crop(yunet, cv_recognizer, load_rgb, people_photo: Path) -> None:
    """Same transform and border as FaceRecognizerSF.alignCrop (SFace's own
    preprocessing): pixel values differ by float rounding only."""
    rgb = load_rgb(people_photo)
    face = yunet.detect(rgb)[0]
    row = np.zeros((1, 15), np.float32)
    row[0, :4] = (face.box[0], face.box[1], face.width, face.height)
    row[0, 4:14] = face.landmarks.ravel()
    row[0, 14] = face.score
    theirs = cv_recognizer.alignCrop(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), row)
    ours = cv2.cvtColor(align_face(rgb, face.landmarks), cv2.COLOR_RGB2BGR)
    diff = np.abs(theirs.astype(np.int16) - ours.astype(np.int16))
    assert diff.max() <= 2 and diff.mean() < 0.05


def test_border_is_black_for_faces_at_the_edge(mtcnn, load_rgb, faces_dir: Path) -> None:
    rgb = load_rgb(faces_dir / "groups" / "obama_partial_face.jpg")
    face = mtcnn.detect(rgb)[0]
    assert face.landmarks[:, 0].min() < 0  # part of the face is outside the photo
    crop = align_face(rgb, face.landmarks)
    assert (crop[:, 0] == 0).all()  # outside the photo: constant 0, as alignCrop


def test_align_faces_batch(yunet, load_rgb, faces_dir: Path) -> None:
    rgb = load_rgb(faces_dir / "groups" / "obama_and_biden.jpg")
    faces = yunet.detect(rgb)
    batch = align_faces(rgb, faces, 112)
    assert batch.shape == (3, 112, 112, 3) and batch.dtype == np.uint8
    for i, f in enumerate(faces):
        assert np.array_equal(batch[i], align_face(rgb, f.landmarks))
    big = align_faces(rgb, faces[:1], 160)
    assert big.shape == (1, 160, 160, 3)
    # Same framing at another size: the 160 crop downsized looks like the 112 one.
    small = cv2.resize(big[0], (112, 112), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - batch[0].astype(int)).mean() < 6
    assert align_faces(rgb, [], 112).shape == (0, 112, 112, 3)
