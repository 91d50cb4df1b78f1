"""Start a real faceserve for a benchmark run (or use one given by --url).

Same path as the integration tests: a Ray head on its own ports, `serve
deploy` of serve_config.yaml, and a throwaway database on the PostgreSQL
named by FACESERVE_BENCH_PG (default: the local server's `test` database)
that is dropped afterwards.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


from serve_app import cluster
from tests.pgtools import create_database, drop_database

ADMIN_DSN = os.environ.get("FACESERVE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
PORTS = cluster.ClusterPorts(gcs=6395, dashboard=8285, metrics=8095, http=18100)
SHARED = Path(__file__).resolve().parents[2] / "shared"



@contextlib.contextmanager
def running_app(
    url: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    app_args: dict[str, Any] | None = None,
) -> Iterator[str]:
    """Yield the base URL of a ready faceserve; tears down what it started.

    overrides: per-deployment options merged into serve_config.yaml;
    app_args: extra settings for build_app (e.g. trace_exporter, metrics_enabled).
    """
    if url:
        yield url
        return
    dbname, dsn = create_database("faceserve_bench", ADMIN_DSN)
    workdir = Path(tempfile.mkdtemp(prefix="faceserve-bench-"))
    started = False
    try:
        if not cluster.ray_running(PORTS):
            cluster.start_ray_head(PORTS, num_cpus=4, temp_dir="/tmp/ray-faceserve-bench")
            started = True
        config = cluster.deploy_config(
            {
                "database_url": dsn,
                "object_store_url": f"file://{workdir / 'objects'}",
                "models_dir": str(SHARED / "models"),
                **(app_args or {}),
            },
            PORTS,
            overrides=overrides,
        )
        cluster.serve_deploy(config, PORTS, workdir)
        cluster.wait_ready(PORTS.http_url, timeout_s=420)
        yield PORTS.http_url
    finally:
        cluster.serve_shutdown(PORTS)
        if started:
            cluster.stop_ray("/tmp/ray-faceserve-bench", gcs_port=PORTS.gcs)
        drop_database(dbname, ADMIN_DSN)
        shutil.rmtree(workdir, ignore_errors=True)
