"""The embedding cache: what detection + embedding gave for an image, kept in Redis.

Keyed by the image's sha256 and the *model identity*: the embedder (name and
the weights manifest's pinned checksums), the detector's result-shaping
options (detector, thresholds, working size, re-landmarking, quality bars)
and this format's version. A model or option change therefore changes every
key, and an entry computed under other settings is never read; old entries
age out with their TTL.

An entry holds faces (box, 5 landmarks, score, quality), the image's size
and format, and the vectors: a small JSON header plus float32 bytes
(~0.6 KB a face with SFace). It holds no crops, so a cached answer never
feeds liveness or enrolment: requests that check liveness or enrol read
around the cache (and still write their detection + embedding into it).

Erasure. The cache is keyed by image only and knows no subject. But an
enrolled face's image is that subject's biometric data: enrolment ties its
image's entry (under the identity it was written with) to the subject in an
index set, `<prefix>:subject:<id>`, together with the idempotency records
whose stored answers name the subject (SubjectKeys.tie). Erasure calls
`SubjectKeys.forget(subject_id)`, which deletes every tied key and the set.
Probe images sent to identify/verify are nobody's gallery data and expire
with the TTL; so do entries of the same image made under an older identity,
which are never read again.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import numpy as np

from serve_app.messages import DetectionResult, EmbeddingResult, FaceInfo

FORMAT_VERSION = 1
_MAGIC = b"FSE1"
_EMPTY_ALIGNED = np.zeros((0, 112, 112, 3), np.uint8)  # crops are never cached


class KeyValue(Protocol):
    """What the cache needs of Redis (serve_app/redis_store.RedisStore)."""

    async def get(self, key: str) -> bytes | None: ...
    async def set(self, key: str, value: bytes, ttl_s: int, *, nx: bool = False) -> bool: ...
    async def delete(self, *keys: str) -> int: ...
    async def add_to_set(self, key: str, member: str, ttl_s: int) -> None: ...
    async def members(self, key: str) -> set[str]: ...


class CacheCounter(Protocol):
    def __call__(self, result: str) -> None: ...


# --- model identity ------------------------------------------------------------

# Detector options that change what the detector returns; batching does not.
_NOT_IDENTITY = frozenset({"max_batch_size", "batch_wait_timeout_s"})


@lru_cache(maxsize=1)
def weights_identity() -> str:
    """The pinned checksums of every weights file (configs/weights.yaml): a
    replaced model file has another checksum, so another identity."""
    from models.weights import load_manifest

    pins = sorted(f"{name}={spec.sha256}" for name, spec in load_manifest().items())
    return hashlib.sha256("\n".join(pins).encode()).hexdigest()[:16]


def detector_identity(config: Any) -> str:
    """The Detector's result-shaping options (a DetectorConfig) as a short digest."""
    options = {k: v for k, v in config.model_dump(mode="json").items() if k not in _NOT_IDENTITY}
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("faceserve")
    except PackageNotFoundError:  # a source checkout that is not installed
        return "unknown"


def model_identity(detector_id: str, embedder_model: str) -> str:
    """The cache's key part for results of this detector config and embedder."""
    parts = f"v{FORMAT_VERSION}|{_package_version()}|{weights_identity()}|{embedder_model}|{detector_id}"
    return hashlib.sha256(parts.encode()).hexdigest()[:16]


# --- the entry -----------------------------------------------------------------


def encode(det: DetectionResult, emb: EmbeddingResult) -> bytes:
    """magic, header length (u32 LE), JSON header, landmarks (n,5,2) f32, vectors (n,dim) f32."""
    n = len(det.faces)
    header = {
        "faces": [{"box": [float(v) for v in f.box], "score": float(f.score), "quality": f.quality}
                  for f in det.faces],
        "size": [int(det.image_size[0]), int(det.image_size[1])],
        "format": det.image_format,
        "model": emb.model,
        "dim": int(emb.dim),
    }
    head = json.dumps(header, separators=(",", ":"), default=float).encode()
    lms = (np.stack([np.asarray(f.landmarks, np.float32) for f in det.faces]) if n
           else np.zeros((0, 5, 2), np.float32))
    vecs = np.ascontiguousarray(emb.vectors, np.float32).reshape(n, int(emb.dim))
    return b"".join((_MAGIC, struct.pack("<I", len(head)), head, lms.astype("<f4").tobytes(),
                     vecs.astype("<f4").tobytes()))


def decode(blob: bytes) -> tuple[DetectionResult, EmbeddingResult]:
    """The entry back; ValueError when it is not one this version wrote whole."""
    if blob[:4] != _MAGIC or len(blob) < 8:
        raise ValueError("not an embedding cache entry")
    (hlen,) = struct.unpack("<I", blob[4:8])
    header = json.loads(blob[8 : 8 + hlen])
    n, dim = len(header["faces"]), int(header["dim"])
    body = memoryview(blob)[8 + hlen :]
    if len(body) != 4 * n * (10 + dim):
        raise ValueError("embedding cache entry is truncated")
    lms = np.frombuffer(body[: 40 * n], "<f4").reshape(n, 5, 2).astype(np.float32)
    vecs = np.frombuffer(body[40 * n :], "<f4").reshape(n, dim).astype(np.float32)
    faces = [FaceInfo(tuple(f["box"]), lms[i], float(f["score"]), f["quality"])  # type: ignore[arg-type]
             for i, f in enumerate(header["faces"])]
    det = DetectionResult(faces=faces, aligned=_EMPTY_ALIGNED, liveness_crops=None, enrol_crops=None,
                          image_size=(header["size"][0], header["size"][1]), image_format=header["format"])
    return det, EmbeddingResult(model=header["model"], dim=dim, vectors=vecs)


# --- the cache -----------------------------------------------------------------


@dataclass
class CacheConfig:
    ttl_s: int = 3600  # 0 switches the cache off
    max_entry_bytes: int = 65536  # larger entries (crowds) are not stored


def image_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class EmbeddingCache:
    def __init__(self, store: KeyValue, *, prefix: str = "faceserve", config: CacheConfig | None = None,
                 count: CacheCounter | None = None) -> None:
        self.store = store
        self.prefix = prefix
        self.config = config or CacheConfig()
        self._count = count or (lambda result: None)

    @property
    def enabled(self) -> bool:
        return self.config.ttl_s > 0

    def key(self, digest: str, identity: str) -> str:
        return f"{self.prefix}:emb:{identity}:{digest}"

    async def get(self, digest: str, identity: str) -> tuple[DetectionResult, EmbeddingResult] | None:
        """The cached result, or None (a miss, Redis down, or an unreadable entry)."""
        from serve_app.redis_store import RedisUnavailable

        try:
            blob = await self.store.get(self.key(digest, identity))
        except RedisUnavailable:
            self._count("unavailable")
            return None
        if blob is None:
            self._count("miss")
            return None
        try:
            found = decode(blob)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            self._count("corrupt")
            return None
        self._count("hit")
        return found

    async def put(self, digest: str, identity: str, det: DetectionResult, emb: EmbeddingResult) -> bool:
        """Store one result; False when it was too large or Redis is down."""
        from serve_app.redis_store import RedisUnavailable

        blob = encode(det, emb)
        if len(blob) > self.config.max_entry_bytes:
            self._count("too_large")
            return False
        try:
            await self.store.set(self.key(digest, identity), blob, self.config.ttl_s)
        except RedisUnavailable:
            self._count("unavailable")
            return False
        self._count("stored")
        return True


class SubjectKeys:
    """Redis keys that hold a subject's data: its enrolment images' cache
    entries and the idempotency records of its creation and enrolments (their
    stored answers name it), so that erasing the subject removes them."""

    def __init__(self, store: KeyValue, *, prefix: str = "faceserve", ttl_s: int = 86400) -> None:
        self.store = store
        self.prefix = prefix
        self.ttl_s = ttl_s  # at least the longest TTL of what is tied

    def index_key(self, subject_id: Any) -> str:
        return f"{self.prefix}:subject:{subject_id}"

    async def tie(self, subject_id: Any, *keys: str) -> bool:
        """Record keys as the subject's; False when Redis is down (the record
        tied is then most likely not stored either)."""
        from serve_app.redis_store import RedisUnavailable

        try:
            for key in keys:
                await self.store.add_to_set(self.index_key(subject_id), key, self.ttl_s)
        except RedisUnavailable:
            return False
        return True

    async def forget(self, subject_id: Any) -> int:
        """Delete every key tied to the subject, and the index; how many keys
        existed. Raises RedisUnavailable when Redis is down: the erasure must
        retry then, not report it done."""
        index = self.index_key(subject_id)
        keys = sorted(await self.store.members(index))
        removed = await self.store.delete(*keys) if keys else 0
        await self.store.delete(index)
        return removed
