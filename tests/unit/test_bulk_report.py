"""The bulk enrolment report and the idempotency keys."""
from __future__ import annotations

import io
import json
import uuid

import pytest

from serve_app.jobs.keys import crop_key, image_sha256, is_bulk_key
from serve_app.jobs.report import Outcome, Report


def _row(status: str, reason: str = "", uri: str = "u", subject: str = "s") -> dict[str, str]:
    return {"uri": uri, "subject": subject, "status": status, "reason": reason, "detail": ""}


def test_report_counts_reasons_and_lists_only_problems() -> None:
    r = Report(options={"collection": "c"})
    rows = [_row("enrolled"), _row("enrolled", "spoof_flagged"), _row("skipped", "already_enrolled"),
            _row("rejected", "no_face", "a.jpg"), _row("rejected", "no_face", "b.jpg"),
            _row("rejected", "multiple_faces", "g.jpg"), _row("failed", "OSError", "f.jpg")]
    for row in rows:
        r.add(row)
    s = r.summary()
    assert (s["total"], s["enrolled"], s["skipped"], s["rejected"], s["failed"]) == (7, 2, 1, 3, 1)
    assert s["rejected_by_reason"] == {"multiple_faces": 1, "no_face": 2}
    assert s["flagged_spoof"] == 1
    assert [p["uri"] for p in r.problems()] == ["a.jpg", "b.jpg", "g.jpg", "f.jpg"]
    doc = r.to_json()
    assert doc["summary"]["rejected"] == 3 and doc["options"] == {"collection": "c"}
    assert [i["reason"] for i in doc["images"]] == ["no_face", "no_face", "multiple_faces", "OSError"]
    r.add(_row("rejected", "spoof", "late.jpg"))  # the spool stays appendable after a read
    assert len(r.to_json()["images"]) == 5


def test_empty_report_is_valid_json() -> None:
    buf = io.BytesIO()
    Report(options={}).write(buf)
    assert json.loads(buf.getvalue())["images"] == []


def test_unknown_status_or_reason_is_refused() -> None:
    with pytest.raises(ValueError):
        Outcome("u", "s", "done")
    with pytest.raises(ValueError):
        Outcome("u", "s", "rejected", "ugly")


def test_crop_key_is_deterministic_per_collection_subject_and_image() -> None:
    sid = uuid.uuid4()
    sha = image_sha256(b"photo")
    key = crop_key(3, sid, sha)
    assert key == f"crops/3/{sid}/{sha}.jpg" == crop_key(3, str(sid), sha)
    assert crop_key(3, uuid.uuid4(), sha) != key and crop_key(4, sid, sha) != key
    assert crop_key(3, sid, image_sha256(b"other")) != key
    assert is_bulk_key(key)
    assert not is_bulk_key(f"crops/3/{sid}/{uuid.uuid4().hex}.jpg")  # the HTTP path's random keys


@pytest.mark.parametrize("cid, sid, sha", [
    (0, uuid.uuid4(), "a" * 64), (1, "not-a-uuid", "a" * 64), (1, uuid.uuid4(), "A" * 64),
    (1, uuid.uuid4(), "a" * 63), (True, uuid.uuid4(), "a" * 64)])
def test_crop_key_refuses_bad_parts(cid: object, sid: object, sha: str) -> None:
    with pytest.raises(ValueError):
        crop_key(cid, sid, sha)  # type: ignore[arg-type]
