"""Fault drills against the real app, each under a bounded client load.

Each drill injects a fault while clients keep sending requests, and checks:
- while the fault lasts, failures are 503s (never 500s, never hangs: every
  request has a client timeout and must answer within it);
- the service recovers once the fault is gone;
- no enrolment is lost, duplicated or half-written: every 201 is exactly one
  row whose crop object exists, and no crop object exists without its row.

Drills here: a detector replica killed, a matcher replica killed (SIGKILL of
the replica process), the object store failing mid-enrolment. Postgres and
Redis are stopped in drills of their own, each against a private server and
an app deployed on it (the shared machine services are never stopped):
test_db_outage.py and test_redis_outage.py.
"""
from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import asyncpg
import httpx
import psutil
import pytest

from tests.conftest import people
from tests.integration.conftest import LiveApp

CLIENT_TIMEOUT_S = 30.0
RECOVERY_TIMEOUT_S = 120.0


COLLECTION = "drills"  # a collection of its own: drill enrolments must not answer other tests' identifies


@dataclass
class Load:
    """Clients identifying and enrolling in a loop until stopped."""

    app: LiveApp
    subject_id: str
    statuses: Counter[int] = field(default_factory=Counter)
    enrolled: list[tuple[int, str]] = field(default_factory=list)  # (face id, crop sha) from 201s
    timeline: list[tuple[float, str, int]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def _worker(self, kind: str) -> None:
        photos = people()["obama"]
        with self.app.client(timeout=CLIENT_TIMEOUT_S) as c:
            i = 0
            while not self.stop.is_set():
                photo = photos[i % len(photos)].read_bytes()
                i += 1
                try:
                    if kind == "enrol":
                        r = c.post(f"/v1/subjects/{self.subject_id}/faces", files={"image": ("p.jpg", photo)},
                                   params={"collection": COLLECTION}, data={"liveness": "off", "largest": "true"})
                    else:
                        r = c.post("/v1/identify", params={"collection": COLLECTION},
                                   files={"image": ("p.jpg", photo)})
                    status = r.status_code
                except httpx.TimeoutException:
                    status = 0  # a hang: the drill fails on it
                self.statuses[status] += 1
                self.timeline.append((time.monotonic(), kind, status))
                if status == 201:
                    self.enrolled.append((r.json()["face"]["id"], r.json()["face"]["image_sha256"]))
                if status == 503:
                    time.sleep(float(r.headers.get("retry-after", "1")) / 4)
                time.sleep(0.05)

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._worker, args=(k,), daemon=True)
                   for k in ("identify", "identify", "enrol")]
        for t in threads:
            t.start()
        return threads

    def finish(self, threads: list[threading.Thread]) -> None:
        self.stop.set()
        for t in threads:
            t.join(CLIENT_TIMEOUT_S + 5)


def _replica_pids(deployment: str) -> list[int]:
    out = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if f"ServeReplica:faceserve:{deployment}" in cmd:
            out.append(proc.info["pid"])
    return out


def _wait_recovered(app: LiveApp, check: Callable[[httpx.Client], bool]) -> float:
    t0 = time.monotonic()
    with app.client(timeout=CLIENT_TIMEOUT_S) as c:
        while time.monotonic() - t0 < RECOVERY_TIMEOUT_S:
            try:
                if check(c):
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
    raise AssertionError(f"not recovered within {RECOVERY_TIMEOUT_S} s")


async def _faces_and_crops(dsn: str, subject_id: str) -> dict[int, str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id, crop_key FROM faces WHERE subject_id = $1", subject_id)
        return {r["id"]: r["crop_key"] for r in rows}
    finally:
        await conn.close()


def _assert_consistent(app: LiveApp, load: Load, subject_id: str) -> None:
    rows = asyncio.run(_faces_and_crops(app.database_url, subject_id))
    ids = [fid for fid, _ in load.enrolled]
    assert len(ids) == len(set(ids)), "an enrolment answered twice"
    assert set(ids) <= set(rows), "a 201 enrolment is missing from the database"
    for fid, key in rows.items():
        assert key and (app.object_dir / key).is_file(), f"face {fid} points at a missing crop {key}"
    on_disk = {str(p.relative_to(app.object_dir)) for p in app.object_dir.glob(f"crops/*/{subject_id}/*")}
    assert on_disk == set(rows.values()), f"orphan crops: {sorted(on_disk - set(rows.values()))}"


@pytest.fixture()
def drill_subject(live_app: LiveApp) -> str:
    with live_app.client() as c:
        c.post("/v1/collections", json={"name": COLLECTION})  # 201, or 409 when an earlier drill made it
        return c.post("/v1/subjects", json={"name": f"drill-{time.time_ns()}", "collection": COLLECTION}).json()["id"]


def _report(name: str, load: Load, recovery_s: float) -> None:
    print(f"\ndrill {name}: statuses {dict(load.statuses)}, recovery {recovery_s:.1f} s")
    assert load.statuses.get(0, 0) == 0, f"{name}: requests hung"
    bad = {s: n for s, n in load.statuses.items() if s >= 500 and s != 503}
    assert not bad, f"{name}: {bad}"
    assert set(load.statuses) <= {200, 201, 503}, f"{name}: {dict(load.statuses)}"


@pytest.mark.parametrize("deployment", ["Detector", "Matcher"])
def test_replica_killed_under_load(live_app: LiveApp, drill_subject: str, deployment: str) -> None:
    load = Load(live_app, drill_subject)
    threads = load.run()
    time.sleep(3.0)
    pids = _replica_pids(deployment)
    assert pids, f"no {deployment} replica process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    time.sleep(2.0)
    recovery = _wait_recovered(live_app, lambda c: c.post(
        "/v1/identify", params={"collection": COLLECTION},
        files={"image": ("p.jpg", people()["obama"][0].read_bytes())}).status_code == 200)
    time.sleep(3.0)  # and keeps answering
    load.finish(threads)
    _report(f"{deployment} killed", load, recovery)
    assert load.statuses[200] > 0 and load.statuses[201] > 0
    _assert_consistent(live_app, load, drill_subject)


def test_object_store_fails_mid_enrolment(live_app: LiveApp, drill_subject: str) -> None:
    crops = live_app.object_dir / "crops"
    crops.mkdir(parents=True, exist_ok=True)
    aside = live_app.object_dir / "crops.aside"
    load = Load(live_app, drill_subject)
    threads = load.run()
    time.sleep(3.0)
    # The store starts failing: "crops" becomes a plain file, so every put fails
    # (as root, permissions would not stop the writes).
    crops.rename(aside)
    crops.write_bytes(b"not a directory")
    time.sleep(6.0)
    during = Counter(s for _, kind, s in load.timeline if kind == "enrol")
    crops.unlink()
    aside.rename(crops)
    recovery = _wait_recovered(live_app, lambda c: c.post(
        f"/v1/subjects/{drill_subject}/faces", files={"image": ("p.jpg", people()["obama"][0].read_bytes())},
        params={"collection": COLLECTION}, data={"liveness": "off", "largest": "true"}).status_code == 201)
    load.finish(threads)
    _report("object store failing", load, recovery)
    assert during[503] > 0, f"no enrolment saw the outage: {dict(during)}"
    assert load.statuses[200] > 0, "identify must keep answering while the store is down"
    _assert_consistent(live_app, load, drill_subject)
