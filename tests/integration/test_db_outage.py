"""Drill: PostgreSQL stopped for 10 s, then started again, under identify and
enrol load (issue 11 "reads survive a database outage", issue 9 "Postgres
restarted mid-enrolment").

The app runs against a private PostgreSQL server started here from the
pgserver wheel, exactly as the embedded default does (serve_app/embedded_pg.py),
with a data dir and socket of its own under /tmp; the machine's shared server
is never touched. Clients use a tenant API key (not the bootstrap key), so
key, tenant and collection lookups are exercised too.

It checks:
- every identify answers 200, before, during and after the outage, and a
  verify of an image pair answers 200 while the database is down;
- enrolments answer 201 or 503 with Retry-After, never 500, never a hang
  (client timeout); every enrolment sent and answered while the server was
  down is a 503;
- enrolment recovers once the server is back (first 201 after the restart);
- afterwards every 201 is in the gallery exactly once (its face id, its own
  image's sha256) with its crop in the bucket, no 503 left a row, no row
  lacks its crop and no crop lacks its row;
- identify with the newest seq finds the drill subject (the matcher follows
  the log again).
"""
from __future__ import annotations

import asyncio
import os
import shutil
import struct
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest

from serve_app.embedded_pg import start_embedded_postgres, stop_embedded_postgres
from tests.conftest import people
from tests.integration.conftest import BOOTSTRAP_KEY, LiveApp, running_live_app

OUTAGE_S = 10.0
CLIENT_TIMEOUT_S = 30.0  # an answer later than this is a hang
PACE_S = 0.4  # per client thread; two threads per kind: ~5 requests/s each when the app keeps up
RECOVERY_TIMEOUT_S = 120.0
COLLECTION = "dbdrill"


@dataclass
class Call:
    kind: str  # identify | enrol
    started: float
    ended: float
    status: int  # 0: no answer within CLIENT_TIMEOUT_S
    retry_after: str | None = None
    face_id: int | None = None
    seq: int | None = None
    sha256: str = ""


@dataclass
class Load:
    app: LiveApp
    token: str
    subject_id: str
    calls: list[Call] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _worker(self, kind: str, n: int) -> None:
        photos = [p.read_bytes() for p in people()["obama"]]
        with self.app.client(key=self.token, timeout=CLIENT_TIMEOUT_S) as c:
            i = 0
            while not self.stop.is_set():
                i += 1
                photo = photos[i % len(photos)]
                t0 = time.monotonic()
                call = Call(kind, t0, t0, 0)
                try:
                    if kind == "enrol":
                        # A comment segment makes every upload's bytes (and so its
                        # image_sha256) unique: the gallery check finds each one.
                        photo, call.sha256 = _unique(photo, f"{n}-{i}-{uuid.uuid4().hex}")
                        r = c.post(f"/v1/subjects/{self.subject_id}/faces", params={"collection": COLLECTION},
                                   files={"image": ("p.jpg", photo)}, data={"liveness": "off", "largest": "true"})
                    else:
                        r = c.post("/v1/identify", params={"collection": COLLECTION},
                                   files={"image": ("p.jpg", photo)})
                    call.status = r.status_code
                    call.retry_after = r.headers.get("retry-after")
                    if r.status_code == 201:
                        body = r.json()
                        call.face_id, call.seq = body["face"]["id"], body["seq"]
                        assert body["face"]["image_sha256"] == call.sha256
                except httpx.TimeoutException:
                    call.status = 0
                call.ended = time.monotonic()
                with self.lock:
                    self.calls.append(call)
                time.sleep(max(0.0, PACE_S - (call.ended - t0)))

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._worker, args=(kind, n), daemon=True)
                   for n, kind in enumerate(("identify", "identify", "enrol", "enrol"))]
        for t in threads:
            t.start()
        return threads

    def finish(self, threads: list[threading.Thread]) -> None:
        self.stop.set()
        for t in threads:
            t.join(CLIENT_TIMEOUT_S + 5)


def _unique(jpeg: bytes, tag: str) -> tuple[bytes, str]:
    import hashlib

    assert jpeg[:2] == b"\xff\xd8"
    comment = tag.encode()
    data = jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]
    return data, hashlib.sha256(data).hexdigest()


async def _gallery_rows(dsn: str, subject_id: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT id, image_sha256, crop_key FROM faces WHERE subject_id = $1", subject_id)
    finally:
        await conn.close()


@pytest.fixture()
def private_pg() -> tuple[Path, str]:
    """A PostgreSQL server of this test's own (pgserver wheel, socket only)."""
    data_dir = Path(f"/tmp/faceserve-dbdrill-{os.getpid()}")
    shutil.rmtree(data_dir, ignore_errors=True)
    uri = start_embedded_postgres(data_dir)
    try:
        yield data_dir, uri
    finally:
        stop_embedded_postgres(data_dir)
        shutil.rmtree(data_dir, ignore_errors=True)


def test_postgres_stopped_10s_under_identify_and_enrol_load(private_pg: tuple[Path, str]) -> None:
    data_dir, uri = private_pg
    with running_live_app("faceserve_dbdrill", database_url=uri) as app:
        with app.client(key=BOOTSTRAP_KEY) as boot:
            assert boot.post("/v1/collections", json={"name": COLLECTION}).status_code == 201
            key = boot.post("/v1/keys", json={"scopes": ["read", "enrol"], "name": "drill"})
            assert key.status_code == 201, key.text
            token = key.json()["token"]
            subject_id = boot.post("/v1/subjects", json={"name": "drill-obama", "collection": COLLECTION}).json()["id"]
        pair = {"image1": ("a.jpg", people()["obama"][0].read_bytes()),
                "image2": ("b.jpg", people()["obama"][1].read_bytes())}
        with app.client(key=token, timeout=CLIENT_TIMEOUT_S) as c:  # warm: the key is looked up once
            assert c.post("/v1/verify", files=pair).status_code == 200

        load = Load(app, token, subject_id)
        threads = load.run()
        try:
            time.sleep(5.0)
            t_stop = time.monotonic()
            assert stop_embedded_postgres(data_dir)  # pg_ctl -m fast -w stop
            t_down = time.monotonic()
            verifies = []
            with app.client(key=token, timeout=CLIENT_TIMEOUT_S) as c:
                for _ in range(3):  # verify of an image pair needs no database either
                    time.sleep(OUTAGE_S / 4)
                    verifies.append(c.post("/v1/verify", files=pair).status_code)
            time.sleep(max(0.0, t_down + OUTAGE_S - time.monotonic()))
            t_restart = time.monotonic()
            assert start_embedded_postgres(data_dir) == uri  # same socket: the app's DSN holds
            t_up = time.monotonic()
            deadline = t_up + RECOVERY_TIMEOUT_S
            while time.monotonic() < deadline and not any(
                    x.kind == "enrol" and x.status == 201 and x.started >= t_up for x in list(load.calls)):
                time.sleep(0.5)
            time.sleep(3.0)  # and keeps answering
        finally:
            load.finish(threads)

        calls = sorted(load.calls, key=lambda x: x.started)
        by_kind = {k: Counter(x.status for x in calls if x.kind == k) for k in ("identify", "enrol")}
        during = [x for x in calls if x.started >= t_down and x.ended <= t_restart]
        recovered = [x for x in calls if x.kind == "enrol" and x.status == 201 and x.started >= t_up]
        first_201 = min((x.ended for x in recovered), default=None)
        span = calls[-1].ended - calls[0].started
        recovery = f"{first_201 - t_up:.2f} s" if first_201 is not None else "never"
        print(f"\ndrill postgres stopped {t_restart - t_down:.1f} s (stop took {t_down - t_stop:.2f} s, "
              f"start {t_up - t_restart:.2f} s) over {span:.0f} s of load: "
              f"identify {dict(by_kind['identify'])} ({sum(by_kind['identify'].values()) / span:.1f}/s), "
              f"enrol {dict(by_kind['enrol'])} ({sum(by_kind['enrol'].values()) / span:.1f}/s); "
              f"while down: identify {dict(Counter(x.status for x in during if x.kind == 'identify'))}, "
              f"enrol {dict(Counter(x.status for x in during if x.kind == 'enrol'))}, verify pair {verifies}; "
              f"first 201 after the server was up: {recovery}")

        assert all(x.status != 0 for x in calls), "a request hung past the client timeout"
        assert set(by_kind["identify"]) == {200}, f"identify must answer 200 throughout: {by_kind['identify']}"
        assert any(x.kind == "identify" for x in during), "no identify was answered while the server was down"
        assert verifies == [200, 200, 200]
        assert set(by_kind["enrol"]) <= {201, 503}, f"enrol: {by_kind['enrol']}"
        assert all(x.retry_after and int(x.retry_after) >= 1 for x in calls if x.status == 503)
        enrol_down = Counter(x.status for x in during if x.kind == "enrol")
        assert enrol_down and set(enrol_down) == {503}, f"enrolments while the server was down: {enrol_down}"
        assert first_201 is not None, "no enrolment succeeded after the restart"

        # The gallery: every 201 exactly once with its crop; nothing from a 503.
        rows = asyncio.run(_gallery_rows(uri, subject_id))
        by_sha = Counter(r["image_sha256"] for r in rows)
        by_id = {r["id"]: r for r in rows}
        ok = [x for x in calls if x.status == 201]
        assert len({x.face_id for x in ok}) == len(ok), "two enrolments answered with one face id"
        for x in ok:
            assert x.face_id in by_id and by_id[x.face_id]["image_sha256"] == x.sha256, f"201 {x.face_id} not stored"
            assert by_sha[x.sha256] == 1, f"enrolment {x.face_id} stored {by_sha[x.sha256]} times"
        refused = {x.sha256 for x in calls if x.kind == "enrol" and x.status == 503}
        assert not refused & set(by_sha), "an enrolment answered 503 left a row"
        assert len(rows) == len(ok), f"{len(rows)} rows for {len(ok)} enrolments answered 201"
        for r in rows:
            assert r["crop_key"] and (app.object_dir / r["crop_key"]).is_file(), f"face {r['id']} lacks its crop"
        on_disk = {str(p.relative_to(app.object_dir)) for p in app.object_dir.glob(f"crops/*/{subject_id}/*")}
        assert on_disk == {r["crop_key"] for r in rows}, f"orphan crops: {sorted(on_disk - {r['crop_key'] for r in rows})}"

        # The matcher follows the log again: the newest enrolment is found.
        newest = max(x.seq for x in ok if x.seq is not None)
        with app.client(key=token, timeout=CLIENT_TIMEOUT_S) as c:
            r = c.post("/v1/identify", params={"collection": COLLECTION, "min_seq": newest},
                       files={"image": ("p.jpg", people()["obama"][0].read_bytes())})
        assert r.status_code == 200, r.text
        assert r.json()["faces"][0]["subject"]["id"] == subject_id
        assert r.json()["faces"][0]["subject"]["name"] == "drill-obama"
