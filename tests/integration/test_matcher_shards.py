"""Matcher shards against real Postgres: first GalleryIndex shards without Ray
(SQL filtering, per-shard snapshots, log pruning, a re-embed), then the real
Serve app with two `Matcher-<s>` deployments over HTTP (one app start)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest

from serve_app import cluster
from serve_app.gallery.gallery_index import GalleryIndex
from serve_app.gallery.index_snapshots import SnapshotStore
from serve_app.gallery.objects import ObjectStore
from serve_app.gallery.reembeds import ReembedRepository
from serve_app.gallery.repository import Collection, GalleryRepository
from serve_app.gallery.shards import WHOLE, Shard, merge_results
from serve_app.messages import MatchResult
from tests.conftest import people
from tests.integration.conftest import LiveApp, running_live_app
from tests.integration.test_matcher_state import _enrol, _vec  # the same synthetic gallery

DIM = 8
N = 2


def _held(g: GalleryIndex) -> dict[int, list[int]]:
    return {c: sorted(ix.ids().tolist()) for c, ix in g.indexes.items() if len(ix)}


def _assert_shards_make_the_whole(shards: list[GalleryIndex], whole: GalleryIndex, dims: dict[int, int]) -> None:
    for s, g in enumerate(shards):
        assert g.seq == whole.seq
        assert _held(g) == {c: [f for f in ids if f % N == s] for c, ids in _held(whole).items()
                            if any(f % N == s for f in ids)}
        assert g.subject_of == {f: sub for f, sub in whole.subject_of.items() if f % N == s}
        assert g.names == whole.names
    rng = np.random.default_rng(5)
    for cid, dim in dims.items():
        q = np.stack([_vec(rng, dim) for _ in range(6)])
        for k in (1, 4):
            merged = merge_results([MatchResult(g.search(cid, q, k), g.seq) for g in shards], k)
            want = whole.search(cid, q, k)
            assert [[(h.subject_id, h.face_id, round(h.similarity, 5), h.name) for h in hits] for hits in merged.hits] \
                == [[(h.subject_id, h.face_id, round(h.similarity, 5), h.name) for h in hits] for hits in want]


# ------------------------------------------------------ without Ray
async def test_shards_load_follow_snapshot_and_prune_their_own_faces(repo: GalleryRepository, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    objects = ObjectStore(f"file://{tmp_path}/objects")
    stores = [SnapshotStore(objects, shard=Shard(s, N)) for s in range(N)]
    c1 = await repo.ensure_collection("c1", "test", DIM)
    c2 = await repo.ensure_collection("c2", "test", DIM)
    f1 = await _enrol(repo, c1, rng, subjects=6, faces=3)
    await _enrol(repo, c2, rng, subjects=3, faces=2)

    # Postgres sends a shard only its own faces' vectors.
    seq, rows = await repo.load_all(Shard(1, N))
    assert rows and all(r.face_id % N == 1 for r in rows)
    _, rows = await repo.load_collection(c1.id, Shard(0, N))
    assert rows and all(r.face_id % N == 0 for r in rows)
    log = await repo.changes_since(0, shard=Shard(0, N))
    adds = [ch for ch in log if ch.op == "add"]
    assert len(adds) == 24 and all((ch.embedding is not None) == (ch.face_id % N == 0) for ch in adds)

    shards = [GalleryIndex(repo, stores[s], snapshot_every=1, shard=Shard(s, N)) for s in range(N)]
    for g in shards:
        report = await g.load()
        assert report.full_load
    whole = GalleryIndex(repo, None)
    await whole.load()
    dims = {c1.id: DIM, c2.id: DIM}
    _assert_shards_make_the_whole(shards, whole, dims)

    # Each shard snapshots its own faces under its own keys.
    for s, g in enumerate(shards):
        written = await g.write_snapshots()
        assert sorted(written) == sorted(stores[s].key(c, g.seq) for c in (c1.id, c2.id))
        assert all(f"/shard-{s}-of-{N}/" in k for k in written)
    first = shards[0].seq

    # Changes after the snapshots: adds, a face and a subject removed, a rename.
    await _enrol(repo, c1, rng, subjects=2, faces=3)
    await _enrol(repo, c2, rng, subjects=1, faces=2)
    sub, face = f1[0]
    await repo.delete_face(c1, sub, face)
    await repo.delete_subject(c1, f1[4][0])
    await repo.rename_subject(c1, f1[7][0], "renamed")
    for g in (*shards, whole):
        await g.sync()
    _assert_shards_make_the_whole(shards, whole, dims)

    # Shard 0 writes again (its snapshot is newer); shard 1 does not.
    assert len(await shards[0].write_snapshots()) == 2
    assert min(stores[0].list_seqs(c)[0] for c in (c1.id, c2.id)) > first == stores[1].list_seqs(c1.id)[0]
    # Pruning from shard 0 keeps what shard 1's (older) snapshots replay.
    await asyncio.sleep(0.3)
    assert await shards[0].prune_log(retention_s=0.1) > 0
    assert await repo.log_pruned_through() < first

    # Restarted shards restore their own snapshots and replay the log after them.
    restored = [GalleryIndex(repo, stores[s], shard=Shard(s, N)) for s in range(N)]
    for s, g in enumerate(restored):
        report = await g.load()
        assert report.from_snapshot == {c1.id: stores[s].list_seqs(c1.id)[0], c2.id: stores[s].list_seqs(c2.id)[0]}
        assert report.replayed > 0 or s == 0
    _assert_shards_make_the_whole(restored, whole, dims)
    assert face not in restored[face % N].subject_of


async def test_a_reembed_switches_each_shard_to_its_own_new_vectors(repo: GalleryRepository) -> None:
    rng = np.random.default_rng(2)
    col = await repo.ensure_collection("c", "old", DIM)
    fids = [f for _, f in await _enrol(repo, col, rng, subjects=4, faces=2)]
    reembeds = ReembedRepository(repo.pool)
    staging = await reembeds.begin(col, "new", 4)
    new = {f: _vec(rng, 4) for f in fids}
    await reembeds.stage(col, staging, {f: new[f] for f in fids[:3]})
    # Shards loaded mid-staging read only their own staged vectors.
    loaded = await reembeds.load_staged(Shard(1, N))
    assert sorted(loaded.vectors[col.id][0].tolist()) == [f for f in fids[:3] if f % N == 1]
    shards = [GalleryIndex(repo, None, shard=Shard(s, N)) for s in range(N)]
    for g in shards:
        await g.load()
    await reembeds.stage(col, staging, {f: new[f] for f in fids[3:]})
    switched = await reembeds.switch(col, staging)
    assert not switched.missing
    whole = GalleryIndex(repo, None, shard=WHOLE)
    await whole.load()
    for g in shards:
        await g.sync()
        assert g.models[col.id] == "new"
    _assert_shards_make_the_whole(shards, whole, {col.id: 4})


# ------------------------------------------------------ the Serve app, two shards
@pytest.fixture(scope="module")
def sharded_app() -> Iterator[LiveApp]:
    with running_live_app("faceserve_shards", app_args={"matcher_shards": N}) as app:
        yield app


def _shard_stats(app: LiveApp) -> list[dict[str, Any]]:
    """Each shard deployment's stats, asked through Ray from a process of its
    own (this test process stays off the cluster)."""
    script = (
        "import json, ray\n"
        "from ray import serve\n"
        f"ray.init(address='127.0.0.1:{app.ports.gcs}', logging_level='ERROR', log_to_driver=False)\n"
        f"out = [serve.get_deployment_handle(f'Matcher-{{s}}', app_name='faceserve').stats.remote().result()"
        f" for s in range({N})]\n"
        "print(json.dumps(out, default=str))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], env=cluster.ray_env(), capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _post(client: httpx.Client, url: str, path: Path, **params: Any) -> httpx.Response:
    with path.open("rb") as fh:
        return client.post(url, params=params, files={"image": (path.name, fh)})


def _replica_pids(deployment: str) -> list[int]:
    return [p.info["pid"] for p in psutil.process_iter(["pid", "cmdline"])
            if f"ServeReplica:faceserve:{deployment}" in " ".join(p.info.get("cmdline") or [])]


def test_two_shards_over_http(sharded_app: LiveApp) -> None:
    ppl = people()
    enrol = {"obama": ppl["obama"][:2], "kit_harington": ppl["kit_harington"][:2],
             "rose_leslie": ppl["rose_leslie"][:1], "alex_lacamoire": ppl["alex_lacamoire"][:1],
             "biden": ppl["biden"][:1]}
    probes = {"obama": ppl["obama"][2], "kit_harington": ppl["kit_harington"][2],
              "rose_leslie": ppl["rose_leslie"][1], "alex_lacamoire": ppl["alex_lacamoire"][1],
              "biden": ppl["biden"][1]}
    subjects: dict[str, str] = {}
    face_ids: list[int] = []
    faces_of: dict[str, list[int]] = {}
    seq = 0
    with sharded_app.client() as c:
        ready = c.get("/readyz").json()
        assert ready["checks"]["matcher-0"] and ready["checks"]["matcher-1"] and ready["checks"]["matcher"]
        for name, photos in enrol.items():
            r = c.post("/v1/subjects", json={"name": name})
            assert r.status_code == 201, r.text
            subjects[name] = r.json()["id"]
            for photo in photos:
                r = _post(c, f"/v1/subjects/{subjects[name]}/faces", photo)
                assert r.status_code == 201, r.text
                face_ids.append(r.json()["face"]["id"])
                faces_of.setdefault(name, []).append(face_ids[-1])
                seq = max(seq, r.json()["seq"])
        assert {f % N for f in face_ids} == set(range(N))  # both shards hold faces

        def identify(photo: Path, **params: Any) -> dict[str, Any]:
            r = _post(c, "/v1/identify", photo, **params)
            assert r.status_code == 200, r.text
            return r.json()["faces"][0]

        for name, photo in probes.items():
            face = identify(photo, min_seq=seq)
            assert face["decision"] == "match", (name, face)
            assert face["subject"]["id"] == subjects[name] and face["subject"]["name"] == name
            ids = [cand["subject_id"] for cand in face["candidates"]]
            assert len(ids) == len(set(ids))  # one candidate per subject, merged over the shards

        # Each shard holds only its own faces; together, all of them.
        stats = _shard_stats(sharded_app)
        assert [st["shard"] for st in stats] == [{"index": s, "count": N} for s in range(N)]
        per_shard = [sum(st["faces"].values()) for st in stats]
        assert per_shard == [sum(1 for f in face_ids if f % N == s) for s in range(N)]
        assert sum(per_shard) == len(face_ids)

        # A deleted subject leaves every shard's answers.
        r = c.delete(f"/v1/subjects/{subjects['obama']}")
        assert r.status_code == 200, r.text
        face = identify(probes["obama"], min_seq=r.json()["seq"])
        assert face["decision"] == "unknown" and all(
            cand["subject_id"] != subjects["obama"] for cand in face["candidates"])

        # Shard 1 lost: an identify is answered whole or refused (503 +
        # Retry-After), never from shard 0 alone. The probe's subject has
        # faces in shard 1 only, so an answer from shard 0 alone would miss it.
        only_1 = next(n for n in ("rose_leslie", "biden", "alex_lacamoire", "kit_harington")
                      if all(f % N == 1 for f in faces_of[n]))
        killed = _replica_pids("Matcher-1")
        assert killed
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        seen: list[tuple[float, int]] = []
        while time.monotonic() - t0 < 90:
            r = _post(c, "/v1/identify", probes[only_1])
            seen.append((round(time.monotonic() - t0, 1), r.status_code))
            if r.status_code == 503:
                assert r.headers.get("retry-after"), r.headers
            else:
                assert r.status_code == 200, r.text
                assert r.json()["faces"][0]["subject"]["id"] == subjects[only_1], r.json()
            now = _replica_pids("Matcher-1")
            if now and not set(now) & set(killed) and seen[-1][1] == 200:
                break  # a new replica of shard 1 answers
            time.sleep(0.2)
        print(f"\nidentify of {only_1} (shard 1 only) after shard 1's replica was killed: {seen}")
        assert seen[-1][1] == 200 and not set(_replica_pids("Matcher-1")) & set(killed)
