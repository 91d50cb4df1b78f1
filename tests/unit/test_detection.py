"""YuNet and MTCNN on the shared test photos (every test runs for both,
through the parametrized ``detector`` fixture in conftest)."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

from models import detection as D
from models.detection import DetectedFace, YuNetDetector, make_detector
InvalidRequest = ValueError  # model code raises ValueError for bad input


def _check_face(face: DetectedFace, h: int, w: int, det) -> None:
    x1, y1, x2, y2 = face.box
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert face.landmarks.shape == (5, 2) and face.landmarks.dtype == np.float32
    assert face.score >= det.score_threshold
    assert min(face.width, face.height) >= det.min_face_size


def _tight_crop(rgb: np.ndarray, box: tuple[float, float, float, float], width: int,
                shrink: float = 1.0) -> np.ndarray:
    """The face box only (optionally shrunk about its centre), resized to ``width`` px wide."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    hw, hh = (box[2] - box[0]) / 2 * shrink, (box[3] - box[1]) / 2 * shrink
    x1, y1 = max(int(round(cx - hw)), 0), max(int(round(cy - hh)), 0)
    x2, y2 = min(int(round(cx + hw)), rgb.shape[1]), min(int(round(cy + hh)), rgb.shape[0])
    crop = rgb[y1:y2, x1:x2]
    height = max(1, round(crop.shape[0] * width / crop.shape[1]))
    return np.ascontiguousarray(cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA))


def test_photos_present(people_photos: list[Path]) -> None:
    assert len(people_photos) == 15
    assert len({p.parent.name for p in people_photos}) == 6


# --- counts ----------------------------------------------------------------------
def test_one_face_per_person_photo(detector, load_rgb, people_photo: Path) -> None:
    rgb = load_rgb(people_photo)
    faces = detector.detect(rgb)
    assert len(faces) == 1, [f.to_dict() for f in faces]
    _check_face(faces[0], *rgb.shape[:2], detector)


def test_group_counts(detector, load_rgb, faces_dir: Path, group_image: tuple[str, int]) -> None:
    name, expected = group_image
    rgb = load_rgb(faces_dir / "groups" / name)
    faces = detector.detect(rgb)
    assert len(faces) == expected, [f.to_dict() for f in faces]
    for f in faces:
        _check_face(f, *rgb.shape[:2], detector)
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)


def test_liveness_photos_one_face(detector, load_rgb, liveness_photo: Path) -> None:
    assert len(detector.detect(load_rgb(liveness_photo))) == 1


@pytest.mark.parametrize("width", [90, 120, 160])
def test_tight_crop_of_face_box(detector, load_rgb, detect_cached, people_photo: Path, width: int) -> None:
    """ID-photo style input: only the face box, down to 90 px wide."""
    rgb = load_rgb(people_photo)
    box = detect_cached(detector, people_photo, rgb)[0].box
    crop = _tight_crop(rgb, box, width)
    faces = detector.detect(crop)
    assert len(faces) == 1
    f = faces[0]
    _check_face(f, *crop.shape[:2], detector)
    assert f.width > 0.6 * width  # it is the face that fills the frame, not a fragment
    lm = f.landmarks
    assert (lm[:, 0] > -0.1 * width).all() and (lm[:, 0] < 1.1 * width).all()


@pytest.mark.parametrize("width", [90, 160])
def test_crop_tighter_than_face_box(detector, yunet, load_rgb, detect_cached, people_photo: Path,
                                    width: int) -> None:
    """Cropped inside YuNet's box (85 %), so forehead and chin touch the frame:
    MTCNN's first pass misses some of these, the padded second pass finds them."""
    rgb = load_rgb(people_photo)
    crop = _tight_crop(rgb, detect_cached(yunet, people_photo, rgb)[0].box, width, shrink=0.85)
    assert len(detector.detect(crop)) == 1


# --- landmarks -------------------------------------------------------------------
def test_landmark_sanity(detector, load_rgb, detect_cached, people_photo: Path) -> None:
    face = detect_cached(detector, people_photo, load_rgb(people_photo))[0]
    (rex, rey), (lex, ley), (nx, ny), (rmx, rmy), (lmx, lmy) = face.landmarks.tolist()
    # ArcFace order: the subject's right eye is on the viewer's left.
    assert rex < lex and rmx < lmx
    assert max(rey, ley) < ny < min(rmy, lmy)  # eyes above nose above mouth
    assert min(rex, rmx) < nx < max(lex, lmx)
    x1, y1, x2, y2 = face.box
    assert (face.landmarks[:, 0] > x1).all() and (face.landmarks[:, 0] < x2).all()
    assert (face.landmarks[:, 1] > y1).all() and (face.landmarks[:, 1] < y2).all()
    eye_dist = lex - rex
    assert 0.2 * face.width < eye_dist < 0.8 * face.width


def test_detectors_agree_on_landmarks(yunet, mtcnn, load_rgb, detect_cached, people_photo: Path) -> None:
    """Both detectors use the same 5-point order and roughly the same points."""
    rgb = load_rgb(people_photo)
    a, b = detect_cached(yunet, people_photo, rgb)[0], detect_cached(mtcnn, people_photo, rgb)[0]
    assert np.abs(a.landmarks - b.landmarks).max() < 0.15 * a.width


def test_partial_face_box_is_clipped(mtcnn, load_rgb, faces_dir: Path) -> None:
    rgb = load_rgb(faces_dir / "groups" / "obama_partial_face.jpg")
    face = mtcnn.detect(rgb)[0]
    assert face.box[0] == 0.0  # MTCNN's raw box starts left of the photo
    assert face.landmarks[:, 0].min() < 0  # landmarks keep their true positions


# --- second (padded) pass ---------------------------------------------------------
def test_padded_pass_maps_back_to_image_coordinates(detector, load_rgb, faces_dir: Path) -> None:
    rgb = load_rgb(faces_dir / "people" / "obama" / "obama_240p.jpg")
    plain = detector.detect(rgb)[0]
    padded = detector._detect_padded(rgb)
    assert len(padded) == 1
    assert D._iou(plain.box, padded[0].box) > 0.7
    assert np.abs(plain.landmarks - padded[0].landmarks).max() < 0.1 * plain.width


@pytest.mark.parametrize("name", ["obama/obama_240p.jpg", "kit_harington/kit_2.jpg",
                                  "lin_manuel_miranda/lin_1.png"])
def test_second_pass_only_for_frame_filling_faces(detector, load_rgb, faces_dir: Path, name: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    rgb = load_rgb(faces_dir / "people" / name)
    h, w = rgb.shape[:2]
    first = detector._finish(*detector._detect_raw(rgb), width=w, height=h)
    fills = any(f.width >= D.FRAME_FILL_FRACTION * w or f.height >= D.FRAME_FILL_FRACTION * h for f in first)
    calls: list[int] = []
    real = detector._detect_padded
    monkeypatch.setattr(detector, "_detect_padded", lambda img: calls.append(1) or real(img))
    faces = detector.detect(rgb)
    # Ordinary photos take one pass; a close-up (lin_1.png, the face is >60 %
    # of the frame height) takes two and still yields one face.
    assert len(calls) == int(fills) and len(faces) == 1
    calls.clear()
    faces = detector.detect(_tight_crop(rgb, faces[0].box, 120))
    assert calls == [1] and len(faces) == 1


def test_second_pass_finds_face_missed_by_first(yunet, load_rgb, faces_dir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    rgb = load_rgb(faces_dir / "people" / "kit_harington" / "kit_2.jpg")
    crop = _tight_crop(rgb, yunet.detect(rgb)[0].box, 90)
    real = yunet._detect_raw
    # Simulate a first pass that misses the face; the padded pass has a border.
    monkeypatch.setattr(yunet, "_detect_raw",
                        lambda img: D._empty() if img.shape == crop.shape else real(img))
    faces = yunet.detect(crop)
    assert len(faces) == 1 and faces[0].width > 0.6 * 90


# --- API details -------------------------------------------------------------------
def test_min_face_size_filters(load_rgb, faces_dir: Path) -> None:
    rgb = load_rgb(faces_dir / "groups" / "kit_with_rose.jpg")  # faces ~75-90 px wide
    assert len(YuNetDetector(min_face_size=20).detect(rgb)) == 2
    assert len(YuNetDetector(min_face_size=85).detect(rgb)) == 1
    assert YuNetDetector(min_face_size=200).detect(rgb) == []


def test_to_dict_is_json(yunet, load_rgb, faces_dir: Path) -> None:
    face = yunet.detect(load_rgb(faces_dir / "groups" / "kit_with_rose.jpg"))[0]
    d = json.loads(json.dumps(face.to_dict()))
    assert set(d) == {"box", "landmarks", "score"}
    assert set(d["box"]) == {"x1", "y1", "x2", "y2"}
    assert len(d["landmarks"]) == 5 and all(len(p) == 2 for p in d["landmarks"])
    assert d["box"]["x1"] == pytest.approx(face.box[0], abs=0.06)
    assert face.area == pytest.approx(face.width * face.height)


def test_no_face_in_a_faceless_image(detector, load_rgb, faces_dir: Path) -> None:
    rgb = load_rgb(faces_dir / "groups" / "kit_with_rose.jpg")
    strip = np.ascontiguousarray(rgb[-60:, :])  # bottom strip of the photo: clothes, no face
    assert detector.detect(strip) == []


def test_bad_input_rejected(yunet) -> None:
    with pytest.raises(InvalidRequest):
        yunet.detect(np.zeros((10, 10), np.uint8))
    with pytest.raises(InvalidRequest):
        yunet.detect(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(InvalidRequest):
        yunet.detect(np.zeros((0, 10, 3), np.uint8))


def test_make_detector() -> None:
    assert isinstance(make_detector("yunet", score_threshold=0.8), YuNetDetector)
    with pytest.raises(InvalidRequest):
        make_detector("haar")


def test_thread_pool_gives_same_results(detector, load_rgb, faces_dir: Path) -> None:
    names = ["people/obama/obama_240p.jpg", "people/kit_harington/kit_2.jpg",
             "people/rose_leslie/rose_2.jpg", "groups/kit_with_rose.jpg"]
    images = [load_rgb(faces_dir / n) for n in names]
    sequential = [detector.detect(im) for im in images]
    with ThreadPoolExecutor(max_workers=3) as pool:
        parallel = list(pool.map(detector.detect, images * 2))
    for seq, par in zip(sequential * 2, parallel):
        assert [f.box for f in seq] == [f.box for f in par]


def test_large_images_are_searched_shrunk_with_boxes_in_original_pixels(faces_dir, load_rgb) -> None:
    """max_side shrinks the first pass; faces and coordinates stay the same."""
    from models.detection import YuNetDetector

    rgb = load_rgb(faces_dir / "groups" / "obama_and_biden.jpg")  # 2000 px wide
    full = YuNetDetector(max_side=None).detect(rgb)
    shrunk = YuNetDetector(max_side=1280).detect(rgb)
    assert len(full) == len(shrunk) == 3
    by_x = lambda faces: sorted(faces, key=lambda f: f.box[0])  # noqa: E731 - equal areas may swap
    for a, b in zip(by_x(full), by_x(shrunk)):
        assert np.allclose(a.box, b.box, atol=0.1 * a.width)
        assert np.allclose(a.landmarks, b.landmarks, atol=0.1 * a.width)
    with pytest.raises(InvalidRequest):
        YuNetDetector(max_side=10)
