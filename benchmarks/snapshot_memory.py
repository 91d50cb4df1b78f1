"""Peak memory of writing and reading one index snapshot, streamed (format 2) vs whole (format 1).

    python benchmarks/snapshot_memory.py --faces 200000 --dim 128 [--s3]

Synthetic L2-normalised vectors in a flat CollectionIndex, 50 subjects.
Every phase runs in a fresh interpreter; its figure is the growth of peak
RSS over the phase (Linux: VmHWM reset through /proc/self/clear_refs, else
ru_maxrss against the RSS at the start), which sees faiss's C++
allocations too. A write phase first restores the index from a snapshot
(an exact allocation, no growth slack), then writes it; a read phase
restores it, so its growth includes the restored index and the
id->subject map themselves. --s3 runs a moto S3 server on loopback in
this (parent) process; the children stream to it over HTTP.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import uuid

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(args: argparse.Namespace) -> dict:
    from index.collection_index import CollectionIndex
    from serve_app.gallery import index_snapshots as S
    from serve_app.gallery.objects import ObjectStore

    store = S.SnapshotStore(ObjectStore(args.url), keep=10, signing_key=b"k" * 32)
    if args.phase == "prepare":
        rng = np.random.default_rng(0)
        index = CollectionIndex(args.dim)
        for start in range(0, args.faces, 20_000):
            n = min(20_000, args.faces - start)
            x = rng.standard_normal((n, args.dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            index.add(np.arange(start, start + n, dtype=np.int64), x)
        subjects = [uuid.UUID(int=i + 1) for i in range(50)]
        subject_of = {i: subjects[i % 50] for i in range(args.faces)}
        _, size = store.write_streamed(1, 1, (1, "add", 0, str(subjects[0])), index, subject_of)
        blob = S.encode_v1(1, 2, (1, "add", 0, str(subjects[0])), index, subject_of, store.signing_key)
        store.objects.put_atomic(store.key(1, 2), blob)
        return {"index_bytes": index.nbytes(), "v2_bytes": size, "v1_bytes": len(blob)}
    if args.phase.startswith("write"):
        snap = store.read(1, 1)
        ok = _reset_peak()
        base = _rss()
        if args.phase == "write-v2":
            store.write_streamed(1, 3, snap.anchor, snap.index, snap.subject_of)
        else:  # what the matcher did before: encode the whole blob, then put it
            blob = S.encode_v1(1, 3, snap.anchor, snap.index, snap.subject_of, store.signing_key)
            store.objects.put_atomic(store.key(1, 3), blob)
            del blob
        return {"growth": _peak(ok) - base}
    store.list_seqs(1)  # the client libraries (boto) load before the measured phase
    ok = _reset_peak()
    base = _rss()
    snap = store.read(1, 1 if args.phase == "read-v2" else 2)
    assert len(snap.index) == args.faces
    return {"growth": _peak(ok) - base}


def measure(faces: int, dim: int, url: str, phases: tuple[str, ...] = ("write-v2", "read-v2", "write-v1", "read-v1"),
            env: dict | None = None) -> dict:
    """{phase: peak RSS growth in bytes} plus the sizes from 'prepare'."""
    def run(phase: str) -> dict:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", phase, "--faces", str(faces),
               "--dim", str(dim), "--url", url]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": ROOT, **(env or {})}, timeout=600)
        return json.loads(out.stdout.strip().splitlines()[-1])

    result = run("prepare")
    for phase in phases:
        result[phase] = run(phase)["growth"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--faces", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--url", default=None)
    ap.add_argument("--s3", action="store_true", help="moto S3 server on loopback")
    ap.add_argument("--child", dest="phase", default=None)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(_child(args)))
        return
    env: dict = {}
    server = None
    if args.s3:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        server.start()
        host, port = server.get_host_and_port()
        env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
        os.environ.update(env)
        import s3fs

        s3fs.S3FileSystem().mkdir("snapbench")
        url = "s3://snapbench/objects"
    with tempfile.TemporaryDirectory() as tmp:
        url = url if args.s3 else (args.url or f"file://{tmp}/objects")
        r = measure(args.faces, args.dim, url, env=env)
    if server is not None:
        server.stop()
    ix = r["index_bytes"]
    print(f"synthetic flat index: {args.faces} x {args.dim}-d, {ix / MiB:.1f} MiB; "
          f"snapshot {r['v2_bytes'] / MiB:.1f} MiB (format 2), {r['v1_bytes'] / MiB:.1f} MiB (format 1); "
          f"store {'s3 (moto)' if args.s3 else 'file'}")
    for phase in ("write-v1", "write-v2", "read-v1", "read-v2"):
        g = r[phase]
        print(f"  {phase}: peak RSS growth {g / MiB:7.1f} MiB ({g / ix:.2f}x the index)")
    print(f"snapshot memory: write extra {r['write-v2'] / MiB:.1f} MiB (was {r['write-v1'] / MiB:.1f}), "
          f"read {r['read-v2'] / MiB:.1f} MiB incl. the index (was {r['read-v1'] / MiB:.1f})")


if __name__ == "__main__":
    main()
