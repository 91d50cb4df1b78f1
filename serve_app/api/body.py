"""Reading images and fields from a request: multipart, base64 JSON or raw bytes.

Clients send images the way their stack makes easy: a multipart upload
(curl -F image=@a.jpg), a JSON body with base64 strings (optionally as
data: URLs), or the raw bytes with an image/* content type.

The body is read as a stream with a hard byte cap whatever the framing
(content-length, chunked): nothing larger than the cap is ever held. Only
the header of an image is looked at here (its format, from magic bytes);
decoding is the detector's job.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from models.images import SUPPORTED_FORMATS, sniff_format
from serve_app.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

# Multipart: at most this many files and fields; image routes take two files at most.
MAX_FILES = 2
MAX_FIELDS = 16


@dataclass
class ParsedRequest:
    images: dict[str, bytes] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)

    def image(self, *names: str) -> bytes:
        for name in names:
            if name in self.images:
                data = self.images[name]
                check_image_header(name, data)
                return data
        raise InvalidRequest(f"missing image field {names[0]!r}", expected=list(names))

    def has_image(self, name: str) -> bool:
        return name in self.images

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


async def read_capped(request: Request, cap: int) -> bytes:
    """The whole body, refusing (413) as soon as it passes ``cap`` bytes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {cap}", limit=cap)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise PayloadTooLarge(f"request body is over the limit of {cap} bytes", limit=cap)
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette re-reads a cached body (form parsing)
    return body


async def parse_request(request: Request, *, max_bytes: int) -> ParsedRequest:
    # Room for two images (verify) plus base64/multipart framing.
    cap = max_bytes * 2 * 4 // 3 + 65536
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    out = ParsedRequest(fields=dict(request.query_params))
    if ctype == "multipart/form-data":
        await read_capped(request, cap)
        try:
            form = await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS, max_part_size=max_bytes + 1)
        except Exception as exc:  # Starlette's MultiPartException and friends: malformed or too many parts
            raise InvalidRequest(f"multipart body could not be parsed: {exc}") from None
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                _check_size(key, data, max_bytes)
                out.images[key] = data
            else:
                out.fields.setdefault(key, value)
        return out
    if ctype == "application/json" or ctype.endswith("+json"):
        payload = await read_json_object(request, cap)
        for key, value in payload.items():
            if key.startswith("image") and isinstance(value, str):
                out.images[key] = _b64(key, value, max_bytes)
            else:
                out.fields.setdefault(key, value)
        return out
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        data = await read_capped(request, max_bytes)
        out.images["image"] = data
        return out
    if not ctype:
        if await read_capped(request, cap):
            raise UnsupportedMediaType("a request body needs a content type")
        return out  # no body: callers needing an image report the missing field
    raise UnsupportedMediaType(
        f"content type {ctype!r} is not accepted; send multipart/form-data, application/json "
        "with base64 images, or raw image/* bytes"
    )


async def read_json_object(request: Request, cap: int) -> dict[str, Any]:
    """The body as a JSON object (an empty body is {}), read with a hard cap."""
    raw = await read_capped(request, cap)
    try:
        data = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise InvalidRequest("body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("JSON body must be an object")
    return data


def check_image_header(name: str, data: bytes) -> str:
    """The image's format from its first bytes, or 415: no decoding here."""
    if not data:
        raise InvalidRequest(f"{name} is empty", field=name)
    fmt = sniff_format(data)
    if fmt is None or fmt not in SUPPORTED_FORMATS:
        what = f"{fmt} images are not supported" if fmt else "not a recognised image"
        raise UnsupportedMediaType(
            f"{name}: {what}; send JPEG, PNG, WebP, BMP, TIFF, GIF or PGM/PPM",
            field=name, format=fmt,
        )
    return fmt


def _check_size(name: str, data: bytes, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise PayloadTooLarge(f"{name} is {len(data)} bytes; the limit is {max_bytes}", limit=max_bytes)


def _b64(name: str, value: str, max_bytes: int) -> bytes:
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    if len(value) > (max_bytes * 4) // 3 + 8:
        raise PayloadTooLarge(f"{name} is over the {max_bytes}-byte limit", limit=max_bytes)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{name} is not valid base64") from None


def as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise InvalidRequest(f"{name} must be true or false, got {value!r}")


def as_int(value: Any, name: str, *, default: int, lo: int, hi: int) -> int:
    if value is None or value == "":
        return default
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{name} must be an integer, got {value!r}") from None
    if not lo <= n <= hi:
        raise InvalidRequest(f"{name} must be between {lo} and {hi}, got {n}")
    return n
