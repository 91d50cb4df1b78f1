"""One real faceserve per test session: Ray head + `serve deploy` + real Postgres.

The app is started exactly as `faceserve start` does it (serve_app.cluster),
on ports of its own so a developer's running instance is left alone, against
a fresh database on the PostgreSQL server at 127.0.0.1:5432 that is dropped
afterwards.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest

from serve_app import cluster
from serve_app.gallery.repository import GalleryRepository, create_pool
from tests.conftest import MODELS_DIR
from tests.integration.otlp_receiver import OTLPReceiver
from tests.pgtools import acreate_database, adrop_database, create_database, drop_database

REDIS_URL = os.environ.get("FACESERVE_TEST_REDIS", "redis://127.0.0.1:6379/0")
# The session app runs with a bootstrap key, as a production deployment would;
# LiveApp.client() sends it. Tenant tests make their own keys with it.
BOOTSTRAP_KEY = "it-bootstrap-key-0123456789"
PORTS = cluster.ClusterPorts(gcs=6390, dashboard=8275, metrics=8090, http=18000)

# Small, fixed replica counts: a 2-core machine, and tests want determinism.
TEST_OVERRIDES: dict[str, dict[str, Any]] = {
    name: {
        "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
        "ray_actor_options": {"num_cpus": 0.1},
    }
    for name in ("Ingress", "Detector", "Embedder", "Liveness", "Matcher")
}
# Snapshot after a few changes, so the restart test starts the matcher from
# an index snapshot plus log replay rather than from Postgres alone.
TEST_OVERRIDES["Matcher"]["user_config"] = {"snapshot_every": 2}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
    # The failover test runs its own three-node cluster, and the database and
    # Redis outage drills their own apps against a private PostgreSQL / Redis:
    # run them before the session app exists, so two clusters or apps never
    # share the ports.
    first = {"test_failover.py": 0, "test_db_outage.py": 1, "test_redis_outage.py": 1, "test_matcher_shards.py": 1}
    items.sort(key=lambda item: first.get(Path(str(item.fspath)).name, 2))




@dataclass
class LiveApp:
    url: str
    database_url: str
    object_dir: Path
    ports: cluster.ClusterPorts
    workdir: Path
    traces: OTLPReceiver
    redis_url: str = REDIS_URL
    app_args: dict[str, Any] = field(default_factory=dict)  # more build_app args (e.g. matcher_shards)

    def client(self, *, key: str | None = BOOTSTRAP_KEY, timeout: float = 120, **kw: Any) -> httpx.Client:
        headers = {"x-api-key": key} if key else {}
        return httpx.Client(base_url=self.url, timeout=timeout, headers=headers, **kw)

    def redeploy(self, overrides: dict[str, dict[str, Any]] | None = None) -> None:
        """Take the app down and deploy it again (a restart of every replica)."""
        cluster.serve_shutdown(self.ports)
        cluster.serve_deploy(self._config(overrides), self.ports, self.workdir)
        cluster.wait_ready(self.url, timeout_s=300)

    def reconfigure(self, overrides: dict[str, dict[str, Any]]) -> None:
        """Deploy changed options (e.g. user_config) over the running app, no restart."""
        cluster.serve_deploy(self._config(overrides), self.ports, self.workdir)

    def _config(self, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
        merged = {k: dict(v) for k, v in TEST_OVERRIDES.items()}
        for name, opts in (overrides or {}).items():
            merged.setdefault(name, {}).update(opts)
        return cluster.deploy_config(
            {
                "database_url": self.database_url,
                "object_store_url": f"file://{self.object_dir}",
                "models_dir": str(MODELS_DIR),
                "redis_url": self.redis_url,
                "api_key": BOOTSTRAP_KEY,
                # snapshots are signed and verified (the restart test loads them)
                "snapshot_key": "it-snapshot-signing-key",
                "trace_exporter": "otlp",
                "otlp_endpoint": self.traces.endpoint,
                "trace_schedule_delay_ms": 200,
                **self.app_args,
            },
            self.ports,
            overrides=merged,
        )


@contextlib.contextmanager
def running_live_app(name: str, database_url: str | None = None, redis_url: str | None = None,
                     app_args: dict[str, Any] | None = None) -> Iterator[LiveApp]:
    """A Ray head (unless one runs) + `serve deploy` on a fresh database named
    after ``name`` (or on ``database_url``, a server the caller owns), with
    ``app_args`` added to the app's args; everything it started is torn down
    afterwards."""
    dbname, dsn = create_database(name) if database_url is None else (None, database_url)
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    app = LiveApp(
        url=PORTS.http_url,
        database_url=dsn,
        object_dir=workdir / "objects",
        ports=PORTS,
        workdir=workdir,
        traces=OTLPReceiver().start(),
        redis_url=redis_url or REDIS_URL,
        app_args=dict(app_args or {}),
    )
    started_ray = False
    try:
        if not cluster.ray_running(PORTS):
            cluster.start_ray_head(PORTS, num_cpus=4, temp_dir="/tmp/ray-faceserve-it")
            started_ray = True
        cluster.serve_deploy(app._config(), PORTS, workdir)
        try:
            cluster.wait_ready(app.url, timeout_s=420)
        except TimeoutError:
            print(cluster.serve_status(PORTS))
            raise
        yield app
    finally:
        cluster.serve_shutdown(PORTS)
        if started_ray:
            cluster.stop_ray("/tmp/ray-faceserve-it", gcs_port=PORTS.gcs)
        if dbname is not None:
            drop_database(dbname)
        shutil.rmtree(workdir, ignore_errors=True)
        app.traces.stop()


@pytest.fixture(scope="session")
def live_app() -> Iterator[LiveApp]:
    with running_live_app("faceserve_it") as app:
        yield app


@pytest.fixture()
def client(live_app: LiveApp) -> Iterator[httpx.Client]:
    with live_app.client() as c:
        yield c


@pytest.fixture()
async def repo() -> AsyncIterator[GalleryRepository]:
    """A GalleryRepository on a fresh, migrated database of its own (no Ray)."""
    name, dsn = await acreate_database("faceserve_repo")
    pool = await create_pool(dsn, min_size=1, max_size=8)
    try:
        yield GalleryRepository(pool)
    finally:
        await pool.close()
        await adrop_database(name)
