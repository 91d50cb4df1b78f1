"""Bulk enrolment sources: folder listing (local and any fsspec URL) and manifests."""
from __future__ import annotations

import json
from pathlib import Path

import fsspec
import pytest

from serve_app.jobs.sources import Item, SourceError, is_manifest, list_items, segments


def _tree(root: Path) -> None:
    for rel in ("bob/b2.jpg", "bob/b1.jpg", "alice/a1.png", "alice/.hidden.jpg", ".trash/x.jpg", "carol/deep/d.jpg"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (root / "loose.jpg").write_bytes(b"x")  # not under a subject: ignored


def test_folder_lists_subject_files_in_order_skipping_hidden_and_deeper(tmp_path: Path) -> None:
    _tree(tmp_path)
    items = list(list_items(str(tmp_path)))
    assert [(i.subject, Path(i.uri).name) for i in items] == [
        ("alice", "a1.png"), ("bob", "b1.jpg"), ("bob", "b2.jpg")]
    assert all(Path(i.uri).is_file() for i in items)


def test_folder_through_fsspec_url_keeps_the_protocol() -> None:
    # memory:// goes through the same fsspec calls as an s3:// prefix.
    fs = fsspec.filesystem("memory")
    for rel in ("bulk-src/p1/x.jpg", "bulk-src/p2/y.jpg"):
        fs.pipe_file(f"/{rel}", b"img")
    try:
        items = list(list_items("memory://bulk-src"))
        assert [i.subject for i in items] == ["p1", "p2"]
        assert all(i.uri.startswith("memory://") for i in items)
        from serve_app.jobs.sources import read_uri

        assert read_uri(items[0].uri) == b"img"
    finally:
        fs.rm("/bulk-src", recursive=True)


def test_missing_source_is_a_source_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError):
        list(list_items(str(tmp_path / "nope")))
    with pytest.raises(SourceError):
        list(list_items(str(tmp_path / "nope.csv")))


def test_csv_manifest_names_ids_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text(
        "Subject,Image,external_id\n"
        "alice,imgs/a.jpg,\n"
        ",/abs/b.jpg,EMP-7\n"
        "carol,s3://bucket/c.jpg,C-1\n")
    items = list(list_items(str(tmp_path / "m.csv")))
    assert items == [
        Item(uri=str(tmp_path / "imgs/a.jpg"), subject="alice"),
        Item(uri="/abs/b.jpg", subject="EMP-7", external_id="EMP-7"),
        Item(uri="s3://bucket/c.jpg", subject="carol", external_id="C-1"),
    ]


def test_jsonl_manifest_with_subject_id_and_blank_lines(tmp_path: Path) -> None:
    sid = "6f1c0c56-0d35-4a38-9d7a-1f8e1d1d2b11"
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"subject_id": sid, "path": "x.jpg"}) + "\n\n" + json.dumps({"name": "dan", "uri": "y.png"}) + "\n")
    items = list(list_items(str(tmp_path / "m.jsonl")))
    assert items[0].subject_id == sid and items[0].subject == "" and items[0].uri == str(tmp_path / "x.jpg")
    assert items[1] == Item(uri=str(tmp_path / "y.png"), subject="dan")


@pytest.mark.parametrize("body, what", [
    ("subject,image\nalice,\n", "no image"),
    ("subject,image\n,a.jpg\n", "no subject"),
])
def test_csv_manifest_rows_without_image_or_subject_name_the_line(tmp_path: Path, body: str, what: str) -> None:
    (tmp_path / "m.csv").write_text(body)
    with pytest.raises(SourceError, match=f"line 2: {what}"):
        list(list_items(str(tmp_path / "m.csv")))


def test_jsonl_manifest_bad_line(tmp_path: Path) -> None:
    (tmp_path / "m.ndjson").write_text('{"subject": "a", "image": "a.jpg"}\n[1, 2]\n')
    it = list_items(str(tmp_path / "m.ndjson"))
    assert next(it).subject == "a"
    with pytest.raises(SourceError, match="line 2"):
        next(it)


def test_is_manifest() -> None:
    assert is_manifest("s3://b/list.CSV") and is_manifest("/x/a.jsonl") and not is_manifest("/x/people")


def test_segments_are_bounded_and_lazy() -> None:
    pulled = []

    def gen():  # noqa: ANN202
        for i in range(7):
            pulled.append(i)
            yield Item(uri=str(i), subject="s")

    segs = segments(gen(), 3)
    first = next(segs)
    assert [i.uri for i in first] == ["0", "1", "2"] and len(pulled) == 3  # nothing listed ahead
    assert [len(s) for s in segs] == [3, 1]
    with pytest.raises(ValueError):
        list(segments(iter([]), 0))
