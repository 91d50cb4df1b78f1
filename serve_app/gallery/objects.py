"""Object storage for face crops (and later index snapshots) through fsspec.

The URL picks the backend: file:///path (the embedded default) or
s3://bucket/prefix via s3fs (MinIO in production). Calls are blocking in
fsspec, so the async wrappers push them onto a thread.
"""
from __future__ import annotations

import asyncio
import logging
import posixpath
import uuid

import fsspec
from fsspec.core import url_to_fs

log = logging.getLogger(__name__)


class ObjectStore:
    def __init__(self, url: str) -> None:
        fs, root = url_to_fs(url)
        self.fs: fsspec.AbstractFileSystem = fs
        self.root = root.rstrip("/")
        self.url = url
        if _is_local(fs):
            fs.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad object key {key!r}")
        return posixpath.join(self.root, key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        if _is_local(self.fs):
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, data)

    def put_atomic(self, key: str, data: bytes) -> None:
        """Like put, but a reader never sees a half-written object.

        An S3 PUT is already all-or-nothing; a local file is written under a
        temporary name (``<key>.tmp-<hex>``) and renamed into place.
        """
        if not _is_local(self.fs):
            self.put(key, data)
            return
        tmp = f"{key}.tmp-{uuid.uuid4().hex}"
        self.put(tmp, data)
        try:
            self.fs.mv(self._path(tmp), self._path(key))
        except BaseException:
            self.delete(tmp)
            raise

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def delete(self, key: str) -> None:
        path = self._path(key)
        if self.fs.exists(path):
            self.fs.rm_file(path)

    def list_keys(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/"))
        if not self.fs.exists(base):
            return []
        return sorted(posixpath.relpath(p, self.root) for p in self.fs.find(base))

    async def aput(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self.put, key, data)

    async def aget(self, key: str) -> bytes:
        return await asyncio.to_thread(self.get, key)

    async def adelete_many(self, keys: list[str]) -> list[str]:
        """Delete keys; returns the ones that could not be deleted (logged)."""
        failed: list[str] = []
        for key in keys:
            try:
                await asyncio.to_thread(self.delete, key)
            except Exception:  # storage outage must not undo a committed delete
                log.exception("could not delete object %s; left for cleanup", key)
                failed.append(key)
        return failed


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
