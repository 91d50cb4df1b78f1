"""Idempotency-Key at the edge: the header, the request's content hash, the replayed answer.

The rules are serve_app/idempotency.py's. Here: a write route hands over its
work; with a key (and Redis configured) the work runs at most once and its
answer (status and JSON body) is stored and replayed, marked with the header
`Idempotent-Replayed: true`. Without a key the route answers as it always
did. Either way, the Redis keys that hold the written subject's data (its
enrolment image's cache entry; the idempotency record, whose answer names
it) are tied to the subject, so its erasure removes them
(embedding_cache.SubjectKeys).
"""
from __future__ import annotations

from typing import Annotated, Any, Awaitable, Callable

from fastapi import Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from serve_app.idempotency import Answer, body_hash, check_key
from serve_app.services.access import Principal

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key")]

# What a write route's work returns: its response model, the subject it wrote,
# and Redis keys that hold that subject's data.
Work = Callable[[], Awaitable[tuple[BaseModel, Any, tuple[str, ...]]]]

__all__ = ["IdempotencyKey", "Work", "body_hash", "idempotent"]


async def idempotent(edge: Any, who: Principal, key: str | None, *, route: str, collection: str,
                     content_hash: str, status: int, work: Work, exclude_none: bool = False) -> Any:
    """The route's answer: its model (no key), or the stored/replayed JSON answer."""
    if key is not None:
        check_key(key)
    if key is None or edge.idempotency is None:
        model, subject, tied = await work()
        await _tie(edge, subject, tied)
        return model
    record = edge.idempotency.record_key(tenant=who.tenant, actor=who.actor, route=route,
                                         collection=collection, key=key)

    async def run() -> Answer:
        model, subject, tied = await work()
        await _tie(edge, subject, (*tied, record))
        return Answer(status, model.model_dump(mode="json", exclude_none=exclude_none))

    answer = await edge.idempotency.run(record, content_hash, run)
    headers = {"Idempotent-Replayed": "true"} if answer.replayed else None
    return JSONResponse(answer.body, status_code=answer.status, headers=headers)


async def _tie(edge: Any, subject: Any, keys: tuple[str, ...]) -> None:
    if keys and edge.subject_keys is not None:
        await edge.subject_keys.tie(subject, *keys)
