"""The CompreFace Python SDK (compreface-sdk from PyPI) against the real app.

Its x-api-key is a faceserve key of a fresh tenant: the SDK's face collection
is that tenant's default collection. Similarities are 0..1 with the
service's threshold at 0.8 (docs/COMPATIBILITY.md).
"""
from __future__ import annotations

import uuid
from typing import Any, Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from compreface import CompreFace

from tests.conftest import FACES_DIR, people
from tests.integration.conftest import LiveApp
from tests.unit.conftest import GROUP_COUNTS

UNKNOWN = "kit_harington"
MATCH = 0.8  # the service's decision threshold on CompreFace's similarity scale


@pytest.fixture(scope="module")
def token(live_app: LiveApp) -> Iterator[str]:
    tenant = f"cf-{uuid.uuid4().hex[:8]}"
    with live_app.client() as boot:
        assert boot.put(f"/v1/tenants/{tenant}", json={"min_enrol_liveness": "off"}).status_code == 200
        r = boot.post("/v1/keys", params={"tenant": tenant}, json={"scopes": ["read", "enrol"]})
        assert r.status_code == 201, r.text
        key = r.json()
    yield key["token"]
    with live_app.client() as boot:
        boot.delete(f"/v1/keys/{key['key_id']}", params={"tenant": tenant})


@pytest.fixture(scope="module")
def sdk(live_app: LiveApp) -> CompreFace:
    url = urlsplit(live_app.url)
    return CompreFace(domain=f"{url.scheme}://{url.hostname}", port=str(url.port))


@pytest.fixture(scope="module")
def added(sdk: CompreFace, token: str) -> dict[str, str]:
    """Five people, each added from their first photo: subject name -> image_id."""
    faces = sdk.init_face_recognition(token).get_face_collection()
    image_ids: dict[str, str] = {}
    for name, photos in people().items():
        if name == UNKNOWN:
            continue
        out = faces.add(image_path=str(photos[0]), subject=name)
        assert out.get("subject") == name and out.get("image_id"), out
        image_ids[name] = out["image_id"]
    return image_ids


def test_faces_and_subjects_are_listed(sdk: CompreFace, token: str, added: dict[str, str]) -> None:
    recognition = sdk.init_face_recognition(token)
    listed = recognition.get_face_collection().list()
    assert listed["total_elements"] == 5
    assert {(f["subject"], f["image_id"]) for f in listed["faces"]} == set(added.items())
    assert sorted(recognition.get_subjects().list()["subjects"]) == sorted(added)


def test_recognize_finds_each_person_and_not_the_stranger(sdk: CompreFace, token: str, added: dict[str, str]) -> None:
    recognition = sdk.init_face_recognition(token)
    checked = 0
    for name, photos in people().items():
        probes = photos if name == UNKNOWN or len(photos) == 1 else photos[1:]
        for photo in probes:
            out = recognition.recognize(image_path=str(photo), options={"prediction_count": 2})
            assert len(out["result"]) == 1, (photo.name, out)
            face = out["result"][0]
            assert set(face["box"]) == {"probability", "x_min", "y_min", "x_max", "y_max"}
            best = face["subjects"][0]
            if name == UNKNOWN:
                assert best["similarity"] < MATCH, (photo.name, face["subjects"])
            else:
                assert best["subject"] == name and best["similarity"] >= MATCH, (photo.name, face["subjects"])
                assert len(face["subjects"]) == 2 and face["subjects"][1]["similarity"] < MATCH
            checked += 1
    assert checked >= 10


def test_verify_same_and_different(sdk: CompreFace, token: str, added: dict[str, str]) -> None:
    ppl = people()
    verification = sdk.init_face_verification(token)
    same = verification.verify(str(ppl["obama"][0]), str(ppl["obama"][1]))["result"][0]
    assert same["face_matches"][0]["similarity"] >= MATCH and "box" in same["source_image_face"]
    other = verification.verify(str(ppl["obama"][0]), str(ppl["biden"][0]))["result"][0]
    assert other["face_matches"][0]["similarity"] < MATCH
    # Against a saved image (image_id), as CompreFace's face-collection verify does.
    faces = sdk.init_face_recognition(token).get_face_collection()
    assert faces.verify(str(ppl["obama"][2]), added["obama"])["result"][0]["similarity"] >= MATCH
    assert faces.verify(str(ppl["obama"][2]), added["biden"])["result"][0]["similarity"] < MATCH


@pytest.mark.parametrize("name,count", sorted(GROUP_COUNTS.items()))
def test_detect_counts_on_group_photos(sdk: CompreFace, token: str, name: str, count: int) -> None:
    out = sdk.init_face_detection(token).detect(str(FACES_DIR / "groups" / name), options={"face_plugins": "landmarks"})
    assert len(out["result"]) == count, name
    assert all(len(f["landmarks"]) == 5 for f in out["result"])


def test_subjects_add_rename_and_recognize(sdk: CompreFace, token: str, added: dict[str, str]) -> None:
    recognition = sdk.init_face_recognition(token)
    subjects, faces, ppl = recognition.get_subjects(), recognition.get_face_collection(), people()
    assert subjects.add("rose") == {"subject": "rose"}
    assert subjects.update("rose", "rose_2") == {"updated": True}
    second = faces.add(image_path=str(ppl["rose_leslie"][1]), subject="rose_2")
    out = recognition.recognize(image_path=str(FACES_DIR / "groups" / "kit_with_rose.jpg"))
    names = {f["subjects"][0]["subject"] for f in out["result"] if f["subjects"][0]["similarity"] >= MATCH}
    assert names & {"rose_leslie", "rose_2"} and len(out["result"]) == 2
    assert subjects.delete("rose_2") == {"subject": "rose_2"}
    assert "rose_2" not in subjects.list()["subjects"]
    assert faces.delete(second["image_id"])["code"] == 0  # gone with its subject: an error answer


def test_delete_images_and_subjects(sdk: CompreFace, token: str, added: dict[str, str]) -> None:
    recognition = sdk.init_face_recognition(token)
    faces, ppl = recognition.get_face_collection(), people()
    assert faces.delete(added["biden"]) == {"image_id": added["biden"], "subject": "biden"}
    out = recognition.recognize(image_path=str(ppl["biden"][1]))
    assert out["result"][0]["subjects"][0]["subject"] != "biden"
    assert faces.delete_all("obama") == {"deleted": 1}
    assert recognition.get_subjects().delete_all()["deleted"] == 5
    assert faces.list()["total_elements"] == 0
    gone = faces.delete(added["alex_lacamoire"])
    assert gone["code"] == 0 and "not found" in gone["message"]
    out = recognition.recognize(image_path=str(ppl["lin_manuel_miranda"][0]))
    assert out["result"][0]["subjects"] == []


def test_a_wrong_key_is_refused(live_app: LiveApp, sdk: CompreFace) -> None:
    out = sdk.init_face_recognition("fsk_nokey_wrong").get_subjects().list()
    assert set(out) == {"message", "code"}
    r = httpx.get(f"{live_app.url}/api/v1/recognition/subjects", headers={"x-api-key": "fsk_nokey_wrong"})
    assert r.status_code == 401
