"""Bulk jobs as the service sees them: the reports finished jobs left behind.

A bulk enrolment runs as a Ray job (serve_app/jobs/enroll.py) and writes its
report to object storage under reports/enroll/<tenant>/<collection>/<stamp>.json.
These routes list a collection's reports (newest first) and return one.
Jobs still running are on the Ray dashboard's job page; they appear here
when they finish.
"""
from __future__ import annotations

import asyncio
import json
import posixpath
from typing import Annotated, Any

from fastapi import APIRouter, Path
from pydantic import BaseModel

from serve_app.api.deps import EdgeDep, ReadCollection, Reader
from serve_app.errors import NotFound

router = APIRouter(prefix="/v1", tags=["jobs"])

MAX_REPORT_BYTES = 8_000_000


class JobOut(BaseModel):
    id: str
    state: str
    progress: float
    report_key: str


class JobList(BaseModel):
    jobs: list[JobOut]


def _prefix(tenant: str, collection: str) -> str:
    return f"reports/enroll/{tenant}/{collection}/"


@router.get("/jobs", response_model=JobList)
async def list_jobs(edge: EdgeDep, who: Reader, col: ReadCollection) -> JobList:
    keys = await asyncio.to_thread(edge.gallery.objects.list_keys, _prefix(who.tenant, col.name))
    reports = sorted((k for k in keys if k.endswith(".json")), reverse=True)
    return JobList(jobs=[JobOut(id=posixpath.basename(k)[:-5], state="finished", progress=1.0, report_key=k)
                         for k in reports])


@router.get("/jobs/{job_id}")
async def get_job(job_id: Annotated[str, Path(pattern=r"^[0-9A-Za-z_.-]{1,64}$")], edge: EdgeDep, who: Reader,
                  col: ReadCollection) -> dict[str, Any]:
    key = _prefix(who.tenant, col.name) + f"{job_id}.json"
    try:
        data = await edge.gallery.objects.aget(key)
    except FileNotFoundError:
        raise NotFound(f"no finished job {job_id!r} in this collection", job_id=job_id) from None
    if len(data) > MAX_REPORT_BYTES:
        head = json.loads(data[: data.index(b', "images": [')] + b"}")
        return {"id": job_id, "state": "finished", **head, "images_truncated": True}
    return {"id": job_id, "state": "finished", **json.loads(data)}
