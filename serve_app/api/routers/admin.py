"""Keys, tenants and the audit log (admin scope)."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from serve_app.api.deps import Admin, EdgeDep
from serve_app.errors import Forbidden

router = APIRouter(prefix="/v1", tags=["admin"])

Scope = Literal["read", "enrol", "admin"]
TenantName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scopes: list[Scope] = Field(min_length=1, max_length=3)
    name: str = Field("", max_length=128, pattern=r"^[^\x00-\x1f]*$")
    requests_per_minute: int = Field(0, ge=0, le=1_000_000)


class KeyOut(BaseModel):
    key_id: str
    tenant: str
    scopes: list[str]
    name: str
    requests_per_minute: int
    created_at: str
    revoked_at: str | None


class KeyCreated(KeyOut):
    token: str = Field(description="the secret; shown once, never again")


class KeyList(BaseModel):
    keys: list[KeyOut]


class TenantIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min_enrol_liveness: Literal["off", "flag", "block"] | None = None
    requests_per_minute: int | None = Field(None, ge=0, le=10_000_000)


class TenantOut(BaseModel):
    name: str
    min_enrol_liveness: str
    requests_per_minute: int


class AuditList(BaseModel):
    entries: list[dict[str, object]]


@router.post("/keys", response_model=KeyCreated, status_code=201)
async def create_key(body: KeyIn, edge: EdgeDep, who: Admin) -> KeyCreated:
    await edge.auth.tenant(who.tenant)  # 404 for an unknown tenant
    key, token = await edge.access.create_key(who.tenant, body.scopes, name=body.name,
                                              requests_per_minute=body.requests_per_minute)
    await edge.audit(who, "key.create", key.key_id, scopes=list(key.scopes))
    return KeyCreated(**key.to_dict(), token=token)


@router.get("/keys", response_model=KeyList)
async def list_keys(edge: EdgeDep, who: Admin) -> KeyList:
    return KeyList(keys=[KeyOut(**k.to_dict()) for k in await edge.access.list_keys(who.tenant)])


@router.delete("/keys/{key_id}", response_model=KeyOut)
async def revoke_key(key_id: Annotated[str, Path(max_length=64)], edge: EdgeDep, who: Admin) -> KeyOut:
    key = await edge.access.revoke_key(key_id, who.tenant)
    edge.auth.forget(key_id)
    await edge.audit(who, "key.revoke", key_id)
    return KeyOut(**key.to_dict())


@router.put("/tenants/{name}", response_model=TenantOut)
async def put_tenant(name: TenantName, body: TenantIn, edge: EdgeDep, who: Admin) -> TenantOut:
    if not who.superuser:
        raise Forbidden("only the bootstrap key manages tenants")
    tenant = await edge.access.ensure_tenant(name, min_enrol_liveness=body.min_enrol_liveness,
                                             requests_per_minute=body.requests_per_minute)
    edge.auth.forget_tenant(name)
    await edge.audit(who, "tenant.put", name, **body.model_dump(exclude_none=True))
    return TenantOut(name=tenant.name, min_enrol_liveness=tenant.min_enrol_liveness,
                     requests_per_minute=tenant.requests_per_minute)


@router.get("/audit", response_model=AuditList)
async def audit(edge: EdgeDep, who: Admin, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                action: Annotated[str | None, Query(max_length=64)] = None) -> AuditList:
    entries = await edge.access.audit_entries(who.tenant, limit=limit, action=action)
    return AuditList(entries=[{k: (v if isinstance(v, (str, int, float, bool, dict, list, type(None))) else str(v))
                               for k, v in e.items()} for e in entries])
