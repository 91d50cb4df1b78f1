"""Who is calling, and what they may do: keys, tenants, scopes, open mode.

- A key ``fsk_<id>_<secret>`` (X-API-Key or Bearer) belongs to one tenant and
  carries scopes: read (detect/verify/identify/liveness and gallery reads),
  enrol (subjects and faces), admin (collections, keys, audit).
- The bootstrap key (FACESERVE_API_KEY) is an admin of every tenant.
- With no bootstrap key and no active key at all, the service is open: every
  caller is an admin of the default tenant (the CLI then binds 127.0.0.1).
Lookups are cached for a few seconds, so a revoked key stops working within
``cache_ttl_s``; while Postgres is out of reach the last good answer is used
for up to ``stale_s`` (services/last_good.py).
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Protocol

from serve_app.errors import Forbidden, InvalidRequest, NotFound, Unauthorized
from serve_app.gallery.access import SCOPES, ApiKey, Tenant, secret_matches, split_token
from serve_app.services.last_good import LastGood

POLICY_ORDER = ("off", "flag", "block")


class AccessRepo(Protocol):
    async def get_key(self, key_id: str) -> ApiKey | None: ...
    async def get_tenant(self, name: str) -> Tenant | None: ...
    async def any_keys(self) -> bool: ...


@dataclass(frozen=True)
class Principal:
    tenant: str
    actor: str  # key id, "bootstrap" or "open:<ip>": names the caller in quotas and the audit log
    scopes: frozenset[str]
    requests_per_minute: int = 0  # this key's own limit; 0 = the service default
    superuser: bool = False  # the bootstrap key: may act for any tenant

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise Forbidden(f"this key lacks the {scope!r} scope", scope=scope)

    def acting_for(self, tenant: str | None) -> "Principal":
        """The bootstrap key may name another tenant (?tenant=); others may not."""
        if tenant is None or tenant == self.tenant:
            return self
        if not self.superuser:
            raise InvalidRequest("only the bootstrap key may act for another tenant", tenant=tenant)
        return Principal(tenant, self.actor, self.scopes, self.requests_per_minute, True)


def stronger_policy(requested: str, minimum: str) -> str:
    """The stricter of two liveness policies (off < flag < block)."""
    return max(requested, minimum, key=POLICY_ORDER.index)


class Authenticator:
    def __init__(self, repo: AccessRepo, bootstrap_key: bytes | None, *, cache_ttl_s: float = 5.0,
                 stale_s: float = 300.0) -> None:
        self.repo = repo
        self.bootstrap = bootstrap_key
        # Keys, tenants and open mode are re-read every cache_ttl_s; while
        # Postgres is out of reach the last good answer serves up to stale_s
        # (services/last_good.py), so reads go on through a database outage.
        self._keys: LastGood[str, ApiKey | None] = LastGood(ttl_s=cache_ttl_s, stale_s=stale_s)
        self._tenants: LastGood[str, Tenant | None] = LastGood(ttl_s=cache_ttl_s, stale_s=stale_s)
        self._open: LastGood[str, bool] = LastGood(ttl_s=cache_ttl_s, stale_s=stale_s)

    def set_bounds(self, *, ttl_s: float | None = None, stale_s: float | None = None) -> None:
        for cache in (self._keys, self._tenants, self._open):
            if ttl_s is not None:
                cache.ttl_s = ttl_s
            if stale_s is not None:
                cache.stale_s = stale_s

    async def authenticate(self, headers: Any, client_host: str) -> Principal:
        token = headers.get("x-api-key", "")
        auth = headers.get("authorization", "")
        if not token and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        if not token:
            if await self.is_open():
                return Principal("default", f"open:{client_host}", frozenset(SCOPES))
            raise Unauthorized("missing API key (X-API-Key header or Bearer token)")
        if self.bootstrap is not None and hmac.compare_digest(token.encode(), self.bootstrap):
            return Principal("default", "bootstrap", frozenset(SCOPES), superuser=True)
        parts = split_token(token)
        key = await self._key(parts[0]) if parts else None
        if parts is None or key is None or key.revoked_at is not None or not secret_matches(key, parts[1]):
            raise Unauthorized("wrong or revoked API key")
        return Principal(key.tenant, key.key_id, frozenset(key.scopes), key.requests_per_minute)

    async def is_open(self) -> bool:
        if self.bootstrap is not None:
            return False
        return await self._open.get("open", self._no_keys)

    async def _no_keys(self) -> bool:
        return not await self.repo.any_keys()

    async def tenant(self, name: str) -> Tenant:
        found = await self._tenants.get(name, lambda: self.repo.get_tenant(name))
        if found is None:
            raise NotFound(f"no tenant named {name!r}", tenant=name)
        return found

    async def _key(self, key_id: str) -> ApiKey | None:
        return await self._keys.get(key_id, lambda: self.repo.get_key(key_id))

    async def sigv4_credentials(self, access_key_id: str) -> tuple[str, Principal] | None:
        """The SigV4 secret and the caller for an AWS access key id (the Rekognition API).
        Only sha256(secret) is stored, so a key's secret access key is that digest in hex;
        the access key id "bootstrap" signs with the bootstrap key itself."""
        if access_key_id == "bootstrap":
            if self.bootstrap is None:
                return None
            return (self.bootstrap.decode("utf-8", "replace"),
                    Principal("default", "bootstrap", frozenset(SCOPES), superuser=True))
        key = await self._key(access_key_id) if 0 < len(access_key_id) <= 128 else None
        if key is None or key.revoked_at is not None:
            return None
        return key.secret_sha256.hex(), Principal(key.tenant, key.key_id, frozenset(key.scopes),
                                                  key.requests_per_minute)

    def forget_tenant(self, name: str) -> None:
        self._tenants.pop(name, None)

    def forget(self, key_id: str) -> None:
        """Drop a cached key at once (after a revoke through this replica)."""
        self._keys.pop(key_id)
        self._open.clear()


def quota_subject(principal: Principal) -> str:
    """What the per-key quota counts: the key id, or the caller's IP when open."""
    return principal.actor if not principal.actor.startswith("open:") else "ip:" + principal.actor[5:]


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
