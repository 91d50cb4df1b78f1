"""Admission control at the edge: shed excess image work before reading it.

Serve's queues bound what waits in each deployment, but a request refused
deep in the graph has already been received, parsed and routed; under 12x
overload that work alone made the refusals slow. The gate counts the image
requests this ingress replica has in flight and answers the excess a 503
with Retry-After at once, before the body is read. Admitted requests then
see a short graph, so their latency stays near the unloaded figure.
"""
from __future__ import annotations

import json
from typing import Awaitable, Callable

from serve_app.api.body_guard import Message, Receive, Scope, Send, reads_own_body


class AdmissionGate:
    def __init__(self, app: Callable[..., Awaitable[None]], limit: Callable[[], int],
                 retry_after_s: Callable[[], int], on_shed: Callable[[], None] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.on_shed = on_shed
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not reads_own_body(scope):
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        if limit > 0 and self.in_flight >= limit:
            if self.on_shed is not None:
                self.on_shed()
            await _shed(send, self.retry_after_s(), limit)
            return
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1

        async def send_then_release(message: Message) -> None:
            # Freed as the last byte goes out, not after the app returns: a
            # client that sends its next request at once must find room.
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                release()
            await send(message)

        try:
            await self.app(scope, receive, send_then_release)
        finally:
            release()


async def _shed(send: Send, retry_after_s: int, limit: int) -> None:
    body = json.dumps({"error": {
        "code": "unavailable",
        "message": "the service is at capacity; retry shortly",
        "details": {"reason": "admission", "in_flight_limit": limit},
    }}).encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(retry_after_s).encode()),
    ]
    start: Message = {"type": "http.response.start", "status": 503, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body})


