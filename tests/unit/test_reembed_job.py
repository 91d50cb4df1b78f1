"""The re-embed job's pieces that need no cluster: which face of a stored
crop is the enrolled one, the report, the arguments."""
from __future__ import annotations

import pytest

from serve_app.jobs.reembed_worker import pick_face
from serve_app.jobs.report import ReembedReport


def _crop_box(face: tuple[float, float, float, float], margin: float = 0.25) -> tuple[int, int, tuple]:
    """The crop detection_path cuts around `face` (no photo edge), and the face's box in it."""
    x1, y1, x2, y2 = face
    w, h = x2 - x1, y2 - y1
    cw, ch = w * (1 + 2 * margin), h * (1 + 2 * margin)
    return int(cw), int(ch), (margin * w, margin * h, margin * w + w, margin * h + h)


def test_the_enrolled_face_is_the_one_in_the_middle_of_its_crop() -> None:
    cw, ch, box = _crop_box((100, 100, 300, 340))
    neighbour = (0, 0, 60, 70)  # a bit of another face at the crop's corner
    assert pick_face([neighbour, box], cw, ch, 0.25) == 1
    assert pick_face([box], cw, ch, 0.25) == 0
    shifted = (box[0] + 15, box[1] - 10, box[2] + 15, box[3] - 10)  # a detector disagrees by a few px
    assert pick_face([neighbour, shifted], cw, ch, 0.25) == 1


def test_a_face_at_the_photos_edge_is_still_found() -> None:
    # The crop was cut short on the left: the face touches the crop's left side.
    w, h = 200, 240
    crop_w, crop_h = int(w * 1.25), int(h * 1.5)
    assert pick_face([(0, h * 0.25, w, h * 1.25)], crop_w, crop_h, 0.25) == 0


def test_no_face_where_the_face_was_is_none() -> None:
    cw, ch, _ = _crop_box((100, 100, 300, 340))
    assert pick_face([], cw, ch, 0.25) is None
    assert pick_face([(0, 0, 40, 40)], cw, ch, 0.25) is None


def test_report_counts_faces_and_carries_the_switch() -> None:
    r = ReembedReport(options={"model": "sface_flip"})
    for status, reason in (("reembedded", ""), ("reembedded", ""), ("skipped", "gone_or_staged"),
                           ("rejected", "no_face"), ("rejected", "crop_missing"), ("failed", "OSError")):
        r.add({"uri": "7", "subject": "s", "status": status, "reason": reason})
    r.switch.update(switched=False, missing=3, from_model="sface", to_model="sface_flip")
    s = r.summary()
    assert (s["total"], s["reembedded"], s["skipped"], s["rejected"], s["failed"]) == (6, 2, 1, 2, 1)
    assert s["rejected_by_reason"] == {"crop_missing": 1, "no_face": 1}
    assert s["switched"] is False and s["missing"] == 3 and "flagged_spoof" not in s
    assert [i["reason"] for i in r.to_json()["images"]] == ["no_face", "crop_missing", "OSError"]
    assert "faces/s" in r.progress_line()
    with pytest.raises(ValueError):
        r.add({"uri": "8", "subject": "s", "status": "enrolled"})  # the enrol job's outcome
    with pytest.raises(ValueError):
        r.add({"uri": "8", "subject": "s", "status": "rejected", "reason": "spoof"})


def test_arguments() -> None:
    from serve_app.jobs.reembed import parse_args

    base = ["--collection", "c", "--database-url", "postgresql://x/y", "--object-store-url", "file:///tmp/o"]
    assert parse_args(base + ["--model", "sface_flip"]).model == "sface_flip"
    assert parse_args(base + ["--abort"]).abort
    for bad in ([], ["--model", "arcface"], ["--model", "sface", "--batch-size", "0"]):
        with pytest.raises(SystemExit):
            parse_args(base + bad)
