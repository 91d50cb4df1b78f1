"""Reading images and fields from a request: multipart, base64 JSON or raw bytes.

Clients send images the way their stack makes easy: a multipart upload
(curl -F image=@a.jpg), a JSON body with base64 strings (optionally as
data: URLs), or the raw bytes with an image/* content type.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from models.errors import ImageTooLarge, InvalidRequest, UnsupportedImageType


@dataclass
class ParsedRequest:
    images: dict[str, bytes] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)

    def image(self, *names: str) -> bytes:
        for name in names:
            if name in self.images:
                return self.images[name]
        raise InvalidRequest(f"missing image field {names[0]!r}", expected=list(names))

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)


async def parse_request(request: Request, *, max_bytes: int) -> ParsedRequest:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes * 2 + 65536:
        raise ImageTooLarge(f"request body of {declared} bytes is over the limit", limit=max_bytes)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    out = ParsedRequest(fields=dict(request.query_params))
    if ctype == "multipart/form-data":
        form = await request.form(max_part_size=max_bytes + 1)
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                data = await value.read()
                _check_size(key, data, max_bytes)
                out.images[key] = data
            else:
                out.fields.setdefault(key, value)
        return out
    if ctype == "application/json":
        body = await request.body()
        try:
            payload = json.loads(body or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidRequest("body is not valid JSON") from None
        if not isinstance(payload, dict):
            raise InvalidRequest("JSON body must be an object")
        for key, value in payload.items():
            if key.startswith("image") and isinstance(value, str):
                out.images[key] = _b64(key, value, max_bytes)
            else:
                out.fields.setdefault(key, value)
        return out
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        data = await request.body()
        _check_size("image", data, max_bytes)
        out.images["image"] = data
        return out
    if not ctype:
        return out  # no body: callers needing an image report the missing field
    raise UnsupportedImageType(
        f"content type {ctype!r} is not accepted; send multipart/form-data, application/json "
        "with base64 images, or raw image/* bytes"
    )


def _check_size(name: str, data: bytes, max_bytes: int) -> None:
    if len(data) > max_bytes:
        raise ImageTooLarge(f"{name} is {len(data)} bytes; the limit is {max_bytes}", limit=max_bytes)


def _b64(name: str, value: str, max_bytes: int) -> bytes:
    if value.startswith("data:"):
        value = value.split(",", 1)[-1]
    if len(value) > (max_bytes * 4) // 3 + 8:
        raise ImageTooLarge(f"{name} is over the {max_bytes}-byte limit", limit=max_bytes)
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
