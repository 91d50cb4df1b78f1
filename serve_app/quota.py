"""Per-client request quotas in Redis: fixed one-minute windows.

Every ingress replica counts in the same Redis, so the limit holds for the
service as a whole, not per replica. A Redis outage must not take the API
down with it: the quota then admits requests (fail open) and says so in
the log, at most twice a minute; after a failure it does not ask Redis
again for COOLDOWN_S, so a hung Redis costs one timeout a second, not one
per request.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger("ray.serve")

WINDOW_S = 60
# After a failed check the quota admits without asking Redis for this long:
# a hung Redis (accepting connections, never answering) would otherwise cost
# every request the full socket timeout.
COOLDOWN_S = 1.0


@dataclass(frozen=True)
class QuotaDecision:
    allowed: bool
    limit: int
    remaining: int  # -1 when the count could not be read (fail open)
    retry_after_s: int


class RequestQuota:
    def __init__(self, redis_url: str, prefix: str = "faceserve:quota") -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # Short timeouts and no retries: the quota sits on every request's path,
        # and a stopped or unreachable Redis must cost at most one timeout per
        # check, never a hang.
        self._redis = aioredis.from_url(redis_url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                        retry=Retry(NoBackoff(), 0), retry_on_timeout=False)
        self._prefix = prefix
        self._last_warning = 0.0
        self._down_until = 0.0

    async def check(self, client: str, limit: int, now: float | None = None) -> QuotaDecision:
        now = time.time() if now is None else now
        window = int(now // WINDOW_S)
        retry_after = max(1, WINDOW_S - int(now % WINDOW_S))
        key = f"{self._prefix}:{client}:{window}"
        if time.monotonic() < self._down_until:  # failed just now: admit without asking
            return QuotaDecision(True, limit, -1, 0)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, 2 * WINDOW_S)
                count, _ = await pipe.execute()
        except Exception:  # redis errors, timeouts, refused connections alike
            self._down_until = time.monotonic() + COOLDOWN_S
            if now - self._last_warning > 30:
                self._last_warning = now
                log.warning("quota: Redis unavailable, admitting requests unmetered", exc_info=True)
            return QuotaDecision(True, limit, -1, 0)
        count = int(count)
        return QuotaDecision(count <= limit, limit, max(0, limit - count), retry_after)

    async def close(self) -> None:
        await self._redis.aclose()
