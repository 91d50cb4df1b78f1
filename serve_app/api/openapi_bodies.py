"""OpenAPI request bodies of the image routes, which read their own bodies.

They point at the pydantic models in api/schemas.py (added to the document's
components by api/app.py), so /openapi.json lists every body shape.
"""
from __future__ import annotations

from typing import Any


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def body(form: str, json_model: str, *, raw: bool) -> dict[str, Any]:
    content: dict[str, Any] = {
        "multipart/form-data": {"schema": _ref(form)},
        "application/json": {"schema": _ref(json_model)},
    }
    if raw:
        content["image/*"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "content": content}}


IMAGE_BODY = body("ImageForm", "ImageJSON", raw=True)
VERIFY_BODY = body("VerifyForm", "VerifyJSON", raw=False)
