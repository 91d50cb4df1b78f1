"""boto3's own Rekognition client against the real app (real SigV4, real models).

The key is a fresh tenant's: access key id = key id, secret access key =
hex sha256 of the key's secret (docs/COMPATIBILITY.md).
"""
from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.conftest import FACES_DIR, people
from tests.integration.conftest import BOOTSTRAP_KEY, LiveApp
from tests.unit.conftest import GROUP_COUNTS

UNKNOWN = "kit_harington"


def _client(live_app: LiveApp, akid: str, secret: str) -> Any:
    return boto3.client("rekognition", endpoint_url=live_app.url, region_name="eu-central-1",
                        aws_access_key_id=akid, aws_secret_access_key=secret,
                        config=Config(retries={"max_attempts": 2, "mode": "standard"}, read_timeout=120))


def _bytes(path: Path) -> dict[str, bytes]:
    return {"Bytes": path.read_bytes()}


@pytest.fixture(scope="module")
def tenant_key(live_app: LiveApp) -> Iterator[dict[str, Any]]:
    tenant = f"rk-{uuid.uuid4().hex[:8]}"
    with live_app.client() as boot:
        assert boot.put(f"/v1/tenants/{tenant}", json={"min_enrol_liveness": "off"}).status_code == 200
        r = boot.post("/v1/keys", params={"tenant": tenant}, json={"scopes": ["read", "enrol", "admin"]})
        assert r.status_code == 201, r.text
        key = r.json()
    secret = key["token"].split("_", 2)[2]
    yield {"tenant": tenant, "key_id": key["key_id"], "secret": hashlib.sha256(secret.encode()).hexdigest(),
           "raw_secret": secret}
    with live_app.client() as boot:
        boot.delete(f"/v1/keys/{key['key_id']}", params={"tenant": tenant})


@pytest.fixture(scope="module")
def rk(live_app: LiveApp, tenant_key: dict[str, Any]) -> Any:
    return _client(live_app, tenant_key["key_id"], tenant_key["secret"])


@pytest.fixture(scope="module")
def indexed(rk: Any) -> dict[str, Any]:
    """A collection with five people, each indexed from their first photo."""
    collection = "people"
    assert rk.create_collection(CollectionId=collection)["StatusCode"] == 200
    faces: dict[str, str] = {}
    for name, photos in people().items():
        if name == UNKNOWN:
            continue
        out = rk.index_faces(CollectionId=collection, Image=_bytes(photos[0]), ExternalImageId=name)
        assert len(out["FaceRecords"]) == 1, (name, out)
        face = out["FaceRecords"][0]["Face"]
        assert face["ExternalImageId"] == name and face["UserId"] == name
        assert 0 < face["BoundingBox"]["Width"] <= 1 and 0 < face["BoundingBox"]["Height"] <= 1
        assert out["FaceRecords"][0]["FaceDetail"]["Confidence"] > 50
        faces[name] = face["FaceId"]
    assert len(faces) == 5
    return {"collection": collection, "faces": faces}


def test_collections(rk: Any, indexed: dict[str, Any]) -> None:
    col = indexed["collection"]
    assert col in rk.list_collections()["CollectionIds"]
    desc = rk.describe_collection(CollectionId=col)
    assert (desc["FaceCount"], desc["UserCount"]) == (5, 5)
    listed = rk.list_faces(CollectionId=col)["Faces"]
    assert sorted(f["FaceId"] for f in listed) == sorted(indexed["faces"].values())
    with pytest.raises(rk.exceptions.ResourceAlreadyExistsException):
        rk.create_collection(CollectionId=col)


def test_search_faces_by_image_finds_each_person_and_not_the_stranger(rk: Any, indexed: dict[str, Any]) -> None:
    checked = 0
    for name, photos in people().items():
        probes = photos if name == UNKNOWN or len(photos) == 1 else photos[1:]
        for photo in probes:
            out = rk.search_faces_by_image(CollectionId=indexed["collection"], Image=_bytes(photo))
            found = [m["Face"]["ExternalImageId"] for m in out["FaceMatches"]]
            if name == UNKNOWN:
                assert found == [], (photo.name, out["FaceMatches"])
            else:
                assert found[:1] == [name], (photo.name, out["FaceMatches"])
                best = out["FaceMatches"][0]
                assert 80 <= best["Similarity"] <= 100
                assert best["Face"]["FaceId"] == indexed["faces"][name]
            assert 0 < out["SearchedFaceBoundingBox"]["Width"] <= 1
            checked += 1
    assert checked >= 10
    # FaceMatchThreshold is honoured: at 0 the stranger gets candidates, all below 80.
    out = rk.search_faces_by_image(CollectionId=indexed["collection"], FaceMatchThreshold=0,
                                   Image=_bytes(people()[UNKNOWN][0]))
    assert out["FaceMatches"] and all(m["Similarity"] < 80 for m in out["FaceMatches"])


def test_compare_faces_same_and_different(rk: Any) -> None:
    ppl = people()
    same = rk.compare_faces(SourceImage=_bytes(ppl["obama"][0]), TargetImage=_bytes(ppl["obama"][1]))
    assert len(same["FaceMatches"]) == 1 and same["FaceMatches"][0]["Similarity"] >= 80
    assert same["SourceImageFace"]["Confidence"] > 50
    other = rk.compare_faces(SourceImage=_bytes(ppl["obama"][0]), TargetImage=_bytes(ppl["biden"][0]))
    assert other["FaceMatches"] == [] and len(other["UnmatchedFaces"]) == 1
    # A group target: obama is matched, the other two faces are not.
    group = rk.compare_faces(SourceImage=_bytes(ppl["obama"][0]),
                             TargetImage=_bytes(FACES_DIR / "groups" / "obama_and_biden.jpg"))
    assert len(group["FaceMatches"]) == 1 and len(group["UnmatchedFaces"]) == 2


@pytest.mark.parametrize("name,count", sorted(GROUP_COUNTS.items()))
def test_detect_faces_counts_on_group_photos(rk: Any, name: str, count: int) -> None:
    out = rk.detect_faces(Image=_bytes(FACES_DIR / "groups" / name))
    assert len(out["FaceDetails"]) == count, name
    for face in out["FaceDetails"]:
        assert [p["Type"] for p in face["Landmarks"]] == ["eyeLeft", "eyeRight", "nose", "mouthLeft", "mouthRight"]
        box = face["BoundingBox"]
        assert -0.1 < box["Left"] < 1 and -0.1 < box["Top"] < 1 and 0 < box["Width"] <= 1.1


def test_users_associate_and_search(rk: Any, indexed: dict[str, Any]) -> None:
    col, faces, ppl = indexed["collection"], indexed["faces"], people()
    users = {u["UserId"] for u in rk.list_users(CollectionId=col)["Users"]}
    assert users == set(faces)
    rk.create_user(CollectionId=col, UserId="rose_leslie")  # exists (IndexFaces made it): no-op
    extra = rk.index_faces(CollectionId=col, Image=_bytes(ppl["rose_leslie"][1]), ExternalImageId="rose_leslie")
    rose2 = extra["FaceRecords"][0]["Face"]["FaceId"]
    assoc = rk.associate_faces(CollectionId=col, UserId="rose_leslie", FaceIds=[faces["rose_leslie"], rose2,
                                                                                    faces["obama"]])
    assert sorted(f["FaceId"] for f in assoc["AssociatedFaces"]) == sorted([faces["rose_leslie"], rose2])
    assert assoc["UnsuccessfulFaceAssociations"] == [
        {"FaceId": faces["obama"], "UserId": "obama", "Reasons": ["ASSOCIATED_TO_A_DIFFERENT_USER"]}]
    assert len(rk.list_faces(CollectionId=col, UserId="rose_leslie")["Faces"]) == 2

    by_image = rk.search_users_by_image(CollectionId=col, Image=_bytes(FACES_DIR / "groups" / "kit_with_rose.jpg"))
    assert len(by_image["UnsearchedFaces"]) == 1  # the largest face is searched, as in Rekognition
    by_image = rk.search_users_by_image(CollectionId=col, Image=_bytes(ppl["biden"][1]))
    assert [m["User"]["UserId"] for m in by_image["UserMatches"]] == ["biden"]
    # From a stored face: its own user is left out, no one else is similar enough.
    by_face = rk.search_users(CollectionId=col, FaceId=faces["obama"])
    assert by_face["SearchedFace"] == {"FaceId": faces["obama"]} and by_face["UserMatches"] == []
    near = rk.search_users(CollectionId=col, UserId="obama", UserMatchThreshold=0)
    assert near["SearchedUser"] == {"UserId": "obama"}
    assert "obama" not in {m["User"]["UserId"] for m in near["UserMatches"]} and near["UserMatches"]

    rk.create_user(CollectionId=col, UserId="newcomer")
    assert "newcomer" in {u["UserId"] for u in rk.list_users(CollectionId=col)["Users"]}
    rk.delete_user(CollectionId=col, UserId="newcomer")
    with pytest.raises(rk.exceptions.ResourceNotFoundException):
        rk.delete_user(CollectionId=col, UserId="newcomer")
    with pytest.raises(rk.exceptions.InvalidParameterException):
        rk.disassociate_faces(CollectionId=col, UserId="rose_leslie", FaceIds=[rose2])
    assert rk.delete_faces(CollectionId=col, FaceIds=[rose2])["DeletedFaces"] == [rose2]


def test_delete_faces_and_collection(rk: Any, indexed: dict[str, Any]) -> None:
    col, faces, ppl = indexed["collection"], indexed["faces"], people()
    out = rk.delete_faces(CollectionId=col, FaceIds=[faces["biden"]])
    assert out["DeletedFaces"] == [faces["biden"]]
    again = rk.delete_faces(CollectionId=col, FaceIds=[faces["biden"]])
    assert again["DeletedFaces"] == [] and again["UnsuccessfulFaceDeletions"][0]["Reasons"] == ["FACE_NOT_FOUND"]
    found = rk.search_faces_by_image(CollectionId=col, Image=_bytes(ppl["biden"][1]))
    assert "biden" not in [m["Face"]["ExternalImageId"] for m in found["FaceMatches"]]

    assert rk.delete_collection(CollectionId=col)["StatusCode"] == 200
    assert col not in rk.list_collections()["CollectionIds"]
    for call in (lambda: rk.search_faces_by_image(CollectionId=col, Image=_bytes(ppl["obama"][1])),
                 lambda: rk.search_users_by_image(CollectionId=col, Image=_bytes(ppl["obama"][1])),
                 lambda: rk.describe_collection(CollectionId=col),
                 lambda: rk.delete_collection(CollectionId=col)):
        with pytest.raises(rk.exceptions.ResourceNotFoundException):
            call()


def test_credentials(live_app: LiveApp, tenant_key: dict[str, Any]) -> None:
    boot = _client(live_app, "bootstrap", BOOTSTRAP_KEY)
    assert "CollectionIds" in boot.list_collections()
    for akid, secret, code in ((tenant_key["key_id"], "0" * 64, "InvalidSignatureException"),
                               (tenant_key["key_id"], tenant_key["raw_secret"], "InvalidSignatureException"),
                               ("bootstrap", "not-the-key", "InvalidSignatureException"),
                               ("no-such-key", tenant_key["secret"], "UnrecognizedClientException")):
        with pytest.raises(ClientError) as err:
            _client(live_app, akid, secret).list_collections()
        assert err.value.response["Error"]["Code"] == code
        assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
