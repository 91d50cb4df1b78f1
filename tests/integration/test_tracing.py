"""One trace per request, with spans from the ingress and every deployment it crossed."""
from __future__ import annotations

import time
import uuid

import httpx

from tests.conftest import FACES_DIR
from tests.integration.conftest import LiveApp


def _wait_for(live_app: LiveApp, trace_id: str, names: set[str], timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    spans = []
    while time.monotonic() < deadline:
        spans = live_app.traces.trace(trace_id)
        if names <= {s.name for s in spans}:
            return spans
        time.sleep(0.3)
    return spans


def test_identify_is_one_trace_across_every_deployment(live_app: LiveApp, client: httpx.Client) -> None:
    photo = FACES_DIR / "liveness" / "image_T1.jpg"
    with photo.open("rb") as fh:
        r = client.post("/v1/identify", params={"liveness": "flag"}, files={"image": fh},
                        headers={"x-request-id": "trace-test-1"})
    assert r.status_code == 200, r.text
    trace_id = r.headers["x-trace-id"]
    assert len(trace_id) == 32 and r.headers["x-request-id"] == "trace-test-1"
    hops = {"Detector.detect", "Embedder.embed", "Liveness.check", "Matcher.search"}
    spans = _wait_for(live_app, trace_id, hops | {"POST /v1/identify", "decode", "detect", "align"})
    by_name = {s.name: s for s in spans}
    assert hops | {"POST /v1/identify", "decode", "detect", "align"} <= set(by_name), sorted(by_name)
    root = by_name["POST /v1/identify"]
    assert root.parent_id == "" and root.service == "faceserve.Ingress"
    assert root.attributes.get("faceserve.request_id") == "trace-test-1"
    # every deployment hop hangs off the request's root span, from its own replica
    for hop in hops:
        assert by_name[hop].parent_id == root.span_id, hop
        assert by_name[hop].service == f"faceserve.{hop.split('.')[0]}"
    # the upload is decoded by the detector (compressed bytes travel, not pixels)
    assert by_name["decode"].parent_id == by_name["Detector.detect"].span_id
    assert by_name["detect"].parent_id == by_name["Detector.detect"].span_id
    assert by_name["align"].parent_id == by_name["Detector.detect"].span_id
    assert {s.trace_id for s in spans} == {trace_id}


def test_incoming_traceparent_is_continued(live_app: LiveApp, client: httpx.Client) -> None:
    parent_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    header = f"00-{parent_trace}-00f067aa0ba902b7-01"
    # Bytes of its own after the picture: a new image to the embedding cache, so the detector runs.
    image = (FACES_DIR / "people" / "obama" / "obama_1.jpg").read_bytes() + uuid.uuid4().bytes
    r = client.post("/v1/detect", files={"image": ("obama_1.jpg", image)}, headers={"traceparent": header})
    assert r.status_code == 200
    assert r.headers["x-trace-id"] == parent_trace
    spans = _wait_for(live_app, parent_trace, {"POST /v1/detect", "Detector.detect"})
    root = next(s for s in spans if s.name == "POST /v1/detect")
    assert root.parent_id == "00f067aa0ba902b7"


def test_access_log_is_json_with_request_and_trace_ids(live_app: LiveApp, client: httpx.Client) -> None:
    import json
    from pathlib import Path

    with (FACES_DIR / "people" / "obama" / "obama_1.jpg").open("rb") as fh:
        r = client.post("/v1/detect", files={"image": fh}, headers={"x-request-id": "log-test-7"})
    trace_id = r.headers["x-trace-id"]
    logs = Path("/tmp/ray-faceserve-it/session_latest/logs")
    deadline = time.monotonic() + 20
    found = None
    while found is None and time.monotonic() < deadline:
        for path in logs.rglob("*"):
            if not path.is_file() or path.suffix not in (".err", ".out", ".log"):
                continue
            for line in path.read_text(errors="replace").splitlines():
                if trace_id in line and line.lstrip().startswith("{"):
                    found = json.loads(line)
                    break
            if found:
                break
        time.sleep(0.5)
    assert found is not None, "no JSON access-log line with the trace id in the replica logs"
    assert found["request_id"] == "log-test-7" and found["trace_id"] == trace_id
    assert found["route"] == "/v1/detect" and found["status"] == 200
