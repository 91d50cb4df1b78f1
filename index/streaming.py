"""Authenticated, chunked byte streams for snapshots too big to hold twice.

A stream is a header followed by frames::

    magic | u16 version | u32 header length | header (JSON)
    frame* = u32 (length | FINAL bit) | data | sha256 chain digest (32 B) [| HMAC of it (32 B)]

``digest_0`` is the sha256 of everything up to the end of the header, and
``digest_i = sha256(digest_{i-1} | length field | data)``: every frame's tag
covers the header and every byte before it, so a reader checks each frame
*before* handing its bytes on (a parser never sees unverified input), and
order, splicing and truncation all break the chain. The last frame carries
the FINAL bit; a stream that ends without it, or goes on after it, is
refused. With a key (header ``"signed": true``) each frame also carries
HMAC-SHA256(key, digest_i): only holders of the key can make a stream a
keyed reader accepts. A reader without the key still checks the chain.

Memory: one frame (``frame_size`` bytes) on each side, whatever the total.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import struct
from typing import Any, BinaryIO

from .framing import IndexCorrupt

FRAME_SIZE = 1 << 20  # 1 MiB of payload per frame
_FINAL = 1 << 31
_LEN = struct.Struct("<I")
_PREFIX = struct.Struct("<HI")
_DIGEST = 32


class FrameWriter:
    """Write a header, then payload bytes in frames, to a binary file object."""

    def __init__(self, out: BinaryIO, magic: bytes, version: int, header: dict[str, Any],
                 key: bytes | None = None, frame_size: int = FRAME_SIZE) -> None:
        if not 0 < frame_size < _FINAL:
            raise ValueError("frame_size out of range")
        self._out = out
        self._key = key or None
        self._frame_size = frame_size
        header = {**header, "signed": self._key is not None}
        hbytes = json.dumps(header, sort_keys=True).encode("utf-8")
        head = magic + _PREFIX.pack(version, len(hbytes)) + hbytes
        self._digest = hashlib.sha256(head).digest()
        out.write(head)
        self._buf = bytearray()
        self.payload_len = 0
        self.total_len = len(head)
        self._closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise ValueError("stream already finished")
        view = memoryview(data).cast("B")
        self.payload_len += len(view)
        while len(view):
            room = self._frame_size - len(self._buf)
            self._buf += view[:room]
            view = view[room:]
            if len(self._buf) == self._frame_size:
                self._emit(final=False)

    def finish(self) -> None:
        """Write the final frame (possibly empty); the stream is then complete."""
        if not self._closed:
            self._emit(final=True)
            self._closed = True

    def _emit(self, final: bool) -> None:
        field = _LEN.pack(len(self._buf) | (_FINAL if final else 0))
        h = hashlib.sha256(self._digest)
        h.update(field)
        h.update(self._buf)
        self._digest = h.digest()
        tag = self._digest
        if self._key is not None:
            tag += hmac.new(self._key, self._digest, hashlib.sha256).digest()
        self._out.write(field)
        self._out.write(self._buf)
        self._out.write(tag)
        self.total_len += len(field) + len(self._buf) + len(tag)
        self._buf = bytearray()


def read_prefix(src: BinaryIO, magic: bytes, what: str) -> tuple[int, bytes]:
    """(version, the bytes read): lets a caller pick the format before reading on."""
    head = _read_exact(src, len(magic) + _PREFIX.size)
    if len(head) < len(magic) + _PREFIX.size or head[: len(magic)] != magic:
        raise IndexCorrupt(f"not a faceserve {what} (bad magic)")
    version, _ = _PREFIX.unpack(head[len(magic) :])
    return version, head


class FrameReader:
    """Read back a FrameWriter stream, verifying each frame before its bytes are returned."""

    def __init__(self, src: BinaryIO, magic: bytes, version: int, what: str, key: bytes | None = None,
                 max_header: int = 64 * 1024, prefix: bytes | None = None) -> None:
        self._src = src
        self._what = what
        head = prefix if prefix is not None else _read_exact(src, len(magic) + _PREFIX.size)
        if len(head) < len(magic) + _PREFIX.size or head[: len(magic)] != magic:
            raise IndexCorrupt(f"not a faceserve {what} (bad magic)")
        found, hlen = _PREFIX.unpack(head[len(magic) :])
        if found != version:
            raise IndexCorrupt(f"unsupported {what} format {found} (this reader reads {version})")
        if hlen > max_header:
            raise IndexCorrupt(f"{what} header is too long")
        hbytes = _read_exact(src, hlen)
        if len(hbytes) != hlen:
            raise IndexCorrupt(f"{what} header is truncated")
        try:
            header = json.loads(hbytes.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IndexCorrupt(f"{what} header is unreadable: {exc}") from None
        if not isinstance(header, dict) or not isinstance(header.get("signed"), bool):
            raise IndexCorrupt(f"{what} header is not a valid object")
        if key and not header["signed"]:
            raise IndexCorrupt(f"{what} is not signed with this deployment's snapshot key")
        self.header: dict[str, Any] = header
        self._key = key or None
        self._tag_len = _DIGEST * (2 if header["signed"] else 1)
        self._digest = hashlib.sha256(head + hbytes).digest()
        self._buf = memoryview(b"")
        self._final = False
        self.consumed = 0  # payload bytes handed out

    def _next_frame(self) -> None:
        field = _read_exact(self._src, _LEN.size)
        if len(field) != _LEN.size:
            raise IndexCorrupt(f"{self._what} is truncated (no final frame)")
        (raw,) = _LEN.unpack(field)
        n = raw & ~_FINAL
        data = _read_exact(self._src, n)
        tag = _read_exact(self._src, self._tag_len)
        if len(data) != n or len(tag) != self._tag_len:
            raise IndexCorrupt(f"{self._what} is truncated (in a frame)")
        h = hashlib.sha256(self._digest)
        h.update(field)
        h.update(data)
        digest = h.digest()
        if not hmac.compare_digest(digest, tag[:_DIGEST]):
            raise IndexCorrupt(f"{self._what} checksum mismatch")
        if self._key is not None and not hmac.compare_digest(
            tag[_DIGEST:], hmac.new(self._key, digest, hashlib.sha256).digest()
        ):
            raise IndexCorrupt(f"{self._what} is not signed with this deployment's snapshot key")
        self._digest = digest
        self._buf = memoryview(data)
        self._final = bool(raw & _FINAL)

    def read(self, n: int) -> bytes:
        """Up to n verified payload bytes (fewer only at the end of the payload)."""
        parts: list[bytes] = []
        want = n
        while want > 0:
            if not len(self._buf):
                if self._final:
                    break
                self._next_frame()
                continue
            take = self._buf[:want]
            parts.append(bytes(take))
            self._buf = self._buf[len(take) :]
            want -= len(take)
        out = b"".join(parts)
        self.consumed += len(out)
        return out

    def read_exact(self, n: int, what: str) -> bytes:
        data = self.read(n)
        if len(data) != n:
            raise IndexCorrupt(f"{self._what} ends inside its {what}")
        return data

    def finish(self) -> None:
        """Check that the payload ends here and that nothing follows the final frame."""
        while not len(self._buf) and not self._final:
            self._next_frame()
        if len(self._buf):
            raise IndexCorrupt(f"{self._what} has {len(self._buf)}+ unexpected bytes after its content")
        if self._src.read(1):
            raise IndexCorrupt(f"{self._what} has bytes after its final frame")


def _read_exact(src: BinaryIO, n: int) -> bytes:
    parts = []
    while n > 0:
        chunk = src.read(n)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def payload_of(data: bytes, magic: bytes, version: int) -> bytes:
    """The payload of a stream in ``data`` with its frames joined, checking
    nothing: for scans that must not miss a byte string split across two
    frames (the erasure proof that no erased vector remains in a snapshot).
    A truncated stream gives what it has; anything that is not a stream of
    this version comes back unchanged."""
    start = len(magic) + _PREFIX.size
    if len(data) < start or data[: len(magic)] != magic:
        return data
    found, hlen = _PREFIX.unpack(data[len(magic) : start])
    try:
        signed = bool(json.loads(data[start : start + hlen].decode("utf-8")).get("signed"))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return data
    if found != version:
        return data
    tag = _DIGEST * (2 if signed else 1)
    pos, parts = start + hlen, []
    while pos + _LEN.size <= len(data):
        (raw,) = _LEN.unpack(data[pos : pos + _LEN.size])
        n = raw & ~_FINAL
        parts.append(data[pos + _LEN.size : pos + _LEN.size + n])
        pos += _LEN.size + n + tag
        if raw & _FINAL:
            break
    return b"".join(parts)
