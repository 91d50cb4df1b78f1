"""Idempotency of bulk enrolment: what makes an image "already enrolled",
and where its crop lives.

An image is identified by (subject, sha256 of its bytes, embedding model).
Its crop's object key is derived from (collection, subject, sha256) alone,
so a job killed between writing the crop and committing the row leaves an
object that the resubmitted job overwrites (same key, same bytes) and then
points a row at: no orphan, no sweep needed. Keys made by the HTTP path are
random (`<hex32>.jpg`); bulk keys are the full sha256 (64 hex), so the two
never collide.
"""
from __future__ import annotations

import hashlib
import re
import uuid

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def image_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def crop_key(collection_id: int, subject_id: uuid.UUID | str, sha256: str) -> str:
    if not _SHA256.match(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    if isinstance(collection_id, bool) or not isinstance(collection_id, int) or collection_id < 1:
        raise ValueError(f"bad collection id {collection_id!r}")
    return f"crops/{collection_id}/{uuid.UUID(str(subject_id))}/{sha256}.jpg"


def is_bulk_key(key: str) -> bool:
    """A crop key this job makes (as opposed to the HTTP path's random ones)."""
    parts = key.split("/")
    return (len(parts) == 4 and parts[0] == "crops" and parts[3].endswith(".jpg")
            and bool(_SHA256.match(parts[3][:-4])))
