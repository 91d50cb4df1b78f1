"""Both compatibility routers in-process over the fake services: boto3's own
client (real SigV4, handed to the app through botocore's before-send hook) and
the CompreFace request shapes. The real-model runs are tests/integration/."""
from __future__ import annotations

import asyncio
import hashlib
from typing import Any, Iterator

import boto3
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from botocore.exceptions import ClientError
from fastapi.testclient import TestClient

from serve_app.api.app import create_app
from serve_app.api.deps import Edge
from serve_app.deployment_config import IngressConfig
from serve_app.services.access import Authenticator
from serve_app.services.gallery import GalleryService
from serve_app.services.recognition import RecognitionService
from tests.unit.fakes import DIM, CountingOutcomes, FakeAccess, FakeObjects, FakePipeline, FakeRepo, unit

ADA = b"\xff\xd8\xff\xe0" + b"ada"
ADA2 = b"\xff\xd8\xff\xe0" + b"ada-again"
BOB = b"\xff\xd8\xff\xe0" + b"bob"
PAIR = b"\xff\xd8\xff\xe0" + b"ada-and-bob"
NOBODY = b"\xff\xd8\xff\xe0" + b"empty"


class _Raw:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.data


@pytest.fixture()
def app() -> Iterator[tuple[TestClient, FakeAccess]]:
    repo = FakeRepo()
    pipe = FakePipeline(repo)
    pipe.script(ADA, unit(1, 0, 0, 0))
    pipe.script(ADA2, unit(1, 0.1, 0, 0))
    pipe.script(BOB, unit(0, 1, 0, 0))
    pipe.script(PAIR, unit(1, 0.05, 0, 0), unit(0, 1, 0, 0))
    pipe.script(NOBODY)
    gallery = GalleryService(pipe, repo, FakeObjects(), model="fake", dim=DIM, default_collection="default")
    access = FakeAccess()
    edge = Edge(recognition=RecognitionService(pipe, repo, CountingOutcomes()), gallery=gallery,
                config=lambda: IngressConfig(verify_threshold=0.5, identify_threshold=0.5),
                auth=Authenticator(access, b"boot", cache_ttl_s=0.0), access=access)
    with TestClient(create_app(edge), raise_server_exceptions=False) as client:
        yield client, access


def rekognition(tc: TestClient, akid: str = "bootstrap", secret: str = "boot") -> Any:
    client = boto3.client("rekognition", endpoint_url="http://testserver", region_name="eu-west-1",
                          aws_access_key_id=akid, aws_secret_access_key=secret,
                          config=Config(retries={"max_attempts": 1}))

    def send(request: Any, **_: Any) -> AWSResponse:
        r = tc.request(request.method, request.url, content=request.body,
                       headers={k: v if isinstance(v, str) else v.decode() for k, v in request.headers.items()})
        return AWSResponse(request.url, r.status_code, dict(r.headers), _Raw(r.content))

    client.meta.events.register("before-send.rekognition.*", send)
    return client


def _code(err: pytest.ExceptionInfo[ClientError]) -> str:
    return err.value.response["Error"]["Code"]


def test_boto3_collection_index_search_users(app) -> None:
    tc, _ = app
    rk = rekognition(tc)
    assert rk.create_collection(CollectionId="staff")["StatusCode"] == 200
    with pytest.raises(rk.exceptions.ResourceAlreadyExistsException):
        rk.create_collection(CollectionId="staff")
    assert "staff" in rk.list_collections()["CollectionIds"]

    rec = rk.index_faces(CollectionId="staff", Image={"Bytes": ADA}, ExternalImageId="ada")["FaceRecords"]
    assert len(rec) == 1 and rec[0]["Face"]["ExternalImageId"] == "ada"
    box = rec[0]["Face"]["BoundingBox"]  # fake face (0, 0, 50, 60) in 640x480
    assert box == pytest.approx({"Left": 0.0, "Top": 0.0, "Width": 50 / 640, "Height": 60 / 480})
    ada_face = rec[0]["Face"]["FaceId"]
    two = rk.index_faces(CollectionId="staff", Image={"Bytes": PAIR}, ExternalImageId="ada")
    assert len(two["FaceRecords"]) == 1 and two["UnindexedFaces"][0]["Reasons"] == ["EXCEEDS_MAX_FACES"]
    rk.index_faces(CollectionId="staff", Image={"Bytes": BOB}, ExternalImageId="bob")
    assert rk.index_faces(CollectionId="staff", Image={"Bytes": NOBODY}, ExternalImageId="x")["FaceRecords"] == []
    assert {u["UserId"] for u in rk.list_users(CollectionId="staff")["Users"]} == {"ada", "bob"}

    found = rk.search_faces_by_image(CollectionId="staff", Image={"Bytes": ADA2})
    assert [m["Face"]["ExternalImageId"] for m in found["FaceMatches"]] == ["ada"]
    assert 80 < found["FaceMatches"][0]["Similarity"] <= 100
    assert rk.search_faces_by_image(CollectionId="staff", Image={"Bytes": ADA2},
                                    FaceMatchThreshold=0)["FaceMatches"][-1]["Face"]["UserId"] == "bob"
    with pytest.raises(rk.exceptions.InvalidParameterException):
        rk.search_faces_by_image(CollectionId="staff", Image={"Bytes": NOBODY})
    users = rk.search_users_by_image(CollectionId="staff", Image={"Bytes": BOB})["UserMatches"]
    assert [u["User"]["UserId"] for u in users] == ["bob"]

    rk.create_user(CollectionId="staff", UserId="ada")  # exists already: idempotent
    assoc = rk.associate_faces(CollectionId="staff", UserId="bob", FaceIds=[ada_face, aws_uuid(999)])
    assert assoc["AssociatedFaces"] == []
    assert {f["Reasons"][0] for f in assoc["UnsuccessfulFaceAssociations"]} == \
        {"ASSOCIATED_TO_A_DIFFERENT_USER", "FACE_NOT_FOUND"}
    assert rk.associate_faces(CollectionId="staff", UserId="ada", FaceIds=[ada_face])["AssociatedFaces"] == \
        [{"FaceId": ada_face}]

    listed = rk.list_faces(CollectionId="staff", UserId="ada")["Faces"]
    assert len(listed) == 2 and all(f["UserId"] == "ada" for f in listed)
    gone = rk.delete_faces(CollectionId="staff", FaceIds=[ada_face, aws_uuid(999)])
    assert gone["DeletedFaces"] == [ada_face]
    assert gone["UnsuccessfulFaceDeletions"][0]["Reasons"] == ["FACE_NOT_FOUND"]
    rk.delete_user(CollectionId="staff", UserId="bob")
    with pytest.raises(rk.exceptions.ResourceNotFoundException):
        rk.delete_user(CollectionId="staff", UserId="bob")
    with pytest.raises(rk.exceptions.ResourceNotFoundException):
        rk.list_faces(CollectionId="nope")

    # DeleteCollection: gone from this replica's cache too, then every call on it is a 404.
    assert rk.describe_collection(CollectionId="staff")["UserCount"] == 1
    assert rk.delete_collection(CollectionId="staff")["StatusCode"] == 200
    for call in (lambda: rk.describe_collection(CollectionId="staff"),
                 lambda: rk.search_faces_by_image(CollectionId="staff", Image={"Bytes": ADA}),
                 lambda: rk.index_faces(CollectionId="staff", Image={"Bytes": ADA}, ExternalImageId="ada"),
                 lambda: rk.delete_collection(CollectionId="staff")):
        with pytest.raises(rk.exceptions.ResourceNotFoundException):
            call()
    assert rk.create_collection(CollectionId="staff")["StatusCode"] == 200  # the name is free again
    assert rk.describe_collection(CollectionId="staff")["UserCount"] == 0


def aws_uuid(n: int) -> str:
    from serve_app.api.compat.aws import face_uuid

    return face_uuid(n)


def test_boto3_compare_and_detect(app) -> None:
    tc, _ = app
    rk = rekognition(tc)
    out = rk.compare_faces(SourceImage={"Bytes": ADA}, TargetImage={"Bytes": PAIR})
    assert len(out["FaceMatches"]) == 1 and len(out["UnmatchedFaces"]) == 1
    assert out["FaceMatches"][0]["Face"]["BoundingBox"]["Left"] == 0.0
    assert rk.compare_faces(SourceImage={"Bytes": ADA}, TargetImage={"Bytes": BOB})["FaceMatches"] == []
    faces = rk.detect_faces(Image={"Bytes": PAIR})["FaceDetails"]
    assert len(faces) == 2 and [p["Type"] for p in faces[0]["Landmarks"]][0] == "eyeLeft"
    with pytest.raises(rk.exceptions.InvalidImageFormatException):
        rk.detect_faces(Image={"Bytes": b"%PDF-1.4 not an image"})
    with pytest.raises(rk.exceptions.InvalidS3ObjectException):
        rk.detect_faces(Image={"S3Object": {"Bucket": "bkt", "Name": "../x.jpg"}})


def test_boto3_credentials(app) -> None:
    tc, access = app
    with pytest.raises(ClientError) as err:
        rekognition(tc, secret="wrong").list_collections()
    assert _code(err) == "InvalidSignatureException" and err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(ClientError) as err:
        rekognition(tc, akid="nokey").list_collections()
    assert _code(err) == "UnrecognizedClientException"

    key, token = asyncio.run(access.create_key("default", ["read"]))
    secret = token.split("_", 2)[2]
    reader = rekognition(tc, key.key_id, hashlib.sha256(secret.encode()).hexdigest())
    assert "CollectionIds" in reader.list_collections()
    with pytest.raises(reader.exceptions.AccessDeniedException):
        reader.create_collection(CollectionId="mine")
    with pytest.raises(ClientError) as err:  # the raw secret is not the AWS secret
        rekognition(tc, key.key_id, secret).list_collections()
    assert _code(err) == "InvalidSignatureException"
    r = tc.post("/", content=b"{}", headers={"x-amz-target": "RekognitionService.ListCollections"})
    assert r.status_code == 403 and r.json()["__type"] == "MissingAuthenticationTokenException"


def test_compreface_shapes(app) -> None:
    tc, _ = app
    h = {"x-api-key": "boot"}
    r = tc.post("/api/v1/recognition/faces?subject=ada", files={"file": ("a.jpg", ADA)}, headers=h)
    assert r.status_code == 200, r.text
    image_id = r.json()["image_id"]
    assert r.json() == {"image_id": image_id, "subject": "ada"}
    tc.post("/api/v1/recognition/faces?subject=bob", files={"file": ("b.jpg", BOB)}, headers=h)
    assert tc.get("/api/v1/recognition/subjects", headers=h).json() == {"subjects": ["ada", "bob"]}
    listed = tc.get("/api/v1/recognition/faces", headers=h).json()
    assert listed["total_elements"] == 2 and {f["subject"] for f in listed["faces"]} == {"ada", "bob"}

    out = tc.post("/api/v1/recognition/recognize?prediction_count=2&face_plugins=landmarks",
                  files={"file": ("p.jpg", PAIR)}, headers=h).json()["result"]
    assert [f["subjects"][0]["subject"] for f in out] == ["ada", "bob"]
    assert set(out[0]["box"]) == {"probability", "x_min", "y_min", "x_max", "y_max"} and len(out[0]["landmarks"]) == 5
    assert out[0]["subjects"][0]["similarity"] > 0.8 > out[0]["subjects"][1]["similarity"]
    assert len(tc.post("/api/v1/detection/detect?limit=1", files={"file": ("p.jpg", PAIR)},
                       headers=h).json()["result"]) == 1
    v = tc.post("/api/v1/verification/verify", files={"source_image": ("a.jpg", ADA), "target_image": ("p.jpg", PAIR)},
                headers=h).json()["result"][0]
    assert [round(m["similarity"], 1) for m in v["face_matches"]][0] >= 0.8 and "box" in v["source_image_face"]

    r = tc.post("/api/v1/recognition/recognize", files={"file": ("n.jpg", NOBODY)}, headers=h)
    assert r.status_code == 400 and r.json()["code"] == 28
    r = tc.get("/api/v1/recognition/subjects", headers={"x-api-key": "wrong"})
    assert r.status_code == 401 and set(r.json()) == {"message", "code"}
    assert tc.delete(f"/api/v1/recognition/faces/{image_id}", headers=h).json() == {"image_id": image_id, "subject": "ada"}
    assert tc.delete(f"/api/v1/recognition/faces/{image_id}", headers=h).status_code == 404
    assert tc.delete("/api/v1/recognition/faces?subject=bob", headers=h).json() == {"deleted": 1}
    assert tc.delete("/api/v1/recognition/subjects/bob", headers=h).json() == {"subject": "bob"}


def test_base64_image_over_the_limit_is_image_too_large(app) -> None:
    tc, _ = app
    rk = rekognition(tc)
    big = b"\xff\xd8\xff\xe0" + b"0" * 15_000_001
    with pytest.raises(rk.exceptions.ImageTooLargeException):
        rk.detect_faces(Image={"Bytes": big})  # base64 JSON, read past the 64 KB body guard
