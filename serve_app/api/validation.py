"""Checks on what callers send that pydantic's types alone do not express."""
from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

METADATA_MAX_BYTES = 16 * 1024
METADATA_MAX_DEPTH = 8
COLLECTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def clean_text(value: str, what: str) -> str:
    """No NUL, no control characters, no lone surrogates: Postgres refuses
    NUL, and the others only ever arrive by accident or in an attack."""
    for ch in value:
        if ch == "\x00":
            raise ValueError(f"{what} must not contain NUL characters")
        if 0xD800 <= ord(ch) <= 0xDFFF:
            raise ValueError(f"{what} must not contain unpaired surrogates")
        if unicodedata.category(ch) == "Cc" and ch not in "\t":
            raise ValueError(f"{what} must not contain control characters")
    if not value.strip():
        raise ValueError(f"{what} must not be blank")
    return value


def collection_name(value: str) -> str:
    if not COLLECTION_NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError("collection names are 1-128 letters, digits, '_', '.' or '-', starting with a "
                         "letter or digit")
    return value


def _depth(value: Any, level: int = 1) -> int:
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level)
    return level - 1


def metadata(value: dict[str, Any]) -> dict[str, Any]:
    if _depth(value) > METADATA_MAX_DEPTH:
        raise ValueError(f"metadata may nest at most {METADATA_MAX_DEPTH} levels")
    size = len(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if size > METADATA_MAX_BYTES:
        raise ValueError(f"metadata is {size} bytes as JSON; the limit is {METADATA_MAX_BYTES}")
    _check_strings(value)
    return value


def _check_strings(value: Any) -> None:
    if isinstance(value, str):
        if "\x00" in value or any(0xD800 <= ord(c) <= 0xDFFF for c in value):
            raise ValueError("metadata strings must not contain NUL or unpaired surrogates")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k)
            _check_strings(v)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v)


def json_depth_ok(body: bytes, limit: int = 64) -> bool:
    """Cheap scan of raw JSON for nesting deeper than ``limit`` (brackets
    outside strings), before json.loads can recurse into it."""
    depth, in_str, esc = 0, False, False
    for b in body:
        if in_str:
            if esc:
                esc = False
            elif b == 0x5C:
                esc = True
            elif b == 0x22:
                in_str = False
        elif b == 0x22:
            in_str = True
        elif b in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return False
        elif b in (0x5D, 0x7D):
            depth -= 1
    return True
