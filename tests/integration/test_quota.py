"""Per-client request quotas, counted in the real Redis at 127.0.0.1:6379."""
from __future__ import annotations

import time
import uuid

import httpx

from serve_app.quota import RequestQuota
from tests.integration.conftest import REDIS_URL, LiveApp


async def test_fixed_window_per_client() -> None:
    quota = RequestQuota(REDIS_URL, prefix=f"faceserve-test:{uuid.uuid4().hex[:8]}")
    now = 1_800_000_010.0  # 10 s into a minute
    try:
        seen = [await quota.check("ip:1.2.3.4", 3, now) for _ in range(4)]
        assert [d.allowed for d in seen] == [True, True, True, False]
        assert [d.remaining for d in seen] == [2, 1, 0, 0]
        assert seen[-1].retry_after_s == 50
        assert (await quota.check("ip:5.6.7.8", 3, now)).allowed  # clients are counted apart
        assert (await quota.check("ip:1.2.3.4", 3, now + 60)).allowed  # the next minute starts afresh
    finally:
        await quota.close()


async def test_redis_outage_admits_requests() -> None:
    quota = RequestQuota("redis://127.0.0.1:1/0")  # nothing listens there
    try:
        decision = await quota.check("ip:1.2.3.4", 1)
        assert decision.allowed and decision.remaining == -1
    finally:
        await quota.close()


def _until(client: httpx.Client, status: int, limit_s: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + limit_s
    while True:
        r = client.get("/v1/collections")
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def test_over_quota_is_429_with_retry_after(live_app: LiveApp, client: httpx.Client) -> None:
    live_app.reconfigure({"Ingress": {"user_config": {"requests_per_minute": 5}}})
    try:
        r = _until(client, 429)
        assert r.status_code == 429, r.text
        body = r.json()["error"]
        assert body["code"] == "rate_limited" and body["details"]["limit"] == 5
        assert 1 <= int(r.headers["retry-after"]) <= 60
    finally:
        live_app.reconfigure({"Ingress": {"user_config": {"requests_per_minute": 0}}})
    assert _until(client, 200).status_code == 200
