"""Decisions users can trust, through the real app: quality, target_fmr,
the maybe band, and "not this person" feedback."""
from __future__ import annotations

import io
import time

import httpx
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from tests.conftest import people
from tests.integration.conftest import LiveApp


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.convert("RGB").save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def gallery(live_app: LiveApp) -> dict:
    """A collection of its own: two people enrolled from one photo each."""
    name = f"trust-{time.time_ns()}"
    out = {"collection": name, "ids": {}, "seq": 0}
    with live_app.client() as c:
        assert c.post("/v1/collections", json={"name": name}).status_code == 201
        for person in ("obama", "rose_leslie"):
            sid = c.post("/v1/subjects", json={"name": person, "collection": name}).json()["id"]
            r = c.post(f"/v1/subjects/{sid}/faces", params={"collection": name},
                       files={"image": people()[person][0].open("rb")}, data={"liveness": "off"})
            assert r.status_code == 201, r.text
            out["ids"][person] = sid
            out["seq"] = max(out["seq"], r.json()["seq"])
    return out


def _identify(c: httpx.Client, gallery: dict, data: bytes, **params: object) -> dict:
    r = c.post("/v1/identify", params={"collection": gallery["collection"], "min_seq": gallery["seq"], **params},
               files={"image": ("p.jpg", data)})
    assert r.status_code == 200, r.text
    return r.json()


def test_every_face_carries_quality(live_app: LiveApp) -> None:
    with live_app.client() as c:
        face = c.post("/v1/detect", files={"image": people()["obama"][1].open("rb")}).json()["faces"][0]
        assert 0.5 <= face["quality"]["score"] <= 1 and face["quality"]["reasons"] == []
        dark = _jpeg(ImageEnhance.Brightness(Image.open(people()["obama"][1])).enhance(0.18))
        face = c.post("/v1/detect", files={"image": ("d.jpg", dark)}).json()["faces"][0]
        assert "too_dark" in face["quality"]["reasons"]


@pytest.mark.parametrize("degrade, reason", [
    (lambda im: im.filter(ImageFilter.GaussianBlur(14)), "blurred"),
    (lambda im: im.resize((im.width // 12, im.height // 12)), "too_small"),
])
def test_enrolment_below_the_bar_is_refused_with_reasons(live_app: LiveApp, gallery: dict, degrade, reason) -> None:
    data = _jpeg(degrade(Image.open(people()["obama"][0])))
    with live_app.client() as c:
        sid = gallery["ids"]["obama"]
        before = c.get(f"/v1/subjects/{sid}/faces", params={"collection": gallery["collection"]}).json()["faces"]
        r = c.post(f"/v1/subjects/{sid}/faces", params={"collection": gallery["collection"]},
                   files={"image": ("q.jpg", data)}, data={"liveness": "off"})
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "low_quality" and reason in err["details"]["reasons"]
        after = c.get(f"/v1/subjects/{sid}/faces", params={"collection": gallery["collection"]}).json()["faces"]
        assert after == before


def test_target_fmr_changes_the_threshold_and_the_decision(live_app: LiveApp, gallery: dict) -> None:
    probe = people()["obama"][1].read_bytes()
    with live_app.client() as c:
        default = _identify(c, gallery, probe)
        face = default["faces"][0]
        sim = face["candidates"][0]["similarity"]
        assert face["decision"] == "match" and face["candidates"][0]["fmr"] is not None
        loose = _identify(c, gallery, probe, target_fmr=0.01)
        strict = _identify(c, gallery, probe, target_fmr=1e-6)
        assert loose["threshold"] < default["threshold"] < strict["threshold"]
        assert loose["target_fmr"] == 0.01 and strict["target_fmr"] == 1e-6
        # the verdict follows the threshold for the same similarity
        assert loose["faces"][0]["decision"] == "match"
        assert strict["faces"][0]["decision"] == ("match" if sim >= strict["threshold"] else "maybe")
        v = c.post("/v1/verify", data={"target_fmr": "1e-6"},
                   files={"image1": people()["obama"][0].open("rb"), "image2": people()["obama"][1].open("rb")})
        assert v.status_code == 200 and v.json()["target_fmr"] == 1e-6 and v.json()["decision"] in ("match", "maybe")
        bad = c.post("/v1/identify", params={"target_fmr": "2"}, files={"image": ("p.jpg", probe)})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"


def test_a_face_in_the_maybe_band_gets_maybe(live_app: LiveApp, gallery: dict) -> None:
    """Blur the probe step by step until its similarity falls between the maybe
    threshold and the match threshold at the strictest target (FMR 1e-6)."""
    src = Image.open(people()["obama"][1])
    with live_app.client() as c:
        seen = []
        for radius in (0, 2, 4, 6, 8, 10, 12, 14, 16, 18):
            probe = _jpeg(src.filter(ImageFilter.GaussianBlur(radius)) if radius else src)
            body = _identify(c, gallery, probe, target_fmr=1e-6)
            if not body["faces"] or not body["faces"][0]["candidates"]:
                continue
            face, sim = body["faces"][0], body["faces"][0]["candidates"][0]["similarity"]
            seen.append((radius, sim, face["decision"]))
            if body["maybe_threshold"] <= sim < body["threshold"]:
                assert face["decision"] == "maybe" and face["subject"] is None
                assert face["candidates"][0]["subject_id"] == gallery["ids"]["obama"]
                return
        pytest.fail(f"no blur put the probe in the maybe band: {seen}")


def test_not_this_person_changes_the_decision(live_app: LiveApp, gallery: dict) -> None:
    probe = people()["obama"][2].read_bytes()
    with live_app.client() as c:
        first = c.post("/v1/identify", params={"collection": gallery["collection"], "min_seq": gallery["seq"],
                                               "target_fmr": 0.01}, files={"image": ("p.jpg", probe)})
        face = first.json()["faces"][0]
        assert face["decision"] == "match"
        wrong = face["subject"]["id"]
        trace_id = first.headers["x-trace-id"]
        r = c.post(f"/v1/subjects/{wrong}/not-this-person", params={"collection": gallery["collection"]},
                   json={"trace_id": trace_id, "face": 0, "note": "operator: not him"})
        if r.status_code == 422:  # answered by another ingress replica: send the image instead
            r = c.post(f"/v1/subjects/{wrong}/not-this-person", params={"collection": gallery["collection"]},
                       files={"image": ("p.jpg", probe)})
        assert r.status_code == 201, r.text
        fid = r.json()["id"]
        again = _identify(c, gallery, probe, target_fmr=0.01)["faces"][0]
        assert again["decision"] != "match" or again["subject"]["id"] != wrong
        assert next(x for x in again["candidates"] if x["subject_id"] == wrong)["demoted"] is True
        listed = c.get("/v1/feedback", params={"collection": gallery["collection"], "subject_id": wrong}).json()
        assert [f["id"] for f in listed["feedback"]] == [fid]
        assert c.delete(f"/v1/feedback/{fid}", params={"collection": gallery["collection"]}).status_code == 204
        back = _identify(c, gallery, probe, target_fmr=0.01)["faces"][0]
        assert back["decision"] == "match" and back["subject"]["id"] == wrong
