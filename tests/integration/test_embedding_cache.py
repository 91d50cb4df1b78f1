"""The embedding cache on the real app: a repeated image is answered from the
cache with the same result, and a detector option change is never answered
from entries made before it. Prints miss vs hit latency (no assertion on it)."""
from __future__ import annotations

import statistics
import time
import uuid

import httpx

from tests.conftest import people
from tests.integration.conftest import LiveApp

COLLECTION = "embcache-it"


def _unique(photo: bytes) -> bytes:
    """The same picture with bytes after its end: another sha256, a certain miss."""
    return photo + b"\x00" + uuid.uuid4().bytes


def _identify(c: httpx.Client, image: bytes) -> tuple[httpx.Response, float]:
    t0 = time.perf_counter()
    r = c.post("/v1/identify", params={"collection": COLLECTION}, files={"image": ("p.jpg", image)})
    assert r.status_code == 200, r.text
    return r, (time.perf_counter() - t0) * 1000.0


def _faces(r: httpx.Response) -> list[tuple]:
    return [(tuple(f["box"].values()) if isinstance(f["box"], dict) else tuple(f["box"]), f["decision"],
             f["subject"]["id"] if f["subject"] else None) for f in r.json()["faces"]]


def test_a_repeated_image_is_answered_from_the_cache(live_app: LiveApp) -> None:
    ppl = people()
    with live_app.client() as c:
        c.post("/v1/collections", json={"name": COLLECTION})
        sid = c.post("/v1/subjects", json={"name": "obama", "collection": COLLECTION}).json()["id"]
        r = c.post(f"/v1/subjects/{sid}/faces", params={"collection": COLLECTION},
                   files={"image": ("o.jpg", ppl["obama"][0].read_bytes())}, data={"liveness": "off"})
        assert r.status_code == 201, r.text
        seq = r.json()["seq"]
        c.post("/v1/identify", params={"collection": COLLECTION, "min_seq": seq},
               files={"image": ("o.jpg", ppl["obama"][1].read_bytes())})
        misses, hits = [], []
        for photo in [p for ps in ppl.values() for p in ps][:8]:
            image = _unique(photo.read_bytes())
            first, miss_ms = _identify(c, image)
            second, hit_ms = _identify(c, image)
            assert "cache" not in first.json()["timings_ms"] and "embed" in first.json()["timings_ms"]
            assert "cache" in second.json()["timings_ms"], second.json()["timings_ms"]
            assert {"decode", "detect", "embed"}.isdisjoint(second.json()["timings_ms"])
            assert "search" in second.json()["timings_ms"]  # the matcher still runs: the gallery may have changed
            assert _faces(first) == _faces(second)
            for a, b in zip(first.json()["faces"], second.json()["faces"]):
                assert [x["similarity"] for x in a["candidates"]] == [x["similarity"] for x in b["candidates"]]
            misses.append(miss_ms)
            hits.append(hit_ms)
    print(f"\nidentify over HTTP, {len(misses)} images: miss median {statistics.median(misses):.1f} ms, "
          f"hit median {statistics.median(hits):.1f} ms "
          f"(ratio {statistics.median(misses) / statistics.median(hits):.1f}x)")


def test_liveness_is_never_answered_from_the_cache(live_app: LiveApp) -> None:
    image = _unique(people()["obama"][2].read_bytes())
    with live_app.client() as c:
        for _ in range(2):
            r = c.post("/v1/identify", params={"collection": COLLECTION, "liveness": "flag"},
                       files={"image": ("p.jpg", image)})
            assert r.status_code == 200, r.text
            assert "cache" not in r.json()["timings_ms"] and "liveness" in r.json()["timings_ms"]
            assert "live" in r.json()["faces"][0]["liveness"]


def test_a_detector_option_change_is_not_answered_from_old_entries(live_app: LiveApp) -> None:
    image = _unique(people()["obama"][3].read_bytes())
    with live_app.client() as c:
        _identify(c, image)
        assert "cache" in _identify(c, image)[0].json()["timings_ms"]
        live_app.reconfigure({"Detector": {"user_config": {"score_threshold": 0.75}}})
        try:
            # The ingress learns the new options within its refresh (5 s) or from
            # the first result made under them; from then on the old entry is dead.
            deadline = time.monotonic() + 60
            while "cache" in _identify(c, image)[0].json()["timings_ms"]:
                assert time.monotonic() < deadline, "still answered from the old detector options' entry"
                time.sleep(1.0)
            again, _ = _identify(c, image)
            assert "cache" in again.json()["timings_ms"]  # cached anew, under the new options
        finally:
            live_app.reconfigure({"Detector": {"user_config": {"score_threshold": 0.7}}})
