"""ObjectStore on a local directory and on a real S3-protocol server (moto) on loopback."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from serve_app.gallery.objects import ObjectStore


@pytest.fixture(scope="module")
def s3_url() -> str:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("faceserve-test")
    yield "s3://faceserve-test/crops-root"
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("backend", ["file", "s3"])
async def test_put_get_delete(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = f"file://{tmp_path}/objects" if backend == "file" else request.getfixturevalue("s3_url")
    store = ObjectStore(url)
    await store.aput("crops/c/s/a.jpg", b"\xff\xd8abc")
    await store.aput("crops/c/s/b.jpg", b"\xff\xd8def")
    assert store.get("crops/c/s/a.jpg") == b"\xff\xd8abc"
    assert store.list_keys("crops/c") == ["crops/c/s/a.jpg", "crops/c/s/b.jpg"]
    assert await store.adelete_many(["crops/c/s/a.jpg", "crops/c/s/missing.jpg"]) == []
    assert not store.exists("crops/c/s/a.jpg") and store.exists("crops/c/s/b.jpg")


def test_keys_cannot_escape_the_root(tmp_path: Path) -> None:
    store = ObjectStore(f"file://{tmp_path}")
    for bad in ("../x", "/abs", "", "a/../../b"):
        with pytest.raises(ValueError):
            store.put(bad, b"x")


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_erasure_primitives(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """What the erasure sweeper relies on: a prefix lists only its own keys
    ("crops/1" is not "crops/10"), present() asks the store itself (no stale
    listing cache), delete_keys removes many at once and ignores absent keys."""
    url = f"file://{tmp_path}/objects" if backend == "file" else request.getfixturevalue("s3_url") + "-erasure"
    store = ObjectStore(url)
    for key in ("crops/1/s/a.jpg", "crops/1/t/b.jpg", "crops/10/s/c.jpg"):
        store.put(key, b"x")
    assert store.list_keys("crops/1/") == ["crops/1/s/a.jpg", "crops/1/t/b.jpg"]
    assert store.present("crops/1/s/a.jpg") and not store.present("crops/1/s/zzz.jpg")
    store.delete_keys(["crops/1/s/a.jpg", "crops/1/t/b.jpg", "crops/1/t/never.jpg"])
    assert not store.present("crops/1/s/a.jpg") and store.list_keys("crops/1") == []
    assert store.list_keys("crops/10") == ["crops/10/s/c.jpg"] and store.list_keys("nothing/here") == []


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_index_snapshot_streams_through_the_store(backend: str, tmp_path: Path,
                                                  request: pytest.FixtureRequest) -> None:
    """A streamed snapshot (several S3 multipart parts: 8 MiB blocks) reads
    back with identical search results; a tampered or truncated object is
    refused; a write that fails midway leaves no object (the multipart upload
    is aborted, the temp file removed)."""
    import uuid

    import numpy as np

    from index.collection_index import CollectionIndex
    from index.framing import IndexCorrupt
    from serve_app.gallery.index_snapshots import SnapshotStore

    url = f"file://{tmp_path}/objects" if backend == "file" else request.getfixturevalue("s3_url") + "-snap"
    key = b"k" * 32
    store = SnapshotStore(ObjectStore(url), signing_key=key)
    rng = np.random.default_rng(0)
    n, dim = 40_000, 128  # ~20 MiB of vectors: three multipart parts
    x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = CollectionIndex(dim)
    index.add(np.arange(n, dtype=np.int64), x)
    subjects = [uuid.uuid4() for _ in range(9)]
    subject_of = {i: subjects[i % 9] for i in range(n)}
    written, size = store.write_streamed(3, 100, (3, "add", 1, str(subjects[1])), index, subject_of)
    assert size > 16 << 20 and store.list_seqs(3) == [100]
    back = store.read(3, 100)
    assert back.subject_of == subject_of and back.anchor == (3, "add", 1, str(subjects[1]))
    q = rng.standard_normal((16, dim)).astype(np.float32)
    for a, b in zip(index.search(q, 10), back.index.search(q, 10)):
        np.testing.assert_array_equal(a, b)

    blob = store.objects.get(written)
    tampered = bytearray(blob)
    tampered[len(blob) // 2] ^= 0x10
    store.objects.put(store.key(3, 101), bytes(tampered))
    store.objects.put(store.key(3, 102), blob[: len(blob) - 1000])
    for seq in (101, 102):
        with pytest.raises(IndexCorrupt):
            store.read(3, seq)
    assert store.load_newest(3).seq == 100  # type: ignore[union-attr]

    partial = dict(list(subject_of.items())[:-1])  # fails after the index is uploaded
    with pytest.raises(KeyError):
        store.write_streamed(3, 103, None, index, partial)
    assert not store.objects.present(store.key(3, 103))
    assert all("103" not in k for k in store.objects.list_keys("index-snapshots/3"))
