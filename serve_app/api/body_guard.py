"""A hard cap on request bodies the routes do not read themselves.

Image routes stream their bodies through api/body.py with their own cap.
Every other body (JSON for the gallery routes) is small by nature: this ASGI
middleware buffers at most ``cap`` bytes, answers 413 beyond that whatever
the framing (content-length or chunked), refuses JSON nested deeper than
any real request needs, then replays the buffered body to the app.
"""
from __future__ import annotations

import json
import re
from typing import Any, Awaitable, Callable

from serve_app.api.validation import json_depth_ok

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_CAP = 64 * 1024
MAX_JSON_DEPTH = 32
_IMAGE_ROUTES = re.compile(r"^/v1/(detect|identify|verify|liveness|subjects/[^/]+/(faces|not-this-person))/?$"
                           # the compatibility layers: Rekognition's POST / and CompreFace's image routes
                           r"|^/$|^/api/v1/(recognition/(recognize|faces|faces/[^/]+/verify)"
                           r"|detection/detect|verification/verify)/?$")


def reads_own_body(scope: Scope) -> bool:
    return scope.get("method") == "POST" and bool(_IMAGE_ROUTES.match(scope.get("path", "")))


class BodyGuard:
    def __init__(self, app: Callable[..., Awaitable[None]], cap: int = DEFAULT_CAP) -> None:
        self.app = app
        self.cap = cap

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or reads_own_body(scope):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.cap:
            await _refuse(send, 413, "payload_too_large", f"request body over the limit of {self.cap} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.cap:
                await _refuse(send, 413, "payload_too_large", f"request body over the limit of {self.cap} bytes")
                return
            chunks.append(body)
            more = msg.get("more_body", False)
        data = b"".join(chunks)
        if "json" in headers.get("content-type", "") and not json_depth_ok(data, MAX_JSON_DEPTH):
            await _refuse(send, 400, "invalid_request", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
