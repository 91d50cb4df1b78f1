"""Throwaway databases on a real PostgreSQL server, for tests and benchmarks.

Each run creates a database of its own on the server (the machine's
127.0.0.1:5432 by default) and drops it afterwards, so runs never see each
other's galleries.
"""
from __future__ import annotations

import asyncio
import os
import uuid

import asyncpg

ADMIN_DSN = os.environ.get("FACESERVE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def dsn_for(dbname: str, admin_dsn: str = ADMIN_DSN) -> str:
    base, _, _ = admin_dsn.rpartition("/")
    return f"{base}/{dbname}"


async def admin(sql: str, admin_dsn: str = ADMIN_DSN) -> None:
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def acreate_database(prefix: str, admin_dsn: str = ADMIN_DSN) -> tuple[str, str]:
    """(name, dsn) of a new empty database."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    await admin(f'CREATE DATABASE "{name}"', admin_dsn)
    return name, dsn_for(name, admin_dsn)


async def adrop_database(name: str, admin_dsn: str = ADMIN_DSN) -> None:
    await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', admin_dsn)


def create_database(prefix: str, admin_dsn: str = ADMIN_DSN) -> tuple[str, str]:
    return asyncio.run(acreate_database(prefix, admin_dsn))


def drop_database(name: str, admin_dsn: str = ADMIN_DSN) -> None:
    asyncio.run(adrop_database(name, admin_dsn))
