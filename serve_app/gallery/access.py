"""Tenants, API keys and the audit log: the SQL behind who may do what.

Keys look like ``fsk_<key_id>_<secret>``. The key id is public (it names the
key in listings, quotas and the audit log); only sha256(secret) is stored,
and the secret is shown once, at creation. 32 random bytes need no slow
hash: there is nothing to brute-force.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from serve_app.errors import Conflict, InvalidRequest, NotFound

SCOPES = ("read", "enrol", "admin")
KEY_PREFIX = "fsk_"


class KeyNotFound(NotFound):
    code = "key_not_found"


@dataclass(frozen=True)
class Tenant:
    name: str
    min_enrol_liveness: str = "off"
    requests_per_minute: int = 0


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    tenant: str
    scopes: tuple[str, ...]
    name: str
    requests_per_minute: int
    created_at: datetime
    revoked_at: datetime | None
    secret_sha256: bytes = b""

    def to_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "tenant": self.tenant, "scopes": list(self.scopes), "name": self.name,
                "requests_per_minute": self.requests_per_minute, "created_at": self.created_at.isoformat(),
                "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None}


def split_token(token: str) -> tuple[str, str] | None:
    """``fsk_<key_id>_<secret>`` -> (key_id, secret), or None if it is not one."""
    if not token.startswith(KEY_PREFIX):
        return None
    parts = token[len(KEY_PREFIX):].split("_", 1)
    if len(parts) != 2 or not parts[0] or not parts[1] or len(token) > 200:
        return None
    return parts[0], parts[1]


def secret_matches(key: ApiKey, secret: str) -> bool:
    return hmac.compare_digest(hashlib.sha256(secret.encode()).digest(), key.secret_sha256)


def _key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(row["key_id"], row["tenant"], tuple(row["scopes"]), row["name"], row["requests_per_minute"],
                  row["created_at"], row["revoked_at"], bytes(row["secret_sha256"]))


def check_scopes(scopes: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise InvalidRequest(f"scopes must be a non-empty subset of {list(SCOPES)}; got {list(scopes)}")
    return tuple(dict.fromkeys(scopes))


class AccessRepository:
    def __init__(self, pool: asyncpg.Pool, *, acquire_timeout_s: float = 3.0) -> None:
        self.pool = pool
        self.acquire_timeout_s = acquire_timeout_s

    # --- tenants -----------------------------------------------------------------------
    async def ensure_tenant(self, name: str, *, min_enrol_liveness: str | None = None,
                            requests_per_minute: int | None = None) -> Tenant:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            try:
                row = await conn.fetchrow(
                    """INSERT INTO tenants (name, min_enrol_liveness, requests_per_minute)
                       VALUES ($1, coalesce($2, 'off'), coalesce($3, 0))
                       ON CONFLICT (name) DO UPDATE SET
                         min_enrol_liveness = coalesce($2, tenants.min_enrol_liveness),
                         requests_per_minute = coalesce($3, tenants.requests_per_minute)
                       RETURNING name, min_enrol_liveness, requests_per_minute""",
                    name, min_enrol_liveness, requests_per_minute)
            except asyncpg.CheckViolationError as exc:
                raise InvalidRequest(f"tenant settings refused: {exc.message}") from None
        return Tenant(**dict(row))

    async def get_tenant(self, name: str) -> Tenant | None:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            row = await conn.fetchrow(
                "SELECT name, min_enrol_liveness, requests_per_minute FROM tenants WHERE name = $1", name)
        return Tenant(**dict(row)) if row else None

    # --- keys ----------------------------------------------------------------------------
    async def create_key(self, tenant: str, scopes: list[str] | tuple[str, ...], *, name: str = "",
                         requests_per_minute: int = 0) -> tuple[ApiKey, str]:
        """Returns the key and its token; the token is never retrievable again."""
        scopes = check_scopes(scopes)
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            try:
                row = await conn.fetchrow(
                    """INSERT INTO api_keys (key_id, tenant, secret_sha256, scopes, name, requests_per_minute)
                       VALUES ($1, $2, $3, $4, $5, $6) RETURNING *""",
                    key_id, tenant, hashlib.sha256(secret.encode()).digest(), list(scopes), name,
                    requests_per_minute)
            except asyncpg.ForeignKeyViolationError:
                raise NotFound(f"no tenant named {tenant!r}", tenant=tenant) from None
            except asyncpg.UniqueViolationError:  # 64 random bits colliding: try again
                raise Conflict("key id collision; retry") from None
        return _key(row), f"{KEY_PREFIX}{key_id}_{secret}"

    async def get_key(self, key_id: str) -> ApiKey | None:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            row = await conn.fetchrow("SELECT * FROM api_keys WHERE key_id = $1", key_id)
        return _key(row) if row else None

    async def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            rows = await conn.fetch(
                "SELECT * FROM api_keys WHERE $1::text IS NULL OR tenant = $1 ORDER BY created_at, key_id", tenant)
        return [_key(r) for r in rows]

    async def revoke_key(self, key_id: str, tenant: str | None = None) -> ApiKey:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            row = await conn.fetchrow(
                """UPDATE api_keys SET revoked_at = coalesce(revoked_at, now())
                   WHERE key_id = $1 AND ($2::text IS NULL OR tenant = $2) RETURNING *""", key_id, tenant)
        if row is None:
            raise KeyNotFound(f"no key {key_id!r}", key_id=key_id)
        return _key(row)

    async def any_keys(self) -> bool:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            return bool(await conn.fetchval("SELECT EXISTS (SELECT 1 FROM api_keys WHERE revoked_at IS NULL)"))

    # --- audit ---------------------------------------------------------------------------
    async def audit(self, tenant: str, actor: str, action: str, target: str = "", *,
                    trace_id: str | None = None, details: dict[str, Any] | None = None) -> None:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            await conn.execute(
                "INSERT INTO audit_log (tenant, actor, action, target, trace_id, details) VALUES ($1,$2,$3,$4,$5,$6)",
                tenant, actor, action, target, trace_id, details or {})

    async def audit_entries(self, tenant: str | None, *, limit: int = 100,
                            action: str | None = None) -> list[dict[str, Any]]:
        async with self.pool.acquire(timeout=self.acquire_timeout_s) as conn:
            rows = await conn.fetch(
                """SELECT id, at, tenant, actor, action, target, trace_id, details FROM audit_log
                   WHERE ($1::text IS NULL OR tenant = $1) AND ($2::text IS NULL OR action = $2)
                   ORDER BY id DESC LIMIT $3""", tenant, action, limit)
        return [{**dict(r), "at": r["at"].isoformat()} for r in rows]
