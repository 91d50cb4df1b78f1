"""Starting a local Ray cluster and deploying faceserve onto it.

Shared by `faceserve start` and the integration tests, so the tests run the
app exactly the way a user does: `ray start` + `serve deploy` of
serve_config.yaml with the app args filled in.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIG = REPO_ROOT / "serve_config.yaml"


@dataclass
class ClusterPorts:
    # Ray's GCS defaults to 6379, Redis's port: always pick another.
    gcs: int = 6380
    dashboard: int = 8265
    metrics: int = 8080
    http: int = 8000
    http_host: str = "127.0.0.1"
    # HAProxy's stats page and Prometheus exporter (one pair per node). The
    # defaults are Ray's 8404 and 9101 for http 8000; other clusters on the
    # same host keep the same offsets from their own http port.
    haproxy_stats: int | None = None
    haproxy_metrics: int | None = None

    @property
    def haproxy_stats_port(self) -> int:
        return self.haproxy_stats if self.haproxy_stats is not None else self.http + 404

    @property
    def haproxy_metrics_port(self) -> int:
        return self.haproxy_metrics if self.haproxy_metrics is not None else self.http + 1101

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_host}:{self.http}"


PROXY_CALLBACK = "serve_app.api.proxy_admission:middlewares"


def ray_env(ports: ClusterPorts | None = None) -> dict[str, str]:
    """The environment for `ray start` and the Ray CLI; ports: the cluster's
    (only `ray start` needs them: Serve's actors read these at start)."""
    env = dict(os.environ)
    # A local ray.init() can leave a token that silently switches later
    # clusters to token auth; say what we want.
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # HTTP reaches the ingress replicas through HAProxy (C, no Ray hop): each
    # ingress replica serves HTTP itself (Serve's direct ingress). Measured
    # against Serve's Python proxy on this 2-core machine: about 20 ms less
    # CPU per identify and shed 503s at p95 86 ms instead of 138 ms
    # (docs/ARCHITECTURE.md, "HTTP edge"). k8s/base/config.yaml sets the same.
    env.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    # A stopping ingress replica keeps serving this long so HAProxy, told by
    # Serve's controller or by its own health check (every second here),
    # stops sending to it first. Ray's 30 s is sized for remote load
    # balancers; k8s keeps it.
    env.setdefault("RAY_SERVE_HAPROXY_HEALTH_CHECK_INTER", "1s")
    env.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "3")
    if ports is not None:
        env.setdefault("RAY_SERVE_HAPROXY_STATS_PORT", str(ports.haproxy_stats_port))
        env.setdefault("RAY_SERVE_HAPROXY_METRICS_PORT", str(ports.haproxy_metrics_port))
    # With HAProxy off (RAY_SERVE_ENABLE_HA_PROXY=0), Serve's Python proxies
    # shed excess image requests before the Ray hop (serve_app/api/proxy_admission.py).
    env.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", PROXY_CALLBACK)
    return env


def _bin(name: str) -> str:
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def start_ray_head(ports: ClusterPorts, *, num_cpus: int = 4, temp_dir: str | None = None) -> None:
    cmd = [
        _bin("ray"), "start", "--head",
        f"--port={ports.gcs}",
        f"--num-cpus={num_cpus}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports.dashboard}",
        f"--metrics-export-port={ports.metrics}",
        "--disable-usage-stats",
    ]
    if temp_dir:
        cmd.append(f"--temp-dir={temp_dir}")
    subprocess.run(cmd, check=True, env=ray_env(ports), capture_output=True, text=True)


def ray_running(ports: ClusterPorts) -> bool:
    try:
        with urllib.request.urlopen(f"{ports.dashboard_url}/api/version", timeout=2):
            return True
    except (urllib.error.URLError, OSError):
        return False


def stop_ray(temp_dir: str | None = None, gcs_port: int | None = None) -> None:
    """Stop the Ray cluster rooted at temp_dir, leaving any other cluster alone.

    `ray stop` stops every Ray process on the machine; with a temp_dir we
    stop only the processes of that cluster (their command lines name its
    session directory) and everything they spawned (workers rename
    themselves `ray::...`, so they are found as children).
    """
    if temp_dir is None:
        subprocess.run([_bin("ray"), "stop", "--force"], env=ray_env(), capture_output=True)
        return
    import psutil

    marker = f"{temp_dir.rstrip('/')}/session_"
    # The head's Ray client server names only the GCS address, not the session.
    address_suffix = f":{gcs_port}" if gcs_port else None
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if any(marker in part for part in cmdline) or (
                address_suffix
                and any(p.startswith("--address=") and p.endswith(address_suffix) for p in cmdline)
            ):
                roots.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    victims = {p.pid: p for p in roots}
    for proc in roots:
        try:
            for child in proc.children(recursive=True):
                victims[child.pid] = child
        except psutil.NoSuchProcess:
            continue
    for proc in victims.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(victims.values()), timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    if gcs_port:
        forget_cluster(temp_dir, gcs_port)


def forget_cluster(temp_dir: str | None, gcs_port: int) -> list[str]:
    """Remove Ray's pointer to the current cluster (`ray_current_cluster`, in the
    cluster's temp dir and in Ray's default one) when it names our GCS port, as
    `ray stop` does; otherwise a bare `ray.init()`/`ray status` waits on a dead
    GCS. A pointer to another cluster is left alone. Returns the files removed."""
    from ray._common.utils import get_ray_address_file

    removed = []
    for path in {get_ray_address_file(temp_dir), get_ray_address_file(None)}:
        try:
            with open(path) as fh:
                address = fh.read().strip()
        except OSError:
            continue
        if address.rsplit(":", 1)[-1] == str(gcs_port):
            try:
                os.remove(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def deploy_config(
    app_args: dict[str, Any],
    ports: ClusterPorts,
    *,
    overrides: dict[str, dict[str, Any]] | None = None,
    base: Path = SERVE_CONFIG,
) -> dict[str, Any]:
    """serve_config.yaml with the app's args and HTTP address filled in.

    overrides: {deployment name: {option: value}} merged into that deployment
    ("Matcher"'s into every matcher shard's too). app_args' matcher_shards > 1
    turns the `Matcher` entry into one per shard (shard_matcher_entries).
    """
    config = yaml.safe_load(base.read_text())
    config = copy.deepcopy(config)
    config["http_options"] = {"host": ports.http_host, "port": ports.http}
    app = config["applications"][0]
    app["args"] = {**app.get("args", {}), **app_args}
    app["deployments"] = shard_matcher_entries(app.get("deployments", []), int(app["args"].get("matcher_shards") or 1))
    for dep in app.get("deployments", []):
        for key, value in _overrides_for(dep["name"], overrides or {}).items():
            if isinstance(value, dict) and isinstance(dep.get(key), dict):
                dep[key] = {**dep[key], **value}
            else:
                dep[key] = value
    return config


def config_entry_of(name: str) -> str:
    """The serve_config.yaml entry a deployment takes its options from: a
    matcher shard (`Matcher-<s>`) takes the `Matcher` entry's."""
    return "Matcher" if re.fullmatch(r"Matcher-\d+", name) else name


def _overrides_for(name: str, overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {**overrides.get(config_entry_of(name), {}), **overrides.get(name, {})}


def shard_matcher_entries(deployments: list[dict[str, Any]], shards: int) -> list[dict[str, Any]]:
    """With matcher shards, the `Matcher` entry of a serve config becomes one
    entry per shard deployment (`Matcher-0` ...), each with its options: Serve
    refuses options for a deployment the app does not have. An entry named
    `Matcher-<s>` already there is kept as written."""
    if shards <= 1:
        return deployments
    out: list[dict[str, Any]] = []
    named = {d.get("name") for d in deployments}
    for dep in deployments:
        if dep.get("name") != "Matcher":
            out.append(dep)
            continue
        out += [{**copy.deepcopy(dep), "name": f"Matcher-{s}"} for s in range(shards)
                if f"Matcher-{s}" not in named]
    return out


def serve_deploy(config: dict[str, Any], ports: ClusterPorts, workdir: Path) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "serve_config.generated.yaml"
    # The generated file can hold a database URL: owner-only.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(config, fh, sort_keys=False)
    subprocess.run(
        [_bin("serve"), "deploy", str(path), "--address", ports.dashboard_url],
        check=True, env=ray_env(), capture_output=True, text=True,
    )
    return path


def serve_shutdown(ports: ClusterPorts) -> None:
    subprocess.run(
        [_bin("serve"), "shutdown", "-y", "--address", ports.dashboard_url],
        env=ray_env(), capture_output=True, text=True,
    )


def wait_ready(url: str, timeout_s: float = 300.0) -> dict[str, Any]:
    """Poll /readyz until the app answers 200; raise with the last answer."""
    deadline = time.monotonic() + timeout_s
    last: str = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as resp:
                if resp.status == 200:
                    return json.loads(resp.read())
        except urllib.error.HTTPError as err:
            last = f"{err.code} {err.read()[:300]!r}"
        except (urllib.error.URLError, OSError) as err:
            last = str(err)
        time.sleep(1.0)
    raise TimeoutError(f"faceserve at {url} not ready after {timeout_s:.0f}s: {last}")


def serve_status(ports: ClusterPorts) -> str:
    out = subprocess.run(
        [_bin("serve"), "status", "--address", ports.dashboard_url],
        env=ray_env(), capture_output=True, text=True,
    )
    return out.stdout + out.stderr
