"""A multi-node Ray cluster on one machine: a head and worker nodes joined with
`ray start --address`, each node with its own ports, all under one temp dir.

Used by test_failover.py. Built on serve_app.cluster (ray_env, the `ray`
binary, stop_ray) so the nodes start the way `faceserve start` starts one.

On one machine every node shares the IP address, so everything a node binds
gets a port of its own here:

- the head: GCS, dashboard, metrics, ray client server, dashboard agent,
  runtime-env agent, node and object manager, and a worker-port range;
- each worker: the same per-node ports, and its own Serve proxy HTTP port
  (RAY_SERVE_WORKER_PROXY_HTTP_PORT in that node's environment; Ray Serve's
  head proxy keeps http_options.port). Without it every proxy would bind the
  same address with SO_REUSEPORT and the kernel would spread connections over
  all of them, so a client could not pick a proxy on a node that survives.

A worker is "crashed" by SIGKILL to its raylet, everything the raylet spawned
(replicas, proxy, agents) and its log monitor: no graceful drain, as when a
machine or Pod disappears.
"""
from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import psutil

from serve_app import cluster


@dataclass(frozen=True)
class NodePorts:
    """Every port one node binds. index 0 is the head."""

    index: int
    base: int = 20000

    def _p(self, offset: int) -> int:
        return self.base + 100 * self.index + offset

    @property
    def ray_client(self) -> int:
        return self._p(1)

    @property
    def agent_listen(self) -> int:
        return self._p(2)

    @property
    def agent_grpc(self) -> int:
        return self._p(3)

    @property
    def runtime_env_agent(self) -> int:
        return self._p(4)

    @property
    def node_manager(self) -> int:
        return self._p(5)

    @property
    def object_manager(self) -> int:
        return self._p(6)

    @property
    def min_worker(self) -> int:
        return self.base + 1000 + 500 * self.index

    @property
    def max_worker(self) -> int:
        return self.min_worker + 499

    def all(self) -> list[int]:
        return [self.ray_client, self.agent_listen, self.agent_grpc, self.runtime_env_agent,
                self.node_manager, self.object_manager]


@dataclass
class WorkerNode:
    name: str
    ports: NodePorts
    num_cpus: float
    metrics_port: int
    proxy_http_port: int
    node_id: str | None = None

    @property
    def marker_resource(self) -> str:
        # Only to recognise the node in the state API; nothing asks for it.
        return f"faceserve_ha_{self.name}"


@dataclass
class LocalCluster:
    """Head + workers on this machine; stop() removes only this cluster's processes."""

    ports: cluster.ClusterPorts
    temp_dir: str
    head_ports: NodePorts = field(default_factory=lambda: NodePorts(0))
    object_store_bytes: int = 200_000_000
    workers: dict[str, WorkerNode] = field(default_factory=dict)
    head_node_id: str | None = None

    # ------------------------------------------------------------------ start
    def ports_in_use(self, extra: list[int]) -> list[int]:
        wanted = [self.ports.gcs, self.ports.dashboard, self.ports.metrics, self.ports.http,
                  *self.head_ports.all(), *extra]
        busy = []
        for port in wanted:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("0.0.0.0", port))
                except OSError:
                    busy.append(port)
        return busy

    def start_head(self, *, num_cpus: float = 0) -> str:
        hp = self.head_ports
        _ray_start(
            [
                "--head",
                f"--port={self.ports.gcs}",
                f"--num-cpus={num_cpus}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.ports.dashboard}",
                f"--metrics-export-port={self.ports.metrics}",
                f"--ray-client-server-port={hp.ray_client}",
                f"--temp-dir={self.temp_dir}",
                *self._node_args(hp),
            ],
            cluster.ray_env(self.ports),
        )
        _wait(lambda: cluster.ray_running(self.ports), 60, "dashboard of the head")
        self.head_node_id = _wait(
            lambda: next((n["node_id"] for n in self.nodes() if n["is_head_node"]), None),
            60, "head node in the state API",
        )
        return self.head_node_id

    def add_worker(self, name: str, index: int, *, num_cpus: float = 2) -> WorkerNode:
        node = WorkerNode(
            name=name,
            ports=NodePorts(index, self.head_ports.base),
            num_cpus=num_cpus,
            metrics_port=self.ports.metrics + index,
            proxy_http_port=self.ports.http + index,
        )
        env = cluster.ray_env()
        env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(node.proxy_http_port)
        # Each node's HAProxy needs its own stats and exporter ports on a shared host.
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(self.ports.haproxy_stats_port + index)
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(self.ports.haproxy_metrics_port + index)
        _ray_start(
            [
                f"--address=127.0.0.1:{self.ports.gcs}",
                f"--num-cpus={num_cpus}",
                f"--resources={json.dumps({node.marker_resource: 1})}",
                f"--metrics-export-port={node.metrics_port}",
                *self._node_args(node.ports),
            ],
            env,
        )

        def find() -> str | None:
            for n in self.nodes():
                if n["state"] == "ALIVE" and node.marker_resource in (n.get("resources_total") or {}):
                    return n["node_id"]
            return None

        node.node_id = _wait(find, 60, f"worker {name} in the state API")
        self.workers[name] = node
        return node

    def _node_args(self, p: NodePorts) -> list[str]:
        return [
            f"--node-manager-port={p.node_manager}",
            f"--object-manager-port={p.object_manager}",
            f"--dashboard-agent-listen-port={p.agent_listen}",
            f"--dashboard-agent-grpc-port={p.agent_grpc}",
            f"--runtime-env-agent-port={p.runtime_env_agent}",
            f"--min-worker-port={p.min_worker}",
            f"--max-worker-port={p.max_worker}",
            f"--object-store-memory={self.object_store_bytes}",
            "--disable-usage-stats",
        ]

    # ------------------------------------------------------------------ state
    def nodes(self) -> list[dict[str, Any]]:
        from ray.util.state import list_nodes

        return [
            {
                "node_id": n.node_id,
                "state": n.state,
                "is_head_node": n.is_head_node,
                "resources_total": n.resources_total,
            }
            for n in list_nodes(address=self.ports.dashboard_url, timeout=10, raise_on_missing_output=False)
        ]

    def node_state(self, node_id: str) -> str | None:
        return next((n["state"] for n in self.nodes() if n["node_id"] == node_id), None)

    def serve_applications(self) -> dict[str, Any]:
        """GET /api/serve/applications/ on the dashboard (what `serve status` reads)."""
        with urllib.request.urlopen(f"{self.ports.dashboard_url}/api/serve/applications/", timeout=10) as r:
            return json.loads(r.read())

    # ------------------------------------------------------------------ crash
    def node_processes(self, name: str) -> list[psutil.Process]:
        """The worker's raylet, all it spawned, and its log monitor."""
        node = self.workers[name]
        raylet = None
        for proc in psutil.process_iter(["name", "cmdline"]):
            try:
                cmd = proc.info["cmdline"] or []
                if any(a == f"--node_id={node.node_id}" for a in cmd) and any(
                    a.startswith("--raylet_socket_name=") for a in cmd
                ):
                    raylet = proc
                    break
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        if raylet is None:
            raise RuntimeError(f"no raylet found for worker {name} ({node.node_id})")
        socket_arg = next(a for a in raylet.cmdline() if a.startswith("--raylet_socket_name="))
        session_dir = socket_arg.split("=", 1)[1].rsplit("/sockets/", 1)[0]
        # raylet.<n> <-> log_monitor.<n>.out: the node's own log monitor.
        suffix = socket_arg.rsplit("/raylet", 1)[1]  # ".1", ".2" ("" is the head)
        victims = [raylet, *raylet.children(recursive=True)]
        if suffix:
            log_out = f"{session_dir}/logs/log_monitor{suffix}.out"
            for proc in psutil.process_iter(["cmdline"]):
                try:
                    if any(a == f"--stdout-filepath={log_out}" for a in proc.info["cmdline"] or []):
                        victims.append(proc)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        return victims

    def crash_worker(self, name: str) -> list[int]:
        """SIGKILL the worker node's processes all at once; returns their pids."""
        victims = self.node_processes(name)
        for proc in victims:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(victims, timeout=10)
        return [p.pid for p in victims]

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        cluster.stop_ray(self.temp_dir)
        # stop_ray finds processes by the session dir in their command line;
        # the head's Ray client server (`python -m ray.util.client.server`)
        # has none there and would outlive the cluster, holding its port.
        port_arg = f"--port={self.head_ports.ray_client}"
        gcs_suffix = f":{self.ports.gcs}"
        leftovers = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                cmd = proc.info["cmdline"] or []
                if "ray.util.client.server" in cmd and port_arg in cmd and any(
                    a.startswith("--address=") and a.endswith(gcs_suffix) for a in cmd
                ):
                    leftovers.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        for proc in leftovers:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(leftovers, timeout=10)


def replicas_by_node(apps: dict[str, Any], app: str) -> dict[str, dict[str, int]]:
    """{deployment: {node_id: RUNNING replicas}} from /api/serve/applications/."""
    out: dict[str, dict[str, int]] = {}
    deployments = apps.get("applications", {}).get(app, {}).get("deployments", {})
    for name, dep in deployments.items():
        per_node: dict[str, int] = {}
        for rep in dep.get("replicas", []):
            if rep.get("state") == "RUNNING":
                per_node[rep.get("node_id")] = per_node.get(rep.get("node_id"), 0) + 1
        out[name] = per_node
    return out


def app_summary(apps: dict[str, Any], app: str) -> dict[str, Any]:
    a = apps.get("applications", {}).get(app, {})
    return {
        "status": a.get("status"),
        "deployments": {n: d.get("status") for n, d in a.get("deployments", {}).items()},
        "proxies": {nid[:8]: p.get("status") for nid, p in (apps.get("proxies") or {}).items()},
    }


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    cmd = [cluster._bin("ray"), "start", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


def _wait(fn: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last_err: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as err:  # dashboard / state API not up yet
            last_err = err
        time.sleep(0.5)
    raise TimeoutError(f"{what} not there after {timeout_s:.0f}s (last error: {last_err})")
