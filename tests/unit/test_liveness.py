"""Unit tests for models/liveness.py (MiniFASNet passive anti-spoofing).

Faces are boxed with OpenCV's YuNet directly, so these tests do not depend
on faceserve's detector module.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from models.weights import ChecksumMismatch, WeightsError

InvalidRequest = ValueError  # model code raises ValueError for bad input
from models.liveness import (
    CROP_SIZE,
    DEFAULT_LIVE_THRESHOLD,
    LIVENESS_SPECS,
    LivenessModel,
    build_minifasnet,
    crop_window,
    liveness_crop,
    load_state_dict_strict,
)

SHARED = Path(os.environ.get("FACESERVE_SHARED_DIR")
              or Path(__file__).resolve().parents[2].parent / "shared")
MODELS = SHARED / "models"
LIVENESS_DIR = SHARED / "faces" / "liveness"
YUNET = MODELS / "face_detection_yunet_2023mar.onnx"
WEIGHT_FILES = {"minifasnet_v2": "2.7_80x80_MiniFASNetV2.pth",
                "minifasnet_v1se": "4_0_0_80x80_MiniFASNetV1SE.pth"}

pytestmark = pytest.mark.skipif(
    not all((MODELS / f).is_file() for f in WEIGHT_FILES.values()) or not YUNET.is_file(),
    reason=f"shared weights not found under {MODELS} (set FACESERVE_SHARED_DIR)",
)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    m = LivenessModel(models_dir=MODELS, allow_download=False, num_threads=1)
    yield m
    torch.set_num_threads(threads)


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert bgr is not None, path
    return np.ascontiguousarray(bgr[:, :, ::-1])


def yunet_boxes(rgb: np.ndarray) -> list[tuple[float, float, float, float]]:
    """(x1, y1, x2, y2) boxes from YuNet, best score first."""
    h, w = rgb.shape[:2]
    det = cv2.FaceDetectorYN.create(str(YUNET), "", (w, h), 0.7)
    _, faces = det.detect(np.ascontiguousarray(rgb[:, :, ::-1]))
    if faces is None:
        return []
    faces = faces[np.argsort(-faces[:, -1])]
    return [(float(x), float(y), float(x + bw), float(y + bh)) for x, y, bw, bh in faces[:, :4]]


@pytest.fixture(scope="module")
def shared_faces():
    """{name: (rgb, box)} for the three shared liveness photos."""
    out = {}
    for name in ("image_T1", "image_F1", "image_F2"):
        rgb = read_rgb(LIVENESS_DIR / f"{name}.jpg")
        boxes = yunet_boxes(rgb)
        assert len(boxes) == 1, name
        out[name] = (rgb, boxes[0])
    return out


def _jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1])


VARIANTS = {
    "original": lambda rgb: rgb,
    "hflip": lambda rgb: np.ascontiguousarray(rgb[:, ::-1]),
    "jpeg50": lambda rgb: _jpeg(rgb, 50),
    "half_size": lambda rgb: cv2.resize(rgb, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA),
}


# --------------------------------------------------------------- the weights
@pytest.mark.parametrize("spec", LIVENESS_SPECS, ids=lambda s: s.name)
def test_state_dict_loads_strictly(spec):
    net = build_minifasnet(spec.arch)
    state = torch.load(MODELS / WEIGHT_FILES[spec.name], map_location="cpu", weights_only=True)
    assert all(k.startswith("module.") for k in state)  # saved from DataParallel
    load_state_dict_strict(net, MODELS / WEIGHT_FILES[spec.name])  # strict=True inside
    ours = set(net.state_dict())
    assert ours == {k[len("module."):] for k in state}
    assert net.prob.out_features == 3


def test_wrong_architecture_is_refused():
    with pytest.raises(WeightsError, match="do not fit"):
        load_state_dict_strict(build_minifasnet("MiniFASNetV1SE"), MODELS / WEIGHT_FILES["minifasnet_v2"])
    with pytest.raises(WeightsError, match="do not fit"):
        load_state_dict_strict(build_minifasnet("MiniFASNetV2"), MODELS / WEIGHT_FILES["minifasnet_v1se"])


def test_tampered_weights_fail_the_checksum(tmp_path):
    for f in WEIGHT_FILES.values():
        shutil.copy(MODELS / f, tmp_path / f)
    target = tmp_path / WEIGHT_FILES["minifasnet_v2"]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch):
        LivenessModel(models_dir=tmp_path, allow_download=False, num_threads=None)


def test_crop_specs(model):
    assert model.crop_specs == [("minifasnet_v2", 2.7), ("minifasnet_v1se", 4.0)]
    assert set(model.weight_paths) == set(WEIGHT_FILES)


def test_num_threads_is_applied():
    before = torch.get_num_threads()
    try:
        LivenessModel(models_dir=MODELS, allow_download=False, num_threads=1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------- the shared photos
def test_shared_images_scores(model, shared_faces, capsys):
    scores = {name: float(model.score_faces(rgb, [box])[0]) for name, (rgb, box) in shared_faces.items()}
    with capsys.disabled():
        print("\nliveness scores:", {k: round(v, 4) for k, v in scores.items()})
    assert scores["image_T1"] >= DEFAULT_LIVE_THRESHOLD
    assert scores["image_F1"] < DEFAULT_LIVE_THRESHOLD
    assert scores["image_F2"] < DEFAULT_LIVE_THRESHOLD
    # with margin: the decision is not a coin toss
    assert scores["image_T1"] > 0.9
    assert scores["image_F1"] < 0.4 and scores["image_F2"] < 0.1


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decision_survives_photo_variants(model, variant):
    """Flips, JPEG re-encoding and rescaling do not change the verdicts."""
    for name, live in (("image_T1", True), ("image_F1", False), ("image_F2", False)):
        rgb = VARIANTS[variant](read_rgb(LIVENESS_DIR / f"{name}.jpg"))
        boxes = yunet_boxes(rgb)
        assert boxes, (name, variant)
        score = float(model.score_faces(rgb, boxes[:1])[0])
        assert (score >= DEFAULT_LIVE_THRESHOLD) == live, (name, variant, score)


def test_rgba_input_is_accepted(model, shared_faces):
    rgb, box = shared_faces["image_T1"]
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    np.testing.assert_array_equal(model.score_faces(rgba, [box]), model.score_faces(rgb, [box]))


# ----------------------------------------------------------------- the model
def test_output_shape_and_range(model, shared_faces):
    rgb, box = shared_faces["image_T1"]
    crops = model.make_crops(rgb, [box, box, box])
    for scale, arr in crops.items():
        assert arr.shape == (3, CROP_SIZE, CROP_SIZE, 3) and arr.dtype == np.uint8, scale
    scores = model.predict(crops)
    assert scores.shape == (3,) and scores.dtype == np.float32
    assert ((scores >= 0) & (scores <= 1)).all()
    probs = model.predict_proba(crops)
    assert probs.shape == (3, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probs[:, 1], scores)


def test_no_faces(model, shared_faces):
    rgb, _ = shared_faces["image_T1"]
    out = model.score_faces(rgb, [])
    assert out.shape == (0,) and out.dtype == np.float32
    empty = {s: np.empty((0, CROP_SIZE, CROP_SIZE, 3), np.uint8) for s in model.scales}
    assert model.predict(empty).shape == (0,)


def test_batch_equals_one_by_one(model, shared_faces):
    rgbs, boxes = [], []
    for rgb, box in shared_faces.values():
        rgbs.append(rgb)
        boxes.append(box)
    group = read_rgb(SHARED / "faces" / "groups" / "obama_and_biden.jpg")
    for box in yunet_boxes(group):
        rgbs.append(group)
        boxes.append(box)
    assert len(boxes) >= 5
    crops = {s: np.stack([liveness_crop(r, b, s) for r, b in zip(rgbs, boxes)]) for s in model.scales}
    batched = model.predict(crops)
    single = np.array([model.predict({s: c[i : i + 1] for s, c in crops.items()})[0]
                       for i in range(len(boxes))])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    # the same with a small max_batch (several chunks per model)
    model_small = LivenessModel(models_dir=MODELS, allow_download=False, num_threads=None, max_batch=2)
    np.testing.assert_allclose(model_small.predict(crops), batched, atol=1e-5)
    # score_faces on the group image agrees with the hand-made crops
    group_boxes = boxes[3:]
    np.testing.assert_allclose(model.score_faces(group, group_boxes), batched[3:], atol=1e-6)


def test_predict_validation(model):
    good = np.zeros((2, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    with pytest.raises(InvalidRequest, match="missing"):
        model.predict({2.7: good})
    with pytest.raises(InvalidRequest, match="differ in count"):
        model.predict({2.7: good, 4.0: good[:1]})
    with pytest.raises(InvalidRequest, match="uint8"):
        model.predict({2.7: good.astype(np.float32), 4.0: good})
    with pytest.raises(InvalidRequest, match="must be"):
        model.predict({2.7: np.zeros((2, 112, 112, 3), np.uint8), 4.0: good})
    with pytest.raises(InvalidRequest):
        model.score_faces(np.zeros((10, 10), np.uint8), [(1, 1, 5, 5)])
    with pytest.raises(InvalidRequest, match="empty"):
        model.score_faces(np.zeros((10, 10, 3), np.uint8), [(5, 5, 3, 8)])
    # integer-valued float keys are matched by value
    assert model.predict({2.7: good, 4: good}).shape == (2,)


# ------------------------------------------------------------ crop geometry
def test_crop_centred_inside_the_image():
    # box 40x60 at (100, 100): upstream counts w = x2 - x1 + 1
    x1, y1, x2, y2 = crop_window((640, 480), (100, 100, 139, 159), 2.0)
    assert (x2 - x1, y2 - y1) == (80, 120)  # 2x the box, aspect kept (not square)
    assert (x1 + x2) / 2 == pytest.approx(120, abs=1) and (y1 + y2) / 2 == pytest.approx(130, abs=1)


def test_crop_is_shifted_not_clipped_at_borders():
    w, h = 300, 200
    size = (w, h)
    # near the top-left corner: the window moves right/down, keeping its size
    x1, y1, x2, y2 = crop_window(size, (0, 0, 49, 39), 2.7)
    assert (x1, y1) == (0, 0)
    assert (x2 - x1, y2 - y1) == (135, 108)
    # near the bottom-right corner: it ends on the last pixel
    x1, y1, x2, y2 = crop_window(size, (w - 50, h - 40, w - 1, h - 1), 2.7)
    assert (x2, y2) == (w - 1, h - 1)
    assert (x1, y1, x2, y2) == (164, 91, w - 1, h - 1)  # same 135x108 size, moved inside
    # a box partly outside the image
    x1, y1, x2, y2 = crop_window(size, (-20, -10, 29, 29), 2.7)
    assert x1 == 0 and y1 == 0 and x2 < w and y2 < h


def test_crop_scale_is_reduced_to_fit():
    w, h = 300, 200
    # 4.0 x a 100x80 box would be 400x320: the scale drops to (h-1)/80 for both axes
    x1, y1, x2, y2 = crop_window((w, h), (100, 60, 199, 139), 4.0)
    assert 0 <= x1 and x2 <= w - 1 and 0 <= y1 and y2 <= h - 1
    s = (h - 1) / 80
    assert x2 - x1 == pytest.approx(100 * s, abs=1)
    assert y2 - y1 == pytest.approx(80 * s, abs=1)
    # a box larger than the image
    x1, y1, x2, y2 = crop_window((w, h), (-50, -50, 400, 300), 2.7)
    assert 0 <= x1 <= x2 <= w - 1 and 0 <= y1 <= y2 <= h - 1


def test_crop_far_outside_stays_inside():
    for box in [(1000, 1000, 1050, 1060), (-500, -500, -450, -440)]:
        x1, y1, x2, y2 = crop_window((300, 200), box, 2.7)
        assert 0 <= x1 <= x2 <= 299 and 0 <= y1 <= y2 <= 199


def test_liveness_crop_pixels_and_colour_order():
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    rgb[:, :150, 0] = 255  # strong red on the left half
    rgb[:, :150, 2] = 0
    box = (10, 20, 59, 79)
    crop = liveness_crop(rgb, box, 2.7)
    assert crop.shape == (CROP_SIZE, CROP_SIZE, 3) and crop.dtype == np.uint8
    x1, y1, x2, y2 = crop_window((300, 200), box, 2.7)
    want = cv2.resize(rgb[y1 : y2 + 1, x1 : x2 + 1], (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(crop, want[:, :, ::-1])  # BGR, the order the models were trained in
    assert crop[:, :5, 2].min() == 255 and crop[:, :5, 0].max() == 0
    # the crop is cut from the (unclipped) image region: near-border crops still have full size
    edge = liveness_crop(rgb, (0, 0, 30, 30), 4.0)
    assert edge.shape == (CROP_SIZE, CROP_SIZE, 3)


def test_opencv_runtime_gives_torchs_scores(model, shared_faces) -> None:
    """The bulk job's runtime: the same weights on OpenCV's DNN, the same
    probabilities (live and spoof photos, every face batched, and random
    crops), and the same verdicts."""
    cv = LivenessModel(models_dir=MODELS, allow_download=False, num_threads=None, runtime="opencv")
    crops = {s.scale: np.stack([liveness_crop(rgb, box, s.scale) for rgb, box in shared_faces.values()])
             for s in LIVENESS_SPECS}
    np.testing.assert_allclose(cv.predict_proba(crops), model.predict_proba(crops), atol=1e-5)
    assert [bool(v >= DEFAULT_LIVE_THRESHOLD) for v in cv.predict(crops)] == [True, False, False]
    rng = np.random.default_rng(3)
    noise = {s.scale: rng.integers(0, 256, (5, CROP_SIZE, CROP_SIZE, 3), np.uint8) for s in LIVENESS_SPECS}
    np.testing.assert_allclose(cv.predict_proba(noise), model.predict_proba(noise), atol=1e-5)
    assert cv.predict_proba({s.scale: noise[s.scale][:0] for s in LIVENESS_SPECS}).shape == (0, 3)


def test_unknown_runtime_is_refused() -> None:
    with pytest.raises(ValueError, match="runtime"):
        LivenessModel(models_dir=MODELS, allow_download=False, num_threads=None, runtime="tflite")
