"""The re-embed RayJob: the enrolment job's cluster with its own name and entrypoint."""
from __future__ import annotations

import shlex

from serve_app.jobs import reembed
from tests.unit.k8s_support import manifests

M = manifests()


def _job(target: str) -> dict:
    (job,) = M.find(M.rendered(target), "RayJob")
    return job


def test_entrypoint_is_the_reembed_job_with_arguments_it_accepts() -> None:
    argv = shlex.split(_job("reembed")["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "serve_app.jobs.reembed"]
    args = reembed.parse_args(argv[3:])
    assert args.collection and args.model


def test_parsing_a_job_command_line_starts_no_database(monkeypatch, tmp_path) -> None:
    """With no DATABASE_URL the jobs fall back to `faceserve start`'s embedded
    PostgreSQL, but only when they run: checking arguments (this file, a
    dry look at the RayJob) must not leave a server behind."""
    from serve_app import embedded_pg
    from serve_app.jobs import enroll

    started: list[object] = []
    monkeypatch.setattr(embedded_pg, "start_embedded_postgres", lambda d: started.append(d) or "postgresql://x/y")
    for var in ("DATABASE_URL", "FACESERVE_DATABASE_URL", "FACESERVE_OBJECT_STORE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    assert reembed.parse_args(["--collection", "c", "--model", "sface_flip"]).database_url is None
    assert enroll.parse_args(["--source", str(tmp_path), "--collection", "c"]).database_url is None
    assert started == []
    args = enroll.parse_args(["--source", str(tmp_path), "--collection", "c", "--data-dir", str(tmp_path)])
    enroll._defaults_from_data_dir(args)  # what main() does before running
    assert started == [tmp_path] and args.database_url == "postgresql://x/y"


def test_only_name_component_and_entrypoint_differ_from_the_enrolment_job() -> None:
    job, enrol = _job("reembed"), _job("enroll-folder")
    assert job["metadata"]["name"] == "faceserve-reembed"
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "reembed"
    assert job["metadata"]["namespace"] == enrol["metadata"]["namespace"] == "faceserve"
    for obj in (job, enrol):
        obj["metadata"].pop("name"), obj["metadata"]["labels"].pop("app.kubernetes.io/component")
        obj["spec"].pop("entrypoint")
    assert job == enrol  # same image, secrets, resources and retry limits
