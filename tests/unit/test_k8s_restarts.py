"""Restart limits: the seed's promise is "auto-restart on failure with at
most 3 attempts". Kubernetes restarts long-running Pods without a bound
(test_k8s_ha checks they do restart); wherever a platform offers a bound, it
is set to 3 attempts (docs/DEPLOY.md, "Restart limits")."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.unit.k8s_support import manifests

M = manifests()
ATTEMPTS = 3


@pytest.mark.parametrize("target", ["dev", "ha"])
def test_jobs_make_at_most_three_attempts(target):
    jobs = M.find(M.rendered(target), "Job")
    assert jobs
    for job in jobs:
        # backoffLimit counts retries: 2 retries = 3 attempts.
        assert job["spec"]["backoffLimit"] == ATTEMPTS - 1, job["metadata"]["name"]


def test_rayjob_makes_at_most_three_attempts():
    (rayjob,) = M.find(M.rendered("enroll-folder"), "RayJob")
    spec = rayjob["spec"]
    assert spec["backoffLimit"] == ATTEMPTS - 1  # new RayClusters after a failure
    assert spec["submitterConfig"]["backoffLimit"] == ATTEMPTS - 1  # submitter Pods


@pytest.mark.parametrize("target", ["dev", "ha"])
def test_serve_replica_start_retries_are_pinned_on_every_ray_pod(target):
    objs = M.rendered(target)
    config = M.one(objs, "ConfigMap", "faceserve-config")["data"]
    assert config["RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT"] == str(ATTEMPTS)
    (rayservice,) = M.find(objs, "RayService")
    for where, tmpl in M.pod_templates(rayservice):
        # The head runs the Serve controller, which applies the limit.
        c = tmpl["spec"]["containers"][0]
        assert {"configMapRef": {"name": "faceserve-config"}} in c["envFrom"], where


def test_installed_ray_serve_reads_that_variable():
    """The setting is a real knob of the Ray we install: a rename in an
    upgrade would silently drop the limit."""
    code = ("from ray.serve._private.constants import MAX_PER_REPLICA_RETRY_COUNT as n; "
            "print(n)")
    env = dict(os.environ, RAY_SERVE_MAX_PER_REPLICA_RETRY_COUNT="7")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout.strip() == "7"


def test_serve_replicas_take_no_max_restarts():
    """Ray's max_restarts is not a Serve deployment option: Serve replaces
    failed replicas itself, so serveConfigV2 has no restart count to set
    (docs/DEPLOY.md, "Restart limits")."""
    from ray.serve._private.config import ReplicaConfig

    with pytest.raises(ValueError, match="max_restarts"):
        ReplicaConfig.create(lambda: None, ray_actor_options={"max_restarts": 3})
