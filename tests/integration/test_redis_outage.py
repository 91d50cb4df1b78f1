"""Drill: Redis hung, then stopped for 10 s and started again, under identify and
enrol load (issue 9 "Redis stopped", issue 11 "with Redis down the service
answers without them").

The app runs against a private redis-server on port 6391 (no persistence,
its own dir under /tmp); the machine's shared Redis on 6379 is never touched.
The request quota is switched on (a limit far above the load), so every
request also goes through the quota's Redis check.

Phases, with the load running throughout:
1. warm: every photo the identify clients send is in the embedding cache;
2. hung (SIGSTOP, 4 s): Redis accepts connections and never answers;
3. down (process killed, 10 s): connections are refused;
4. back (a fresh, empty redis-server): the cache fills again.

It checks:
- no 500s and no hangs (every answer within the client timeout); identify
  answers 200 and enrolment 201 in every phase (503s are counted and shown);
- cache hits resume after the restart (the time to the first hit is printed);
- Idempotency-Key works again after the restart (a repeat is replayed);
- no enrolment lost or duplicated: the gallery holds exactly the faces whose
  enrolment answered 201, each once, with its crop.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import asyncpg
import httpx
import pytest
import redis

from tests.conftest import people
from tests.integration.conftest import LiveApp, running_live_app

PORT = 6391
REDIS_URL = f"redis://127.0.0.1:{PORT}/0"
CLIENT_TIMEOUT_S = 30.0  # an answer later than this is a hang
PACE_S = 0.3
HUNG_S = 4.0
OUTAGE_S = 10.0
RECOVERY_TIMEOUT_S = 60.0
COLLECTION = "redisdrill"


class PrivateRedis:
    """A redis-server of this test's own: started, hung, stopped, started again."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="faceserve-redis-drill-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(PORT), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=PORT, socket_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on {PORT} did not start") from None
                time.sleep(0.1)

    def hang(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def keys(self, pattern: str) -> list[bytes]:
        return list(redis.Redis(port=PORT, socket_timeout=2).scan_iter(match=pattern))

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@dataclass
class Call:
    kind: str
    started: float
    ended: float
    status: int  # 0: no answer within CLIENT_TIMEOUT_S
    cached: bool = False
    face_id: int | None = None


@dataclass
class Load:
    app: LiveApp
    subject_id: str
    photos: list[bytes]
    calls: list[Call] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _worker(self, kind: str) -> None:
        with self.app.client(timeout=CLIENT_TIMEOUT_S) as c:
            i = 0
            while not self.stop.is_set():
                i += 1
                t0 = time.monotonic()
                call = Call(kind, t0, t0, 0)
                try:
                    if kind == "enrol":
                        # a new image each time (its own sha256), with a key of its own
                        image = self.photos[i % len(self.photos)] + uuid.uuid4().bytes
                        r = c.post(f"/v1/subjects/{self.subject_id}/faces", files={"image": ("p.jpg", image)},
                                   params={"collection": COLLECTION}, data={"liveness": "off", "largest": "true"},
                                   headers={"Idempotency-Key": uuid.uuid4().hex})
                    else:
                        r = c.post("/v1/identify", params={"collection": COLLECTION},
                                   files={"image": ("p.jpg", self.photos[i % len(self.photos)])})
                    call.status = r.status_code
                    if r.status_code == 200:
                        call.cached = "cache" in r.json().get("timings_ms", {})
                    if r.status_code == 201:
                        call.face_id = r.json()["face"]["id"]
                except httpx.TimeoutException:
                    call.status = 0
                call.ended = time.monotonic()
                with self.lock:
                    self.calls.append(call)
                if call.status == 503:
                    time.sleep(1.0)
                time.sleep(PACE_S)

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

    def between(self, t0: float, t1: float) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if t0 <= c.started and c.ended <= t1]


@pytest.fixture(scope="module")
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def drill_app(private_redis: PrivateRedis) -> Iterator[LiveApp]:
    with running_live_app("faceserve_redis_drill", redis_url=REDIS_URL) as app:
        # The quota on, far above the load: every request also checks it in Redis.
        app.reconfigure({"Ingress": {"user_config": {"requests_per_minute": 100000}}})
        yield app


def _photos() -> list[bytes]:
    return [p.read_bytes() for p in people()["obama"]]


def _identify(c: httpx.Client, photo: bytes) -> httpx.Response:
    return c.post("/v1/identify", params={"collection": COLLECTION}, files={"image": ("p.jpg", photo)})


def _cached(r: httpx.Response) -> bool:
    return r.status_code == 200 and "cache" in r.json()["timings_ms"]


def _warm(app: LiveApp, photos: list[bytes]) -> None:
    """Every photo in the cache (a hit observed for each): the cache is on."""
    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    with app.client(timeout=CLIENT_TIMEOUT_S) as c:
        for photo in photos:
            while not _cached(_identify(c, photo)):
                assert time.monotonic() < deadline, "the embedding cache never answered"
                time.sleep(0.2)


async def _gallery_faces(dsn: str, subject_id: str) -> dict[int, str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id, crop_key FROM faces WHERE subject_id = $1", uuid.UUID(subject_id))
        return {r["id"]: r["crop_key"] for r in rows}
    finally:
        await conn.close()


def _counts(calls: list[Call]) -> dict[str, dict[int, int]]:
    out: dict[str, Counter[int]] = {"identify": Counter(), "enrol": Counter()}
    for c in calls:
        out[c.kind][c.status] += 1
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def test_redis_hung_then_stopped_under_load(drill_app: LiveApp, private_redis: PrivateRedis) -> None:
    app = drill_app
    with app.client() as c:
        c.post("/v1/collections", json={"name": COLLECTION})
        r = c.post("/v1/subjects", json={"name": "redis-drill", "collection": COLLECTION})
        assert r.status_code == 201, r.text
        subject_id = r.json()["id"]
    photos = _photos()
    _warm(app, photos)

    load = Load(app, subject_id, photos)
    threads = load.run()
    try:
        time.sleep(3.0)
        t_hung = time.monotonic()
        private_redis.hang()
        time.sleep(HUNG_S)
        private_redis.resume()
        private_redis.stop()
        t_down = time.monotonic()
        time.sleep(OUTAGE_S)
        private_redis.start()  # empty: no persistence
        t_back = time.monotonic()
        # Recovery: the time until a repeated identify is answered from the cache again.
        recovery_s = None
        with app.client(timeout=CLIENT_TIMEOUT_S) as c:
            while time.monotonic() - t_back < RECOVERY_TIMEOUT_S:
                if _cached(_identify(c, photos[0])):
                    recovery_s = time.monotonic() - t_back
                    break
                time.sleep(0.2)
        time.sleep(3.0)
    finally:
        load.finish(threads)
    t_end = time.monotonic()

    phases = {"before": load.between(0, t_hung), "hung": load.between(t_hung, t_down),
              "down": load.between(t_down, t_back), "after": load.between(t_back, t_end)}
    print(f"\nredis drill: hung {HUNG_S:.0f} s, down {t_back - t_down:.1f} s")
    for name, calls in phases.items():
        slowest = max((c.ended - c.started for c in calls), default=0.0)
        hits = sum(c.cached for c in calls if c.kind == "identify")
        print(f"  {name:6s}: {_counts(calls)}  identify cache hits {hits}  slowest {slowest:.2f} s")
    print(f"  all   : {_counts(load.calls)}")
    print(f"  recovery: first cache hit {recovery_s if recovery_s is None else round(recovery_s, 2)} s "
          "after the restart")

    statuses = Counter(c.status for c in load.calls)
    assert statuses[0] == 0, f"requests hung: {dict(statuses)}"
    assert not {s for s in statuses if s >= 500 and s != 503}, dict(statuses)
    assert set(statuses) <= {200, 201, 503}, dict(statuses)
    for name in ("hung", "down"):
        kinds = Counter((c.kind, c.status) for c in phases[name])
        assert kinds[("identify", 200)] > 0, f"identify stopped answering while Redis was {name}: {kinds}"
        assert kinds[("enrol", 201)] > 0, f"enrolment stopped answering while Redis was {name}: {kinds}"
    assert not any(c.cached for c in phases["down"]), "a cache hit while Redis was down?"
    assert recovery_s is not None, "cache hits did not resume after Redis came back"

    # Idempotency-Key is enforced again: a repeat is replayed, one face.
    with app.client(timeout=CLIENT_TIMEOUT_S) as c:
        key = f"after-{uuid.uuid4().hex}"
        image = photos[0] + uuid.uuid4().bytes
        answers = [c.post(f"/v1/subjects/{subject_id}/faces", files={"image": ("p.jpg", image)},
                          params={"collection": COLLECTION}, data={"liveness": "off", "largest": "true"},
                          headers={"Idempotency-Key": key}) for _ in range(2)]
    assert [a.status_code for a in answers] == [201, 201], answers[-1].text
    assert answers[1].headers.get("idempotent-replayed") == "true"
    assert answers[0].json()["face"]["id"] == answers[1].json()["face"]["id"]

    # No enrolment lost or duplicated: exactly the 201s are in the gallery, each once.
    answered = [c.face_id for c in load.calls if c.status == 201] + [answers[0].json()["face"]["id"]]
    assert len(answered) == len(set(answered)), "one face id answered twice"
    rows = asyncio.run(_gallery_faces(app.database_url, subject_id))
    assert set(rows) == set(answered), (f"in the gallery but never answered 201: {sorted(set(rows) - set(answered))}; "
                                        f"answered 201 but missing: {sorted(set(answered) - set(rows))}")
    for face_id, key in rows.items():
        assert key and (app.object_dir / key).is_file(), f"face {face_id} has no crop at {key}"
    # The cache is back in use: entries exist in the restarted Redis.
    assert private_redis.keys("faceserve:emb:*")
