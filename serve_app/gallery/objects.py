"""Object storage for face crops and index snapshots through fsspec.

The URL picks the backend: file:///path (the embedded default) or
s3://bucket/prefix via s3fs (MinIO in production). Calls are blocking in
fsspec, so the async wrappers push them onto a thread.
"""
from __future__ import annotations

import asyncio
import logging
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

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

    @contextmanager
    def open_write_atomic(self, key: str, block_size: int = 8 << 20) -> Iterator[BinaryIO]:
        """A file object to stream one object into; it appears whole when the
        block ends without an exception, and not at all otherwise.

        Local: written as ``<key>.tmp-<hex>`` and renamed into place. S3: a
        multipart upload in block_size parts (the buffer held is one part;
        S3 wants at least 5 MiB), completed on close and aborted on error;
        a small object is one PUT.
        """
        if _is_local(self.fs):
            tmp = f"{key}.tmp-{uuid.uuid4().hex}"
            path = self._path(tmp)
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            try:
                with open(path, "wb") as f:
                    yield f
                self.fs.mv(path, self._path(key))
            except BaseException:
                self.delete(tmp)
                raise
            return
        f = self.fs.open(self._path(key), "wb", block_size=max(block_size, 5 << 20))
        try:
            yield f
        except BaseException:
            try:
                f.discard()  # abort the multipart upload: nothing becomes visible
            finally:
                f.closed = True  # so that garbage collection does not close (= commit) it
            raise
        f.close()

    @contextmanager
    def open_read(self, key: str, block_size: int = 4 << 20) -> Iterator[BinaryIO]:
        """A file object to stream one object from (S3: ranged reads of block_size)."""
        path = self._path(key)
        if _is_local(self.fs):
            with open(path, "rb") as f:
                yield f
            return
        with self.fs.open(path, "rb", block_size=block_size, cache_type="readahead") as f:
            yield f

    def get(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def present(self, key: str) -> bool:
        """Whether the object is there, asked of the store itself (no listing
        cache); raises when the store cannot say. Erasure trusts only this:
        fsspec's exists() answers False for a local path whose parent is not
        a directory, and s3fs's may answer from a stale listing."""
        path = self._path(key)
        if _is_local(self.fs):
            try:
                os.stat(path)
            except FileNotFoundError:
                return False
            return True
        self.fs.invalidate_cache(posixpath.dirname(path))
        try:
            self.fs.info(path)
        except FileNotFoundError:
            return False
        return True

    def delete(self, key: str) -> None:
        """Remove one object; one that is not there counts as removed, any
        other failure raises (a broken store is not an absent object)."""
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass

    def delete_keys(self, keys: list[str]) -> None:
        """Remove many objects (S3: batched DeleteObjects requests)."""
        if not keys:
            return
        if _is_local(self.fs):
            for key in keys:
                self.delete(key)
            return
        paths = [self._path(k) for k in keys]
        self.fs.rm(paths)
        self.fs.invalidate_cache(posixpath.commonpath(paths))

    def list_keys(self, prefix: str) -> list[str]:
        """Every key under prefix (a directory-like prefix: "crops/1" does not
        list "crops/10/..."). An absent prefix is []; a store that cannot be
        listed raises rather than looking empty."""
        base = self._path(prefix.rstrip("/"))
        if _is_local(self.fs):
            try:
                os.stat(base)
            except FileNotFoundError:
                return []
        else:
            self.fs.invalidate_cache(base)
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
