"""CPU seconds spent by each process of a local Ray cluster, for benchmarks.

Wall-clock ratios on a shared 2-core machine move with whatever else runs;
the CPU each process burns per request barely does. Snapshot before and
after a phase, and the difference says where the serving overhead goes
(proxy, ingress, each model replica, Ray's own daemons).
"""
from __future__ import annotations

import os
from collections import defaultdict

import psutil


def _label(proc: psutil.Process) -> str:
    name = proc.name()
    cmd = proc.cmdline()
    if name.startswith("ray::"):
        # ray::ServeReplica:faceserve:Detector -> Detector; ray::ProxyActor -> ProxyActor
        return name.split(":")[-1] or name
    for part in cmd[:3]:
        base = os.path.basename(part)
        if base in ("gcs_server", "raylet") or base.startswith(("dashboard", "agent")):
            return base
    joined = " ".join(cmd)
    for key in ("dashboard/agent.py", "dashboard/dashboard.py", "runtime_env/agent", "log_monitor", "monitor.py"):
        if key in joined:
            return key.split("/")[-1].removesuffix(".py")
    return name


def cluster_processes(temp_dir: str) -> list[psutil.Process]:
    """Every process of the cluster rooted at temp_dir, workers included."""
    marker = f"{temp_dir.rstrip('/')}/session_"
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def snapshot(procs: list[psutil.Process]) -> dict[int, tuple[str, float]]:
    """Per pid: its label and CPU seconds (user + system) so far. Keyed by pid,
    because a Ray worker renames itself after the task it runs."""
    out: dict[int, tuple[str, float]] = {}
    for proc in procs:
        try:
            t = proc.cpu_times()
            out[proc.pid] = (_label(proc).split(".")[0], t.user + t.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def self_cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


def diff(after: dict[int, tuple[str, float]], before: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between two snapshots, summed by the label seen before."""
    out: dict[str, float] = defaultdict(float)
    for pid, (label, cpu) in after.items():
        if pid in before:
            out[before[pid][0]] += cpu - before[pid][1]
    return {k: v for k, v in out.items() if v > 0.0005}
