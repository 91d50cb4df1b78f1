"""The web console: static files under /console/, served by the ingress app.

No build step and nothing from a CDN: the page, its stylesheet and its ES
modules lie in static/ beside this file and ship as package data. The page
talks only to this service's own API with the key the user typed in.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.responses import Response
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Only this origin's scripts, styles and API; images and the webcam frame are
# local blob:/data: URLs. A key in sessionStorage is worth an XSS barrier.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' blob: data:; media-src 'self' blob:; form-action 'self'; "
        "base-uri 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",  # revalidate (ETag): an upgraded service serves its own console
}


class ConsoleFiles(StaticFiles):
    route: Any = None  # the Mount: access logs and metrics label every file "/console"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.route is not None:
            scope["route"] = self.route
        await super().__call__(scope, receive, send)

    async def get_response(self, path: str, scope: Any) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount(app: FastAPI, prefix: str = "/console") -> None:
    files = ConsoleFiles(directory=STATIC_DIR, html=True)
    app.mount(prefix, files, name="console")
    files.route = app.routes[-1]
