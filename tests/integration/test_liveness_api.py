"""Passive liveness through HTTP: /v1/liveness, the off/flag/block policy, and enrolment.

image_T1 is a live face, image_F1 and image_F2 are spoofs (a face shown to
the camera again); models/liveness.py scores them about 0.9999, 0.22 and
0.003 against the default threshold of 0.5.
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.conftest import FACES_DIR
from tests.integration.conftest import LiveApp

LIVENESS_DIR = FACES_DIR / "liveness"
LIVE = LIVENESS_DIR / "image_T1.jpg"
SPOOFS = [LIVENESS_DIR / "image_F1.jpg", LIVENESS_DIR / "image_F2.jpg"]
ALL = [(LIVE, True)] + [(p, False) for p in SPOOFS]


def _post_image(client: httpx.Client, url: str, path: Path, **data: Any) -> httpx.Response:
    with path.open("rb") as fh:
        return client.post(url, files={"image": (path.name, fh)}, data={k: str(v) for k, v in data.items()})


def _stored_objects(live_app: LiveApp) -> set[Path]:
    root = live_app.object_dir
    return {p for p in root.rglob("*") if p.is_file()} if root.exists() else set()


def _subject_id(match: dict[str, Any] | None) -> str | None:
    """The id of identify's best match ("subject_id" in its candidates, "id" elsewhere)."""
    if not match:
        return None
    return match.get("id") or match.get("subject_id")


def _check_result(result: dict[str, Any], live: bool) -> None:
    assert set(result) >= {"live", "score", "threshold"}, result
    assert result["live"] is live, result
    assert 0.0 <= result["score"] <= 1.0
    assert result["live"] == (result["score"] >= result["threshold"])


@pytest.fixture()
def subject(client: httpx.Client) -> Iterator[str]:
    """A fresh subject of its own (unique name in the session's database), removed afterwards."""
    r = client.post("/v1/subjects", json={"name": f"liveness-{uuid.uuid4().hex}"})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    yield sid
    client.delete(f"/v1/subjects/{sid}")


@pytest.mark.parametrize("path,live", ALL, ids=[p.stem for p, _ in ALL])
def test_liveness_endpoint_judges_the_shared_photos(client: httpx.Client, path: Path, live: bool) -> None:
    r = _post_image(client, "/v1/liveness", path)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["faces"]) == 1, body
    face = body["faces"][0]
    assert set(face["box"]) == {"x1", "y1", "x2", "y2"}
    _check_result(face, live)
    assert "liveness" in body["timings_ms"]


def test_liveness_endpoint_takes_base64_json(client: httpx.Client) -> None:
    import base64

    img = base64.b64encode(SPOOFS[0].read_bytes()).decode()
    r = client.post("/v1/liveness", json={"image": img})
    assert r.status_code == 200, r.text
    _check_result(r.json()["faces"][0], False)


def test_detect_flag_carries_the_result_and_off_leaves_it_out(client: httpx.Client) -> None:
    for path, live in ALL:
        r = _post_image(client, "/v1/detect", path, liveness="flag")
        assert r.status_code == 200, r.text  # flag reports, it never refuses
        faces = r.json()["faces"]
        assert len(faces) == 1
        _check_result(faces[0]["liveness"], live)
    # off (the default for detect): no liveness work, no liveness in the answer
    for params in ({}, {"liveness": "off"}):
        with SPOOFS[0].open("rb") as fh:
            r = client.post("/v1/detect", params=params, files={"image": fh})
        assert r.status_code == 200, r.text
        assert "liveness" not in r.json()["faces"][0]
        assert "liveness" not in r.json()["timings_ms"]


def test_unknown_policy_is_a_400(client: httpx.Client) -> None:
    r = _post_image(client, "/v1/detect", LIVE, liveness="maybe")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_request"


def test_identify_block_refuses_a_spoof(client: httpx.Client) -> None:
    for spoof in SPOOFS:
        with spoof.open("rb") as fh:
            r = client.post("/v1/identify", params={"liveness": "block"}, files={"image": fh})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "spoof_detected", err
        assert err["details"]["faces"] == [0]
        assert all(s < err["details"]["threshold"] for s in err["details"]["scores"])
    # the live face passes block and the answer carries its result
    with LIVE.open("rb") as fh:
        r = client.post("/v1/identify", params={"liveness": "block"}, files={"image": fh})
    assert r.status_code == 200, r.text
    _check_result(r.json()["faces"][0]["liveness"], True)


def test_identify_flag_answers_a_spoof(client: httpx.Client) -> None:
    r = _post_image(client, "/v1/identify", SPOOFS[0], liveness="flag")
    assert r.status_code == 200, r.text
    _check_result(r.json()["faces"][0]["liveness"], False)


def test_verify_policy(client: httpx.Client) -> None:
    with LIVE.open("rb") as a, SPOOFS[1].open("rb") as b:
        r = client.post("/v1/verify", files={"image1": a, "image2": b}, data={"liveness": "block"})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "spoof_detected"
    with LIVE.open("rb") as a, SPOOFS[1].open("rb") as b:
        r = client.post("/v1/verify", files={"image1": a, "image2": b}, data={"liveness": "flag"})
    assert r.status_code == 200, r.text
    faces = r.json()["faces"]
    _check_result(faces["image1"]["liveness"], True)
    _check_result(faces["image2"]["liveness"], False)


def test_enrolling_a_spoof_is_refused_and_nothing_is_stored(
    client: httpx.Client, live_app: LiveApp, subject: str
) -> None:
    before = _stored_objects(live_app)
    for spoof in SPOOFS:
        r = _post_image(client, f"/v1/subjects/{subject}/faces", spoof)  # default policy: block
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "spoof_detected", err
        assert err["details"]["score"] < err["details"]["threshold"]
    # no face row, no crop in object storage, nothing in the index
    r = client.get(f"/v1/subjects/{subject}/faces")
    assert r.status_code == 200, r.text
    assert r.json()["faces"] == []
    assert _stored_objects(live_app) == before
    for spoof in SPOOFS:
        with spoof.open("rb") as fh:
            r = client.post("/v1/identify", params={"liveness": "off"}, files={"image": fh})
        assert r.status_code == 200, r.text
        for face in r.json()["faces"]:
            assert all(c["subject_id"] != subject for c in face["candidates"]), face
            assert _subject_id(face["subject"]) != subject


def test_enrolling_a_live_face_succeeds_and_carries_the_result(
    client: httpx.Client, live_app: LiveApp, subject: str
) -> None:
    before = _stored_objects(live_app)
    r = _post_image(client, f"/v1/subjects/{subject}/faces", LIVE)  # default policy: block
    assert r.status_code == 201, r.text
    body = r.json()
    _check_result(body["face"]["liveness"], True)
    assert "liveness" in body["timings_ms"]
    faces = client.get(f"/v1/subjects/{subject}/faces").json()["faces"]
    assert [f["id"] for f in faces] == [body["face"]["id"]]
    assert len(_stored_objects(live_app) - before) == 1
    with LIVE.open("rb") as fh:
        r = client.post("/v1/identify", params={"min_seq": body["seq"]}, files={"image": fh})
    assert r.status_code == 200, r.text
    assert _subject_id(r.json()["faces"][0]["subject"]) == subject
