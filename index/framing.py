"""The container every faceserve snapshot blob uses: magic, version, JSON header, body.

    magic | u16 version | u32 header length | header (JSON object) | body

Each snapshot kind has its own magic; the caller validates the header's
fields. Anything that is not whole and ours raises IndexCorrupt.
"""
from __future__ import annotations

import json
import struct
from typing import Any


class IndexCorrupt(ValueError):
    """A snapshot blob that is truncated, tampered with, or not ours."""


_PREFIX = struct.Struct("<HI")


def pack(magic: bytes, version: int, header: dict[str, Any], *body: bytes) -> bytes:
    hbytes = json.dumps(header, sort_keys=True).encode("utf-8")
    return b"".join([magic, _PREFIX.pack(version, len(hbytes)), hbytes, *body])


def unpack(
    data: bytes | bytearray | memoryview,
    *,
    magic: bytes,
    version: int,
    what: str,
    max_header: int = 64 * 1024,
) -> tuple[dict[str, Any], memoryview]:
    """(header, body) of a blob written by pack() with the same magic and version."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise IndexCorrupt(f"{what} must be bytes, got {type(data).__name__}")
    view = memoryview(data).cast("B")
    start = len(magic) + _PREFIX.size
    if len(view) < start or bytes(view[: len(magic)]) != magic:
        raise IndexCorrupt(f"not a faceserve {what} (bad magic)")
    found, hlen = _PREFIX.unpack(view[len(magic) : start])
    if found != version:
        raise IndexCorrupt(f"unsupported {what} format {found} (this build reads {version})")
    if hlen > max_header or len(view) < start + hlen:
        raise IndexCorrupt(f"{what} header is truncated")
    try:
        header = json.loads(bytes(view[start : start + hlen]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexCorrupt(f"{what} header is unreadable: {exc}") from None
    if not isinstance(header, dict):
        raise IndexCorrupt(f"{what} header is not an object")
    return header, view[start + hlen :]
