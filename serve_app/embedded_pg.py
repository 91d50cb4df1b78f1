"""The embedded default database: a PostgreSQL server from the pgserver wheel.

Used only when no DATABASE_URL is configured, so a new machine runs the
whole service with nothing else installed. Data lives under the data dir.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or attach to) the server under data_dir/pg; returns its URI."""
    import pgserver

    pgdata = (data_dir / "pg").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    # pgserver caches one handle per directory; after a stop that handle is
    # stale, so drop it and let get_server start the server again.
    cached = pgserver.PostgresServer._instances.get(pgdata)
    if cached is not None and not (pgdata / "postmaster.pid").exists():
        pgserver.PostgresServer._instances.pop(pgdata, None)
    # cleanup_mode=None: the server outlives this process, like a real one;
    # `faceserve stop` stops it.
    server = pgserver.get_server(str(pgdata), cleanup_mode=None)
    uri = server.get_uri()
    log.info("embedded PostgreSQL at %s", pgdata)
    return uri


def stop_embedded_postgres(data_dir: Path) -> bool:
    """Stop the embedded server if one runs there; True when one was stopped."""
    import os

    from pgserver import _commands

    pgdata = (data_dir / "pg").resolve()
    if not (pgdata / "postmaster.pid").exists():
        return False
    # As root, pgserver runs the server as its own unprivileged user.
    user = "pgserver" if os.geteuid() == 0 else None
    kwargs = {"user": user} if user else {}
    _commands.pg_ctl(["-m", "fast", "-w", "stop"], pgdata=pgdata, **kwargs)
    return True
