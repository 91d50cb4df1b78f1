"""Bulk enrolment through `ray job submit` against the session app's Ray cluster.

The folder mixes the real photos with files each gate must reject; the
report must name every one. The running matchers must serve the new
subjects with no restart; a second submission enrols nothing; a job killed
between writing crops and committing their rows, submitted again, ends with
every image enrolled exactly once and no object without a row.
"""
from __future__ import annotations

import asyncio
import io
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest
from PIL import Image

from serve_app import cluster
from tests.conftest import FACES_DIR, MODELS_DIR, people
from tests.integration.conftest import LiveApp

# Expected per file (liveness block, default quality bar), by path under the folder.
REJECTED = {
    "group/obama_and_biden.jpg": "multiple_faces",
    "obama/partial.jpg": "low_quality",
    "junk/notes.jpg": "unreadable",
    "junk/truncated.jpg": "unreadable",
    "junk/photo.heic": "unsupported_format",
    "junk/wall.jpg": "no_face",
    "spoofer/image_F1.jpg": "spoof",
    "spoofer/image_F2.jpg": "spoof",
}


def _build_folder(root: Path) -> dict[str, list[str]]:
    """The folder, and {subject: its images that must be enrolled}."""
    expected: dict[str, list[str]] = {}
    for name, photos in people().items():
        (root / name).mkdir(parents=True)
        for p in photos:
            shutil.copy(p, root / name / p.name)
        expected[name] = [p.name for p in photos]
    (root / "live_person").mkdir()
    shutil.copy(FACES_DIR / "liveness" / "image_T1.jpg", root / "live_person" / "image_T1.jpg")
    expected["live_person"] = ["image_T1.jpg"]
    (root / "spoofer").mkdir()
    for f in ("image_F1.jpg", "image_F2.jpg"):
        shutil.copy(FACES_DIR / "liveness" / f, root / "spoofer" / f)
    (root / "group").mkdir()
    shutil.copy(FACES_DIR / "groups" / "obama_and_biden.jpg", root / "group" / "obama_and_biden.jpg")
    shutil.copy(FACES_DIR / "groups" / "obama_partial_face.jpg", root / "obama" / "partial.jpg")
    junk = root / "junk"
    junk.mkdir()
    (junk / "notes.jpg").write_bytes(b"this is not an image\n")
    jpeg = (FACES_DIR / "people" / "obama" / "obama_1.jpg").read_bytes()
    (junk / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (junk / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    buf = io.BytesIO()
    Image.fromarray((np.indices((240, 320)).sum(0) % 256).astype(np.uint8)).convert("RGB").save(buf, "JPEG")
    (junk / "wall.jpg").write_bytes(buf.getvalue())
    return expected


def _submit(app: LiveApp, source: Path, collection: str, report_key: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    """(final status, logs) of one `ray job submit` of the enrolment job."""
    sid = f"bulk-it-{uuid.uuid4().hex[:8]}"
    cmd = [
        cluster._bin("ray"), "job", "submit", "--address", app.ports.dashboard_url, "--submission-id", sid,
        "--runtime-env-json", json.dumps({"env_vars": env or {}}), "--",
        sys.executable, "-m", "serve_app.jobs.enroll", "--source", str(source), "--collection", collection,
        "--liveness", "block", "--database-url", app.database_url,
        "--object-store-url", f"file://{app.object_dir}", "--models-dir", str(MODELS_DIR),
        "--report-key", report_key, "--concurrency", "2", "--cpus-per-worker", "0.5", "--batch-size", "4",
    ]
    out = subprocess.run(cmd, env=cluster.ray_env(), capture_output=True, text=True, timeout=900)
    status = subprocess.run([cluster._bin("ray"), "job", "status", "--address", app.ports.dashboard_url, sid],
                            env=cluster.ray_env(), capture_output=True, text=True, timeout=120)
    logs = out.stdout + out.stderr
    said = (status.stdout + status.stderr).lower()  # "Job '<id>' succeeded" / "... failed"
    for state in ("SUCCEEDED", "FAILED", "STOPPED"):
        if f"' {state.lower()}" in said or f": {state.lower()}" in said:
            return state, logs
    raise AssertionError(f"no final state for {sid}: {status.stdout}{status.stderr}\n{logs[-3000:]}")


def _report(app: LiveApp, key: str) -> dict[str, Any]:
    return json.loads((app.object_dir / key).read_text())


def _db(app: LiveApp, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(app.database_url)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(go())


def _faces(app: LiveApp, collection: str) -> list[asyncpg.Record]:
    return _db(app, "SELECT s.name, f.image_sha256, f.crop_key FROM faces f JOIN subjects s ON s.id = f.subject_id "
                    "JOIN collections c ON c.id = f.collection_id WHERE c.name = $1", collection)


def _crop_objects(app: LiveApp, collection: str) -> set[str]:
    cid = _db(app, "SELECT id FROM collections WHERE name = $1", collection)[0]["id"]
    base = app.object_dir / "crops" / str(cid)
    return {str(p.relative_to(app.object_dir)) for p in base.rglob("*") if p.is_file()} if base.exists() else set()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("bulk") / "people"
    return root, _build_folder(root)


def test_job_enrols_reports_and_is_served_and_idempotent(live_app: LiveApp, folder: tuple[Path, dict[str, list[str]]]) -> None:
    root, expected = folder
    n_ok = sum(len(v) for v in expected.values())
    state, logs = _submit(live_app, root, "bulk_it", "reports/bulk-it-1.json")
    assert state == "SUCCEEDED", logs[-4000:]
    assert "REPORT " in logs and "progress:" in logs  # the job's own output
    report = _report(live_app, "reports/bulk-it-1.json")
    s = report["summary"]
    assert (s["total"], s["enrolled"], s["skipped"], s["rejected"], s["failed"]) == (
        n_ok + len(REJECTED), n_ok, 0, len(REJECTED), 0), s
    assert s["rejected_by_reason"] == {"low_quality": 1, "multiple_faces": 1, "no_face": 1, "spoof": 2,
                                       "unreadable": 2, "unsupported_format": 1}
    got = {str(Path(i["uri"]).relative_to(root)): i["reason"] for i in report["images"]}
    assert got == REJECTED

    rows = _faces(live_app, "bulk_it")
    assert sorted((r["name"]) for r in rows) == sorted(n for n, fs in expected.items() for _ in fs)
    assert {r["crop_key"] for r in rows} == _crop_objects(live_app, "bulk_it")  # every crop has its row
    assert not _db(live_app, "SELECT 1 FROM subjects WHERE name = ANY($1::text[])", ["spoofer", "junk", "group"])

    # The running matchers follow the change log: every new subject is identified, no restart.
    seq = _db(live_app, "SELECT max(seq) AS s FROM changes")[0]["s"]
    with live_app.client() as client:
        for name, files in expected.items():
            photo = root / name / files[0]
            with photo.open("rb") as fh:
                r = client.post("/v1/identify", params={"collection": "bulk_it", "min_seq": seq},
                                files={"image": (photo.name, fh)})
            assert r.status_code == 200, r.text
            face = r.json()["faces"][0]
            assert face["decision"] == "match" and face["subject"]["name"] == name, (name, face)

    state, logs = _submit(live_app, root, "bulk_it", "reports/bulk-it-2.json")
    assert state == "SUCCEEDED", logs[-4000:]
    s2 = _report(live_app, "reports/bulk-it-2.json")["summary"]
    assert (s2["enrolled"], s2["skipped"], s2["rejected"], s2["failed"]) == (0, n_ok, len(REJECTED), 0), s2
    assert len(_faces(live_app, "bulk_it")) == n_ok


def test_job_killed_between_crops_and_rows_resumes_exactly_once(
        live_app: LiveApp, folder: tuple[Path, dict[str, list[str]]]) -> None:
    root, expected = folder
    n_ok = sum(len(v) for v in expected.values())
    state, logs = _submit(live_app, root, "bulk_kill", "reports/bulk-kill-1.json",
                          env={"FACESERVE_ENROLL_FAIL_AFTER_OBJECTS": "5"})
    assert state == "FAILED", logs[-4000:]
    before = _faces(live_app, "bulk_kill")
    objects = _crop_objects(live_app, "bulk_kill")
    assert 0 < len(before) < n_ok
    assert objects - {r["crop_key"] for r in before}  # the kill left crops without rows

    state, logs = _submit(live_app, root, "bulk_kill", "reports/bulk-kill-2.json")
    assert state == "SUCCEEDED", logs[-4000:]
    s = _report(live_app, "reports/bulk-kill-2.json")["summary"]
    assert s["enrolled"] + s["skipped"] == n_ok and s["skipped"] == len(before) and s["failed"] == 0, s
    rows = _faces(live_app, "bulk_kill")
    pairs = [(r["name"], r["image_sha256"]) for r in rows]
    assert len(pairs) == len(set(pairs)) == n_ok  # every image exactly once
    assert {r["crop_key"] for r in rows} == _crop_objects(live_app, "bulk_kill")  # no object without a row


def test_stop_leaves_no_pointer_to_the_stopped_cluster(tmp_path: Path) -> None:
    """`faceserve stop` (cluster.stop_ray) removes `ray_current_cluster` naming our GCS,
    so a later bare ray.init()/`ray status` does not wait on a dead one."""
    ports = cluster.ClusterPorts(gcs=6397, dashboard=8287, metrics=8097, http=18097)
    temp_dir = f"/tmp/ray-faceserve-stop-{uuid.uuid4().hex[:6]}"
    pointer = Path(temp_dir) / "ray_current_cluster"
    cluster.start_ray_head(ports, num_cpus=1, temp_dir=temp_dir)
    try:
        assert pointer.read_text().strip().endswith(":6397")
    finally:
        cluster.stop_ray(temp_dir, gcs_port=ports.gcs)
    assert not pointer.exists()
    assert not cluster.ray_running(ports)
    shutil.rmtree(temp_dir, ignore_errors=True)
