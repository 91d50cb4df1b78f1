"""The proxy callback: Serve accepts it, it reads its limit, and it sheds."""
from __future__ import annotations

import asyncio
import json

import pytest
from ray.serve._private.http_util import validate_http_proxy_callback_return

from serve_app import cluster
from serve_app.api import proxy_admission


def test_serve_accepts_the_callback_and_ray_env_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", raising=False)
    monkeypatch.delenv(proxy_admission.ENV_LIMIT, raising=False)
    assert len(validate_http_proxy_callback_return(proxy_admission.middlewares())) == 1
    module, _, name = cluster.ray_env()["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"].partition(":")
    assert module == proxy_admission.__name__ and name == "middlewares"


@pytest.mark.parametrize(("raw", "limit"), [("", 4), ("12", 12), ("0", 0), ("-3", 0), ("many", 4)])
def test_limit_from_env(monkeypatch: pytest.MonkeyPatch, raw: str, limit: int) -> None:
    monkeypatch.setenv(proxy_admission.ENV_LIMIT, raw)
    assert proxy_admission.proxy_limit() == limit
    assert len(proxy_admission.middlewares()) == (1 if limit else 0)


def test_excess_image_request_is_shed_before_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(proxy_admission.ENV_LIMIT, "1")
    (mw,) = proxy_admission.middlewares()
    release = asyncio.Event()
    reached: list[str] = []

    async def app(scope, receive, send) -> None:  # stands in for the proxy's routing to Serve
        reached.append(scope["path"])
        if scope["path"] == "/v1/identify":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    gate = mw.cls(app, *mw.args, **mw.kwargs)

    async def call(method: str, path: str) -> list[dict]:
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        await gate({"type": "http", "method": method, "path": path, "headers": []}, receive, send)
        return sent

    async def scenario() -> tuple[list[dict], list[dict], list[dict]]:
        first = asyncio.create_task(call("POST", "/v1/identify"))
        await asyncio.sleep(0)
        shed = await call("POST", "/v1/identify")
        other = await call("GET", "/v1/collections")  # not image work: never counted
        release.set()
        return await first, shed, other

    first, shed, other = asyncio.run(scenario())
    assert first[0]["status"] == 200 and other[0]["status"] == 200
    assert shed[0]["status"] == 503
    assert (b"retry-after", b"1") in shed[0]["headers"]
    assert json.loads(shed[1]["body"])["error"]["code"] == "unavailable"
    assert reached == ["/v1/identify", "/v1/collections"]
