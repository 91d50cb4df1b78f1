"""Where a bulk enrolment's images come from, listed lazily.

A source is one of:
  - a folder `<subject>/<images>` (local path, file://, or any fsspec URL
    such as an s3:// prefix laid out the same way);
  - a manifest file (.csv, .jsonl/.ndjson) with one row per image: the image
    (`image`, `path`, `uri` or `url`; relative paths are taken from the
    manifest's folder) and the subject, by name (`subject`, `subject_name`
    or `name`), by external id (`external_id`: kept in the subject's
    metadata, and its name when no name is given) or by the id of an
    existing subject (`subject_id`).

Listing yields one item at a time (a folder is listed one subject at a
time), so the driver never holds more than a segment of the source.
"""
from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import islice

from fsspec.core import url_to_fs

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
_IMAGE_KEYS = ("image", "path", "uri", "url")
_NAME_KEYS = ("subject", "subject_name", "name")


@dataclass(frozen=True)
class Item:
    uri: str  # fsspec URL or local path of the image
    subject: str  # the subject's name ("" when only subject_id is given)
    external_id: str = ""
    subject_id: str = ""  # an existing subject's UUID

    def to_row(self) -> dict[str, str]:
        return asdict(self)


class SourceError(ValueError):
    """The source itself cannot be listed or parsed (not one image: the job stops)."""


def is_manifest(source: str) -> bool:
    return source.lower().endswith(MANIFEST_SUFFIXES)


def list_items(source: str) -> Iterator[Item]:
    return iter_manifest(source) if is_manifest(source) else iter_folder(source)


def _protocol(fs: object) -> str:
    proto = getattr(fs, "protocol", "file")
    return proto if isinstance(proto, str) else proto[0]


def _url(fs: object, path: str) -> str:
    proto = _protocol(fs)
    return path if proto in ("file", "local") else f"{proto}://{path}"


def iter_folder(source: str) -> Iterator[Item]:
    """`<subject>/<file>` under the folder, subjects and files in name order;
    hidden entries and anything deeper are ignored."""
    fs, root = url_to_fs(source)
    root = root.rstrip("/") or "/"
    if not fs.isdir(root):
        raise SourceError(f"source {source!r} is neither a folder nor a manifest ({', '.join(MANIFEST_SUFFIXES)})")
    subjects = sorted(e["name"] for e in fs.ls(root, detail=True) if e["type"] == "directory")
    for sub in subjects:
        name = posixpath.basename(sub.rstrip("/"))
        if name.startswith("."):
            continue
        files = sorted(e["name"] for e in fs.ls(sub, detail=True) if e["type"] == "file")
        for path in files:
            if posixpath.basename(path).startswith("."):
                continue
            yield Item(uri=_url(fs, path), subject=name)


def iter_manifest(source: str) -> Iterator[Item]:
    fs, path = url_to_fs(source)
    if not fs.isfile(path):
        raise SourceError(f"manifest {source!r} not found")
    base = posixpath.dirname(path)
    with fs.open(path, "rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        rows = _csv_rows(text) if path.lower().endswith(".csv") else _jsonl_rows(text)
        for line, row in rows:
            yield manifest_item(row, line, lambda p: _resolve(fs, base, p))


def _csv_rows(text: io.TextIOBase) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(text)
    if not reader.fieldnames:
        return
    for row in reader:
        yield reader.line_num, {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}


def _jsonl_rows(text: io.TextIOBase) -> Iterator[tuple[int, dict[str, str]]]:
    for n, line in enumerate(text, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"manifest line {n}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise SourceError(f"manifest line {n}: expected a JSON object")
        yield n, {str(k).strip().lower(): "" if v is None else str(v).strip() for k, v in obj.items()}


def manifest_item(row: dict[str, str], line: int, resolve: "callable[[str], str]") -> Item:  # type: ignore[valid-type]
    image = next((row[k] for k in _IMAGE_KEYS if row.get(k)), "")
    if not image:
        raise SourceError(f"manifest line {line}: no image ({' / '.join(_IMAGE_KEYS)})")
    name = next((row[k] for k in _NAME_KEYS if row.get(k)), "")
    external_id = row.get("external_id", "")
    subject_id = row.get("subject_id", "")
    if not (name or external_id or subject_id):
        raise SourceError(f"manifest line {line}: no subject ({' / '.join(_NAME_KEYS)}, external_id or subject_id)")
    return Item(uri=resolve(image), subject=name or external_id, external_id=external_id, subject_id=subject_id)


def _resolve(fs: object, base: str, image: str) -> str:
    if "://" in image or image.startswith("/"):
        return image
    return _url(fs, posixpath.join(base, image))


def segments(items: Iterator[Item], size: int) -> Iterator[list[Item]]:
    """The listing in bounded pieces: the driver holds at most ``size`` items."""
    if size < 1:
        raise ValueError("segment size must be >= 1")
    while chunk := list(islice(items, size)):
        yield chunk


def read_uri(uri: str) -> bytes:
    """The bytes of one image, from any fsspec URL or local path."""
    fs, path = url_to_fs(uri)
    return fs.cat_file(path)
