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


def test_only_name_component_and_entrypoint_differ_from_the_enrolment_job() -> None:
    job, enrol = _job("reembed"), _job("enroll-folder")
    assert job["metadata"]["name"] == "faceserve-reembed"
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "reembed"
    assert job["metadata"]["namespace"] == enrol["metadata"]["namespace"] == "faceserve"
    for obj in (job, enrol):
        obj["metadata"].pop("name"), obj["metadata"]["labels"].pop("app.kubernetes.io/component")
        obj["spec"].pop("entrypoint")
    assert job == enrol  # same image, secrets, resources and retry limits
