"""Idempotency-Key for writes: the same key and body give the same answer, and the write happens once.

A record per (tenant, caller, route, collection, key) lives in Redis:
- `pending` (with the body's hash) while the first request runs, for at
  most `pending_ttl_s` (60 s, longer than any request may run);
- `done` with the answer's status and body, for `ttl_s` (24 h).
A repeat with the same body replays the stored answer; with another body it
is refused (422 idempotency_key_reused). A repeat that arrives while the
first still runs waits for it (polling, up to `wait_s`, 5 s) and then
replays its answer, or gets 409 idempotency_in_progress with Retry-After.
Only successes are stored: a request that failed (4xx or 5xx) releases its
claim, so the retry runs again; nothing was written then. Once claimed, the
work runs to its end even if the client hangs up, so that its answer is
recorded for the retry.

Redis down or unreachable: the request is served without the guarantee
(counted as `unenforced` and logged). Known gaps, both needing Redis to fail
at one exact moment: an answer that cannot be recorded (Redis gone between
claim and answer) leaves the pending record until it expires, and a retry
after that runs again; a process killed between the write and the record
likewise.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

from serve_app.errors import IdempotencyInProgress, IdempotencyKeyReused, InvalidRequest
from serve_app.redis_store import RedisUnavailable

log = logging.getLogger("ray.serve")

_KEY = re.compile(r"[!-~]{1,255}")  # printable ASCII without spaces, as Stripe-like APIs take it


class RecordStore(Protocol):
    """What idempotency needs of Redis (serve_app/redis_store.RedisStore)."""

    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_s: int, *, nx: bool = False) -> bool: ...
    async def compare_and_set(self, key: str, expected: bytes, value: bytes | None, ttl_s: int) -> bool: ...


@dataclass(frozen=True)
class Answer:
    status: int
    body: dict[str, Any]
    replayed: bool = False


@dataclass(frozen=True)
class Claim:
    key: str
    record: bytes  # the pending record as written: the compare-and-set's expected value
    body_hash: str


def check_key(value: str) -> str:
    if not _KEY.fullmatch(value):
        raise InvalidRequest("Idempotency-Key must be 1-255 printable ASCII characters without spaces",
                             field="Idempotency-Key")
    return value


def body_hash(fields: dict[str, Any], images: dict[str, bytes] | None = None) -> str:
    """The request's content, independent of its framing (multipart boundaries,
    JSON key order, base64 or raw): fields by name, images by their sha256."""
    doc = {"fields": fields, "images": {k: hashlib.sha256(v).hexdigest() for k, v in (images or {}).items()}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


class Idempotency:
    def __init__(self, store: RecordStore, *, prefix: str = "faceserve", ttl_s: int = 86400,
                 pending_ttl_s: int = 60, wait_s: float = 5.0, poll_s: float = 0.05,
                 count: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.pending_ttl_s = pending_ttl_s
        self.wait_s = wait_s
        self.poll_s = poll_s
        self._count = count or (lambda result: None)
        self._orphans: set[asyncio.Task[Any]] = set()

    def record_key(self, *, tenant: str, actor: str, route: str, collection: str, key: str) -> str:
        scope = json.dumps([tenant, actor, route, collection, key])
        return f"{self.prefix}:idem:{hashlib.sha256(scope.encode()).hexdigest()[:40]}"

    async def run(self, key: str, content_hash: str, work: Callable[[], Awaitable[Answer]]) -> Answer:
        """The answer of `work`, run at most once for this key and content."""
        got = await self._begin(key, content_hash)
        if isinstance(got, Answer):
            return got
        if got is None:
            return await work()
        task = asyncio.ensure_future(self._run_claimed(got, work))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The client is gone; the write goes on and records its answer for the retry.
            self._orphans.add(task)
            task.add_done_callback(self._settle_orphan)
            raise

    async def _begin(self, key: str, content_hash: str) -> Claim | Answer | None:
        """A claim (run it), a stored answer (replay it), or None (Redis down: not enforced)."""
        record = json.dumps({"state": "pending", "hash": content_hash, "id": uuid.uuid4().hex}).encode()
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                if await self.store.set(key, record, self.pending_ttl_s, nx=True):
                    self._count("claimed")
                    return Claim(key, record, content_hash)
                current = await self.store.get(key)
            except RedisUnavailable:
                self._count("unenforced")
                log.warning("idempotency: Redis unavailable, request served without Idempotency-Key protection")
                return None
            if current is None:
                continue  # released or expired since the SET NX: claim again
            held = json.loads(current)
            if held.get("hash") != content_hash:
                self._count("key_reused")
                raise IdempotencyKeyReused(
                    "this Idempotency-Key was used with a different request body; "
                    "use a new key for a different request")
            if held.get("state") == "done":
                self._count("replayed")
                return Answer(int(held["status"]), held["body"], replayed=True)
            if time.monotonic() >= deadline:
                self._count("in_progress")
                raise IdempotencyInProgress(
                    "a request with this Idempotency-Key is still being processed; retry shortly",
                    retry_after_s=1)
            await asyncio.sleep(self.poll_s)

    async def _run_claimed(self, claim: Claim, work: Callable[[], Awaitable[Answer]]) -> Answer:
        try:
            answer = await work()
        except BaseException:
            await self._release(claim)
            raise
        done = json.dumps({"state": "done", "hash": claim.body_hash, "status": answer.status,
                           "body": answer.body}).encode()
        try:
            recorded = await self.store.compare_and_set(claim.key, claim.record, done, self.ttl_s)
        except RedisUnavailable:
            recorded = False
        if not recorded:
            self._count("unrecorded")
            log.warning("idempotency: the answer could not be recorded (Redis unavailable or the claim "
                        "expired); a retry after %d s would run again", self.pending_ttl_s)
        return answer

    async def _release(self, claim: Claim) -> None:
        try:
            await self.store.compare_and_set(claim.key, claim.record, None, 1)
        except RedisUnavailable:
            pass  # the pending record expires by itself

    def _settle_orphan(self, task: asyncio.Task[Any]) -> None:
        self._orphans.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("idempotency: a request whose client left failed: %r", task.exception())
