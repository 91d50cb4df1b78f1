"""SFace (default) and FaceNet embedders, the threshold, and the in-process pipeline."""
from __future__ import annotations

import itertools
from pathlib import Path

import cv2
import numpy as np
import pytest

from models.alignment import align_face
from models.detection import YuNetDetector
from models.embedding import (
    SFACE_DEFAULT_THRESHOLD,
    FaceNetEmbedder,
    SFaceEmbedder,
    cosine_similarity,
    make_embedder,
)
from models.weights import WeightsNotFound

InvalidRequest = ValueError  # model code raises ValueError for bad input
from models.pipeline import FacePipeline
from models.weights import clear_hash_cache, load_manifest, sha256_file


@pytest.fixture(scope="module")
def aligned(load_rgb, detect_cached, people_photos: list[Path], yunet, mtcnn):
    """Aligned 112 crops of every people/ photo, per detector, with identities."""
    out = {}
    for det in (yunet, mtcnn):
        crops = []
        for path in people_photos:
            rgb = load_rgb(path)
            crops.append(align_face(rgb, detect_cached(det, path, rgb)[0].landmarks))
        out[det.name] = np.stack(crops)
    return out, [p.parent.name for p in people_photos]


@pytest.fixture(scope="module")
def cv_recognizer(models_dir: Path):
    return cv2.FaceRecognizerSF.create(str(models_dir / "face_recognition_sface_2021dec.onnx"), "")


def _pair_scores(emb: np.ndarray, ids: list[str], names: list[str]):
    sim = cosine_similarity(emb, emb)
    same, diff = [], []
    for i, j in itertools.combinations(range(len(ids)), 2):
        (same if ids[i] == ids[j] else diff).append((float(sim[i, j]), names[i], names[j]))
    return same, diff


# --- SFace ----------------------------------------------------------------------
def test_sface_shape_and_norm(sface, aligned) -> None:
    crops = aligned[0]["yunet"]
    emb = sface.embed(crops)
    assert emb.shape == (len(crops), 128) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert (sface.name, sface.dim, sface.input_size) == ("sface", 128, 112)


def test_sface_empty_and_single(sface, aligned) -> None:
    assert sface.embed(np.zeros((0, 112, 112, 3), np.uint8)).shape == (0, 128)
    one = aligned[0]["yunet"][0]
    assert np.allclose(sface.embed(one), sface.embed(one[None]))


def test_sface_batch_equals_one_by_one(sface, aligned) -> None:
    crops = aligned[0]["yunet"]
    batched = sface.embed(crops)
    single = np.concatenate([sface.embed(c[None]) for c in crops])
    assert np.abs(batched - single).max() < 1e-5


def test_sface_matches_opencv(sface, aligned, cv_recognizer) -> None:
    """Our batched cv2.dnn path == cv2.FaceRecognizerSF.feature on the same
    aligned crops (OpenCV is fed BGR, as it expects)."""
    crops = aligned[0]["yunet"]
    ours = sface.embed(crops)
    ref = np.stack([cv_recognizer.feature(cv2.cvtColor(c, cv2.COLOR_RGB2BGR)).ravel() for c in crops])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.abs(ours - ref).max() < 1e-4
    # The channel order matters and is right: swapped input is measurably different.
    swapped = sface.embed(np.ascontiguousarray(crops[..., ::-1]))
    assert np.abs(swapped - ref).max() > 1e-2


def test_sface_matches_opencv_end_to_end(sface, yunet, cv_recognizer, load_rgb, faces_dir: Path) -> None:
    """Whole OpenCV recipe (alignCrop + feature) vs ours (align_face + embed)."""
    rgb = load_rgb(faces_dir / "groups" / "obama_and_biden.jpg")
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    for face in yunet.detect(rgb):
        row = np.zeros((1, 15), np.float32)
        row[0, :4] = (face.box[0], face.box[1], face.width, face.height)
        row[0, 4:14] = face.landmarks.ravel()
        ref = cv_recognizer.feature(cv_recognizer.alignCrop(bgr, row)).ravel()
        ours = sface.embed(align_face(rgb, face.landmarks)[None])[0]
        assert cosine_similarity(ours, ref / np.linalg.norm(ref)) > 0.9999


@pytest.mark.parametrize("det_name", ["yunet", "mtcnn"])
def test_sface_threshold_separates_people(sface, aligned, people_photos: list[Path], det_name: str) -> None:
    """Every same-person pair above SFACE_DEFAULT_THRESHOLD (0.363), every
    different-person pair below. Measured (15 photos, 16 same / 89 different pairs):
      YuNet landmarks: min same 0.627 (biden_1/biden_2), max different 0.275 (alex_2/obama_4)
      MTCNN landmarks: min same 0.662 (biden_1/biden_2), max different 0.258 (alex_2/obama_4)
    """
    groups, ids = aligned
    same, diff = _pair_scores(sface.embed(groups[det_name]), ids, [p.name for p in people_photos])
    lo, hi = min(same), max(diff)
    print(f"\n[{det_name}] min same-person {lo[0]:.3f} ({lo[1]}/{lo[2]}), "
          f"max different-person {hi[0]:.3f} ({hi[1]}/{hi[2]}), threshold {SFACE_DEFAULT_THRESHOLD}, "
          f"margins +{lo[0] - SFACE_DEFAULT_THRESHOLD:.3f} / -{SFACE_DEFAULT_THRESHOLD - hi[0]:.3f}")
    assert len(same) == 16 and len(diff) == 89
    assert lo[0] > SFACE_DEFAULT_THRESHOLD, lo
    assert hi[0] < SFACE_DEFAULT_THRESHOLD, hi


# --- SFace with flip averaging ----------------------------------------------------
def test_sface_flip_is_the_mean_of_crop_and_mirror(sface, aligned) -> None:
    from models.embedding import SFaceFlipEmbedder, l2_normalize, make_embedder

    flip = make_embedder("sface_flip")
    assert isinstance(flip, SFaceFlipEmbedder) and (flip.name, flip.dim) == ("sface_flip", 128)
    crops = aligned[0]["yunet"]
    got = flip.embed(crops)
    want = l2_normalize(sface.embed(crops) + sface.embed(np.ascontiguousarray(crops[:, :, ::-1])))
    assert np.allclose(got, want, atol=1e-5)
    assert flip.embed(np.zeros((0, 112, 112, 3), np.uint8)).shape == (0, 128)
    # A different model: close to SFace's vectors, never equal to them.
    cross = np.sum(got * sface.embed(crops), axis=1)
    assert np.all(cross > 0.95) and np.all(cross < 0.9999), cross


def test_sface_flip_separates_people(aligned, people_photos: list[Path]) -> None:
    """Measured (YuNet landmarks): min same-person 0.685, max different-person 0.279."""
    from models.embedding import make_embedder

    groups, ids = aligned
    same, diff = _pair_scores(make_embedder("sface_flip").embed(groups["yunet"]), ids,
                              [p.name for p in people_photos])
    assert min(same)[0] > SFACE_DEFAULT_THRESHOLD > max(diff)[0], (min(same), max(diff))


@pytest.mark.parametrize("width", [90, 120, 160])
def test_tight_crops_still_recognised(sface, detector, aligned, load_rgb, detect_cached,
                                      people_photos: list[Path], width: int) -> None:
    """An ID-style crop (face box only, resized) matches its person's full
    photo and no one else's: detection on it must give usable landmarks."""
    groups, ids = aligned
    full = sface.embed(groups[detector.name])
    worst_same, worst_other = 1.0, -1.0
    for i, path in enumerate(people_photos):
        rgb = load_rgb(path)
        x1, y1, x2, y2 = (int(round(v)) for v in detect_cached(detector, path, rgb)[0].box)
        crop = rgb[y1:y2, x1:x2]
        crop = np.ascontiguousarray(cv2.resize(crop, (width, round(crop.shape[0] * width / crop.shape[1])),
                                               interpolation=cv2.INTER_AREA))
        faces = detector.detect(crop)
        assert len(faces) == 1
        sims = full @ sface.embed(align_face(crop, faces[0].landmarks)[None])[0]
        worst_same = min(worst_same, float(sims[i]))
        others = [s for j, s in enumerate(sims) if ids[j] != ids[i]]
        worst_other = max(worst_other, max(others))
    print(f"\n[{detector.name} {width}px] crop vs own photo >= {worst_same:.3f}, vs others <= {worst_other:.3f}")
    assert worst_same > SFACE_DEFAULT_THRESHOLD and worst_other < SFACE_DEFAULT_THRESHOLD


def test_sface_file_left_unchanged(sface) -> None:
    clear_hash_cache()
    assert sha256_file(sface.weights.path) == load_manifest()["sface"].sha256


def test_sface_thread_count_option(aligned) -> None:
    one = SFaceEmbedder(intra_op_threads=1)
    crops = aligned[0]["yunet"][:3]
    assert one.embed(crops).shape == (3, 128)


def test_sface_rejects_bad_input(sface) -> None:
    with pytest.raises(InvalidRequest):
        sface.embed(np.zeros((2, 112, 112, 3), np.float32))
    with pytest.raises(InvalidRequest):
        sface.embed(np.zeros((2, 112, 100, 3), np.uint8))


def test_other_crop_sizes_are_resized(sface, aligned) -> None:
    crop = aligned[0]["yunet"][:1]
    big = cv2.resize(crop[0], (224, 224), interpolation=cv2.INTER_CUBIC)[None]
    assert cosine_similarity(sface.embed(big)[0], sface.embed(crop)[0]) > 0.98


def test_cosine_similarity_shapes() -> None:
    a = np.eye(3, dtype=np.float32)
    assert cosine_similarity(a[0], a[0]) == pytest.approx(1.0)
    assert isinstance(cosine_similarity(a[0], a[1]), float)
    assert cosine_similarity(a, a[0]).shape == (3,)
    assert np.allclose(cosine_similarity(a, a), np.eye(3))
    assert cosine_similarity(a[:2], a).shape == (2, 3)


# --- FaceNet --------------------------------------------------------------------
@pytest.fixture(scope="module")
def facenet_random() -> FaceNetEmbedder:
    return FaceNetEmbedder(pretrained=False)


def test_facenet_code_path_offline(facenet_random: FaceNetEmbedder, aligned) -> None:
    crops = aligned[0]["yunet"][:3]  # 112 crops, resized to 160 inside
    emb = facenet_random.embed(crops)
    assert emb.shape == (3, 512) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert facenet_random.embed(np.zeros((0, 112, 112, 3), np.uint8)).shape == (0, 512)
    assert (facenet_random.name, facenet_random.dim, facenet_random.input_size) == ("facenet", 512, 160)
    assert facenet_random.weights is None and facenet_random.pretrained is False
    # Deterministic (eval mode: no dropout / batch-stat updates) and batch-independent.
    assert np.allclose(facenet_random.embed(crops[:1]), emb[:1], atol=1e-5)


def test_facenet_pretrained_without_weights_raises(tmp_path: Path, no_network) -> None:
    with pytest.raises(WeightsNotFound) as err:
        FaceNetEmbedder(pretrained=True, models_dir=tmp_path / "m", cache_dir=tmp_path / "c",
                        allow_download=False)
    assert "20180402-114759-vggface2.pt" in err.value.message


def test_facenet_unreachable_url_raises(tmp_path: Path) -> None:
    from dataclasses import replace

    manifest = load_manifest()
    manifest["facenet_vggface2"] = replace(manifest["facenet_vggface2"], url="http://127.0.0.1:9/vggface2.pt")
    with pytest.raises(WeightsNotFound, match="download"):
        FaceNetEmbedder(models_dir=tmp_path / "m", cache_dir=tmp_path / "c", manifest=manifest)


def test_make_embedder(sface) -> None:
    assert isinstance(make_embedder("facenet", pretrained=False), FaceNetEmbedder)
    with pytest.raises(InvalidRequest):
        make_embedder("arcface")


# --- pipeline ---------------------------------------------------------------------
def test_pipeline_group_photo(yunet: YuNetDetector, sface, faces_dir: Path, aligned) -> None:
    data = (faces_dir / "groups" / "obama_and_biden.jpg").read_bytes()
    result = FacePipeline(yunet, sface).run(data)
    assert len(result.faces) == 3 and result.embeddings.shape == (3, 128)
    assert set(result.timings_ms) == {"decode", "detect", "align", "embed"}
    assert all(v >= 0 for v in result.timings_ms.values())
    # Obama and Biden in the group photo match their solo photos.
    groups, ids = aligned
    solo = sface.embed(groups["yunet"])
    best = [ids[int(np.argmax(solo @ e))] for e in result.embeddings]
    best_sim = [float(np.max(solo @ e)) for e in result.embeddings]
    matched = {b for b, s in zip(best, best_sim) if s > SFACE_DEFAULT_THRESHOLD}
    assert matched == {"obama", "biden"}  # the child is nobody we know


def test_pipeline_no_face(yunet: YuNetDetector, sface, faces_dir: Path) -> None:
    import io

    from PIL import Image

    with Image.open(faces_dir / "groups" / "kit_with_rose.jpg") as im:
        buf = io.BytesIO()
        im.crop((0, 640, 501, 700)).save(buf, "PNG")  # a strip with no face in it
    result = FacePipeline(yunet, sface).run(buf.getvalue())
    assert result.faces == [] and result.embeddings.shape == (0, 128)


def test_pipeline_facenet_aligns_at_160(yunet: YuNetDetector, facenet_random: FaceNetEmbedder, faces_dir: Path) -> None:
    result = FacePipeline(yunet, facenet_random).run((faces_dir / "people" / "obama" / "obama_240p.jpg").read_bytes())
    assert result.embeddings.shape == (1, 512)
