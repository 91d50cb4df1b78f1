"""Liveness and readiness probes (no auth: the platform calls them)."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serve_app.api.deps import EdgeDep
from serve_app.api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(edge: EdgeDep) -> JSONResponse:
    checks: dict[str, bool] = await edge.ready() if edge.ready else {}
    ok = all(checks.values())
    return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)
