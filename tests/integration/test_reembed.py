"""The re-embed job through `ray job submit` against the session app.

A collection enrolled through HTTP with SFace is moved to sface_flip while
a client keeps identifying: every answer is a correct match, from SFace's
vectors until the switch and from sface_flip's after it, never an error.
A first submission is killed half-way (a test hook) and a second one
finishes it; the face ids and count are unchanged, the stored vectors are
the new model's, and a third submission has nothing to do.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np

from serve_app import cluster
from tests.conftest import MODELS_DIR, people
from tests.integration.conftest import LiveApp

COLLECTION = "reembed_it"
PEOPLE = ("alex_lacamoire", "biden", "obama", "rose_leslie")


def _submit(app: LiveApp, report_key: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    """(final status, logs) of one `ray job submit` of the re-embed job."""
    sid = f"reembed-it-{uuid.uuid4().hex[:8]}"
    cmd = [
        cluster._bin("ray"), "job", "submit", "--address", app.ports.dashboard_url, "--submission-id", sid,
        "--runtime-env-json", json.dumps({"env_vars": env or {}}), "--",
        sys.executable, "-m", "serve_app.jobs.reembed", "--collection", COLLECTION, "--model", "sface_flip",
        "--database-url", app.database_url, "--object-store-url", f"file://{app.object_dir}",
        "--models-dir", str(MODELS_DIR), "--report-key", report_key,
        "--concurrency", "1", "--cpus-per-worker", "0.5", "--batch-size", "2",
    ]
    out = subprocess.run(cmd, env=cluster.ray_env(), capture_output=True, text=True, timeout=900)
    status = subprocess.run([cluster._bin("ray"), "job", "status", "--address", app.ports.dashboard_url, sid],
                            env=cluster.ray_env(), capture_output=True, text=True, timeout=120)
    logs = out.stdout + out.stderr
    said = (status.stdout + status.stderr).lower()
    for state in ("SUCCEEDED", "FAILED", "STOPPED"):
        if f"' {state.lower()}" in said or f": {state.lower()}" in said:
            return state, logs
    raise AssertionError(f"no final state for {sid}: {status.stdout}{status.stderr}\n{logs[-3000:]}")


def _db(app: LiveApp, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(app.database_url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


def _faces(app: LiveApp) -> dict[int, tuple[str, str, bytes]]:
    rows = _db(app, "SELECT f.id, s.name, f.model, f.embedding FROM faces f JOIN subjects s ON s.id = f.subject_id "
                    "JOIN collections c ON c.id = f.collection_id WHERE c.name = $1", COLLECTION)
    return {r["id"]: (r["name"], r["model"], bytes(r["embedding"])) for r in rows}


def _report(app: LiveApp, key: str) -> dict[str, Any]:
    return json.loads((app.object_dir / key).read_text())["summary"]


class Identifier(threading.Thread):
    """Identifies the people's other photos in a loop until stopped."""

    def __init__(self, app: LiveApp, probes: dict[str, Path]) -> None:
        super().__init__(daemon=True)
        self.app, self.probes = app, probes
        self.stop = threading.Event()
        self.answers: list[tuple[float, int, str | None, str | None, str]] = []  # (t, status, model, who, want)

    def run(self) -> None:
        with self.app.client(timeout=60) as client:
            while not self.stop.is_set():
                for name, photo in self.probes.items():
                    with photo.open("rb") as fh:
                        r = client.post("/v1/identify", params={"collection": COLLECTION},
                                        files={"image": (photo.name, fh)})
                    body = r.json() if r.status_code == 200 else {}
                    face = (body.get("faces") or [{}])[0]
                    who = (face.get("subject") or {}).get("name") if face.get("decision") == "match" else None
                    self.answers.append((time.time(), r.status_code, body.get("model"), who,
                                         name if r.status_code == 200 else r.text[:300]))


def test_reembed_switches_while_identify_answers(live_app: LiveApp) -> None:
    photos = people()
    enrolled: dict[str, str] = {}
    with live_app.client() as client:
        r = client.post("/v1/collections", json={"name": COLLECTION})
        assert r.status_code == 201 and r.json()["embedder"] == "sface", r.text
        for name in PEOPLE:
            r = client.post("/v1/subjects", params={"collection": COLLECTION}, json={"name": name})
            assert r.status_code == 201, r.text
            enrolled[name] = r.json()["id"]
            with photos[name][0].open("rb") as fh:
                r = client.post(f"/v1/subjects/{enrolled[name]}/faces", params={"collection": COLLECTION},
                                files={"image": (photos[name][0].name, fh)})
            assert r.status_code == 201, r.text
    before = _faces(live_app)
    assert len(before) == len(PEOPLE) and {m for _, m, _ in before.values()} == {"sface"}

    probes = {name: photos[name][1] for name in PEOPLE}
    ident = Identifier(live_app, probes)
    ident.start()
    try:
        time.sleep(3)
        # Killed after staging 2 of the 4 faces: nothing is switched, identify goes on.
        state, logs = _submit(live_app, "reports/reembed-it-1.json", env={"FACESERVE_REEMBED_FAIL_AFTER_FACES": "2"})
        assert state == "FAILED", logs[-4000:]
        assert _db(live_app, "SELECT embedder FROM collections WHERE name = $1", COLLECTION)[0]["embedder"] == "sface"
        assert _db(live_app, "SELECT count(*) AS n FROM staged_embeddings")[0]["n"] >= 2

        state, logs = _submit(live_app, "reports/reembed-it-2.json")
        assert state == "SUCCEEDED", logs[-4000:]
        switched_at = time.time()
        assert "REPORT " in logs
        s = _report(live_app, "reports/reembed-it-2.json")
        assert s["switched"] is True and (s["from_model"], s["to_model"]) == ("sface", "sface_flip"), s
        assert s["skipped"] >= 2 and s["reembedded"] + s["skipped"] == len(PEOPLE), s
        assert s["rejected"] == s["failed"] == 0 and s["faces"] == len(PEOPLE), s
        time.sleep(4)  # identify after the switch, through the ingress's cached lookup and after it
    finally:
        ident.stop.set()
        ident.join(timeout=120)

    # Every answer throughout was the right person: SFace's before the switch, sface_flip's after.
    assert ident.answers, "the identify loop never answered"
    bad = [a for a in ident.answers if a[1] != 200 or a[3] != a[4]]
    assert not bad, bad[:5]
    models = [m for _, _, m, _, _ in ident.answers]
    assert models[0] == "sface" and models[-1] == "sface_flip", models
    flips = [i for i in range(1, len(models)) if models[i] != models[i - 1]]
    assert len(flips) == 1, models  # one switch, never back and forth
    assert all(t <= switched_at + 1 for t, _, m, _, _ in ident.answers if m == "sface")

    # The collection's model switched; same face ids and count, every vector the new model's.
    col = _db(live_app, "SELECT embedder, dim FROM collections WHERE name = $1", COLLECTION)[0]
    assert (col["embedder"], col["dim"]) == ("sface_flip", 128)
    after = _faces(live_app)
    assert sorted(after) == sorted(before)
    assert {m for _, m, _ in after.values()} == {"sface_flip"}
    for fid, (name, _, vec) in after.items():
        old = np.frombuffer(before[fid][2], "<f4")
        new = np.frombuffer(vec, "<f4")
        assert before[fid][0] == name and 0.9 < float(old @ new) < 0.9999, (fid, float(old @ new))
    assert _db(live_app, "SELECT count(*) AS n FROM staged_embeddings")[0]["n"] == 0

    with live_app.client() as client:
        r = client.get("/v1/collections")
        assert {"name": COLLECTION, "embedder": "sface_flip", "dim": 128} in r.json()["collections"]
        for name in PEOPLE:  # verify against a subject uses its faces' (new) model
            with probes[name].open("rb") as fh:
                r = client.post("/v1/verify", params={"collection": COLLECTION},
                                data={"subject_id": enrolled[name]}, files={"image": (probes[name].name, fh)})
            assert r.status_code == 200 and r.json()["match"] and r.json()["model"] == "sface_flip", r.text

    # A second run has nothing to do.
    state, logs = _submit(live_app, "reports/reembed-it-3.json")
    assert state == "SUCCEEDED", logs[-4000:]
    s = _report(live_app, "reports/reembed-it-3.json")
    assert s["already"] is True and s["total"] == 0 and not s["switched"], s
    assert _faces(live_app) == after
