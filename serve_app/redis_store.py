"""The ingress's Redis for caches and idempotency records: short deadlines, no retries, a breaker.

Redis is an accelerator here, never a dependency of an answer: every caller
catches RedisUnavailable and carries on without it (a cache miss, an
idempotency key not enforced). So a call must fail fast rather than wait:
- socket and connect timeouts of `timeout_s` (0.25 s), and redis-py's own
  retries switched off (by default it retries a command that failed on a
  connection error up to three times, with backoff);
- an outer asyncio deadline, in case a call hangs anyway;
- after a failure the store answers RedisUnavailable at once for
  `cooldown_s` (1 s) before it tries Redis again, so an outage costs one
  timeout per second per replica, not one per request.
The request quota (serve_app/quota.py) keeps its own client and policy.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, TypeVar

log = logging.getLogger("ray.serve")

T = TypeVar("T")

# Compare-and-set on a string key: replace (or delete, when the new value is
# empty) only while the key still holds `expected`. The idempotency record's
# owner uses it, so a request whose claim expired cannot overwrite a newer one.
_CAS = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1]) return 1 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""


class RedisUnavailable(Exception):
    """Redis could not be reached in time (or the breaker is open)."""


class RedisStore:
    def __init__(self, url: str, *, timeout_s: float = 0.25, cooldown_s: float = 1.0,
                 client: Any = None) -> None:
        if client is None:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            client = aioredis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                       retry=Retry(NoBackoff(), 0), retry_on_timeout=False)
        self._redis = client
        self.timeout_s = timeout_s
        self.cooldown_s = cooldown_s
        self._down_until = 0.0
        self._last_warning = 0.0

    @property
    def available(self) -> bool:
        """False while the breaker is open (a recent call failed)."""
        return time.monotonic() >= self._down_until

    async def _call(self, what: str, op: Callable[[], Awaitable[T]]) -> T:
        now = time.monotonic()
        if now < self._down_until:
            raise RedisUnavailable(f"redis unavailable (retrying in {self._down_until - now:.1f} s)")
        try:
            # Connect + one command, each bounded by the socket timeouts; the
            # outer deadline is the guarantee.
            return await asyncio.wait_for(op(), 4 * self.timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # redis errors, timeouts, refused connections alike
            self._down_until = time.monotonic() + self.cooldown_s
            if now - self._last_warning > 30:
                self._last_warning = now
                log.warning("redis unavailable during %s (%s: %s); going on without it for %.1f s",
                            what, type(exc).__name__, exc, self.cooldown_s)
            raise RedisUnavailable(f"{what}: {type(exc).__name__}") from exc

    async def get(self, key: str) -> bytes | None:
        return await self._call("GET", lambda: self._redis.get(key))

    async def set(self, key: str, value: bytes, ttl_s: int, *, nx: bool = False) -> bool:
        """True when stored (with nx: only when the key did not exist)."""
        return bool(await self._call("SET", lambda: self._redis.set(key, value, ex=ttl_s, nx=nx)))

    async def compare_and_set(self, key: str, expected: bytes, value: bytes | None, ttl_s: int) -> bool:
        """Replace (value None: delete) the key only while it still holds `expected`."""
        return bool(await self._call("CAS", lambda: self._redis.eval(
            _CAS, 1, key, expected, value or b"", max(1, ttl_s))))

    async def delete(self, *keys: str) -> int:
        if not keys:
            return 0
        return int(await self._call("DEL", lambda: self._redis.delete(*keys)))

    async def add_to_set(self, key: str, member: str, ttl_s: int) -> None:
        """SADD and (re)set the set's expiry, in one transaction."""
        async def op() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.sadd(key, member)
                pipe.expire(key, ttl_s)
                await pipe.execute()

        await self._call("SADD", op)

    async def members(self, key: str) -> set[str]:
        raw = await self._call("SMEMBERS", lambda: self._redis.smembers(key))
        return {m.decode() if isinstance(m, bytes) else str(m) for m in raw}

    async def close(self) -> None:
        await self._redis.aclose()
