"""Rekognition/CompreFace translation helpers: boxes, landmarks, similarity, ids, errors."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from models.images import ImageTooLarge, ImageUnsupported
from serve_app import errors as e
from serve_app.api.compat import aws
from serve_app.api.compat import compreface_shapes as cf
from serve_app.messages import FaceInfo


def test_bounding_box_is_ratios_of_the_image() -> None:
    box = aws.bounding_box((64.0, 48.0, 192.0, 240.0), 640, 480)
    assert box == pytest.approx({"Left": 0.1, "Top": 0.1, "Width": 0.2, "Height": 0.4})
    # A face cut by the edge keeps its true extent, as AWS reports it.
    assert aws.bounding_box((-10.0, 0.0, 90.0, 50.0), 100, 100)["Left"] == pytest.approx(-0.1)
    with pytest.raises(ValueError):
        aws.bounding_box((0, 0, 1, 1), 0, 10)


def test_landmarks_are_named_and_scaled() -> None:
    pts = np.array([[30, 40], [70, 40], [50, 60], [35, 80], [65, 80]], np.float32)
    out = aws.landmarks(pts, 100, 200)
    assert [p["Type"] for p in out] == ["eyeLeft", "eyeRight", "nose", "mouthLeft", "mouthRight"]
    assert out[0]["X"] == pytest.approx(0.3) and out[0]["Y"] == pytest.approx(0.2)
    assert out[0]["X"] < out[1]["X"]  # eyeLeft is the eye on the image's left


def test_face_detail_has_quality_only_with_measures() -> None:
    face = FaceInfo((10.0, 10.0, 60.0, 70.0), np.zeros((5, 2), np.float32), 0.95)
    assert "Quality" not in aws.face_detail(face, 100, 100)
    assert aws.face_detail(face, 100, 100)["Confidence"] == pytest.approx(95.0)
    face.quality = {"score": 0.9, "reasons": [], "measures": {"brightness": 127.5, "sharpness": 0.6}}
    assert aws.face_detail(face, 100, 100)["Quality"] == pytest.approx({"Brightness": 50.0, "Sharpness": 50.0})


@pytest.mark.parametrize("t", [0.2, 0.363, 0.5, 0.9])
def test_similarity_map_puts_the_threshold_at_80_and_inverts(t: float) -> None:
    assert aws.similarity_to_percent(t, t) == pytest.approx(80.0)
    assert aws.similarity_to_percent(1.0, t) == pytest.approx(100.0)
    assert aws.similarity_to_percent(-0.3, t) == 0.0
    grid = np.linspace(0.001, 1.0, 400)
    pct = [aws.similarity_to_percent(float(s), t) for s in grid]
    assert all(b > a for a, b in zip(pct, pct[1:]))  # strictly increasing on (0, 1]
    for s, p in zip(grid, pct):
        assert aws.percent_to_similarity(p, t) == pytest.approx(float(s), abs=1e-9)
    assert aws.percent_to_similarity(0, t) == -1.0  # threshold 0 accepts every face


def test_match_threshold_field() -> None:
    assert aws.match_threshold({}, "FaceMatchThreshold", 0.4) == (80.0, pytest.approx(0.4))
    assert aws.match_threshold({"FaceMatchThreshold": 90}, "FaceMatchThreshold", 0.4)[1] == pytest.approx(0.7)
    for bad in (-1, 101, "80", True):
        with pytest.raises(aws.AwsError) as err:
            aws.match_threshold({"X": bad}, "X", 0.4)
        assert err.value.kind == "InvalidParameterException"


def test_face_ids_round_trip_as_uuids() -> None:
    fid = aws.face_uuid(42)
    assert fid == "00000000-0000-0000-0000-00000000002a"
    assert aws.face_id_of(fid) == 42
    for bad in ("42", "not-a-uuid", None, str(aws.uuid.UUID(int=0)), str(aws.uuid.UUID(int=2**64))):
        assert aws.face_id_of(bad) is None
    assert aws.image_uuid("ab" * 32) == "abababab-abab-abab-abab-abababababab"


@pytest.mark.parametrize("exc,kind,status", [
    (e.CollectionNotFound("x"), "ResourceNotFoundException", 400),
    (e.SubjectNotFound("x"), "ResourceNotFoundException", 400),
    (e.InvalidRequest("x"), "InvalidParameterException", 400),
    (e.NoFaceFound("x"), "InvalidParameterException", 400),
    (e.MultipleFaces("x"), "InvalidParameterException", 400),
    (e.SpoofDetected("x"), "InvalidParameterException", 400),
    (e.PayloadTooLarge("x"), "ImageTooLargeException", 400),
    (ImageTooLarge("x"), "ImageTooLargeException", 400),
    (ImageUnsupported("x"), "InvalidImageFormatException", 400),
    (e.UnsupportedMediaType("x"), "InvalidImageFormatException", 400),
    (e.Conflict("x"), "ConflictException", 400),
    (e.Unauthorized("x"), "UnrecognizedClientException", 400),
    (e.Forbidden("x"), "AccessDeniedException", 400),
    (e.RateLimited("x"), "ProvisionedThroughputExceededException", 400),
    (e.ServiceUnavailable("x"), "ThrottlingException", 500),
    (asyncio.TimeoutError(), "ThrottlingException", 500),
    (ConnectionError("pg"), "ThrottlingException", 500),
    (RuntimeError("bug"), "InternalServerError", 500),
])
def test_errors_map_to_aws_types(exc: BaseException, kind: str, status: int) -> None:
    err = aws.aws_error(exc)
    assert (err.kind, err.status) == (kind, status)
    assert err.body() == {"__type": kind, "message": err.message} and err.message
    if kind == "InternalServerError":
        assert "bug" not in err.message  # no internals in the answer


@pytest.mark.parametrize("exc,status,code", [
    (e.NoFaceFound("none"), 400, 28),
    (e.SubjectNotFound("x"), 404, 0),
    (e.Unauthorized("x"), 401, 0),
    (e.InvalidRequest("x"), 400, 0),
    (ImageUnsupported("x"), 400, 0),
    (e.ServiceUnavailable("down"), 503, 0),
    (RuntimeError("bug"), 500, 0),
])
def test_compreface_errors(exc: BaseException, status: int, code: int) -> None:
    got_status, body = cf.error_body(exc)
    assert (got_status, body["code"]) == (status, code) and body["message"]
    if isinstance(exc, RuntimeError):
        assert "bug" not in body["message"]


def test_compreface_box_and_similarity() -> None:
    face = FaceInfo((10.4, 20.6, 110.5, 220.2), np.ones((5, 2), np.float32) * 3.6, 0.987654)
    assert cf.box(face) == {"probability": 0.98765, "x_min": 10, "y_min": 21, "x_max": 110, "y_max": 220}
    assert cf.face_result(face, set()) == {"box": cf.box(face)}
    assert cf.face_result(face, {"landmarks"})["landmarks"] == [[4, 4]] * 5
    assert cf.similarity(0.4, 0.4) == 0.8 and cf.similarity(1.0, 0.4) == 1.0


def test_quality_reasons_become_rekognition_reasons() -> None:
    from models.quality import REASONS

    assert set(aws.QUALITY_REASONS) == set(REASONS)  # every reason we can give has a mapping
    assert aws.unindexed_reasons(["too_dark", "too_bright", "blurred"]) == ["LOW_BRIGHTNESS", "LOW_SHARPNESS"]
    assert aws.unindexed_reasons([]) == ["LOW_FACE_QUALITY"]
    assert aws.unindexed_reasons(["something_new"]) == ["LOW_FACE_QUALITY"]
