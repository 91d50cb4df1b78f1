"""One helper for every batched model stage (detector, embedder, liveness).

Each stage used to repeat the same plumbing: hand the batch to a private
executor (never the replica's event loop), time it, record a span per request
under its caller's trace, feed the stage-latency metric and split a combined
result back per request. BatchedStage does that once.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from serve_app.metrics import ServiceMetrics
from serve_app.telemetry import now_ns, record_span

T = TypeVar("T")
R = TypeVar("R")


# Model work runs at a lower CPU priority than the event loops that route,
# batch and shed requests: when the cores are saturated, a refusal or a
# health check must not wait behind a convolution. Linux applies nice per
# thread, so only the executor's compute thread is lowered.
COMPUTE_NICENESS = 5


def _lower_priority(niceness: int) -> None:
    import os

    try:
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) + niceness)
    except (OSError, AttributeError):  # not permitted / not Linux: run at normal priority
        pass


class BatchedStage:
    """Runs ``work(batch)`` on a one-thread executor and records it.

    One thread: each replica owns a fraction of a core and its model session
    is sized to that (see model_threads()); more threads would only contend.
    """

    def __init__(self, name: str, metrics: ServiceMetrics, *, span: str | None = None,
                 niceness: int = COMPUTE_NICENESS) -> None:
        """``span``: the per-request span's name; None when the work records its own."""
        self.name = name
        self.span = span
        self._metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name,
                                            initializer=_lower_priority, initargs=(niceness,))

    async def run(
        self,
        batch: Sequence[T],
        work: Callable[[Sequence[T]], list[R]],
        *,
        faces: int | None = None,
        attributes: dict[str, Any] | None = None,
    ) -> tuple[list[R], float]:
        """Returns the per-request results and the batch's milliseconds."""
        n0, t0 = now_ns(), time.perf_counter()
        results = await asyncio.get_running_loop().run_in_executor(self._executor, work, batch)
        ms = (time.perf_counter() - t0) * 1000.0
        n1 = now_ns()
        if faces is None or faces > 0:
            self._metrics.observe_stages({self.name: ms})
        attrs = {"batch.requests": len(batch), **({"batch.faces": faces} if faces is not None else {}),
                 **(attributes or {})}
        for item in batch:
            trace = getattr(item, "trace", None)
            if trace and self.span:
                record_span(trace, self.span, n0, n1, attrs)
        return results, ms


def split_rows(rows: np.ndarray, counts: Sequence[int]) -> list[np.ndarray]:
    """Split a stacked (sum(counts), ...) array back into per-request parts."""
    out, start = [], 0
    for n in counts:
        out.append(rows[start : start + n])
        start += n
    return out


def model_threads(default: int = 1) -> int:
    """Threads for a model session: the whole CPUs this replica was given.

    benchmarks/threads.py on 2 cores: a second thread makes SFace 0.57-0.63x
    and YuNet 0.86x as slow for one caller alone. In the service the model
    replicas already keep both cores busy under load, so a replica given a
    fraction of a CPU runs one thread and one given N CPUs runs N.
    """
    try:
        import ray

        cpus = float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    except Exception:  # outside Ray (tests, benchmarks): the caller's default
        return default
    return max(1, int(cpus))
