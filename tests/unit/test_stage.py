"""BatchedStage: the shared plumbing of batched model stages."""
from __future__ import annotations

import asyncio
import os

import numpy as np

from serve_app.metrics import ServiceMetrics
from serve_app.stage import BatchedStage, model_threads, split_rows


def test_runs_off_the_event_loop_at_lower_priority_and_splits() -> None:
    stage = BatchedStage("t", ServiceMetrics(False))
    seen: dict[str, object] = {}

    def work(batch):
        seen["priority"] = os.getpriority(os.PRIO_PROCESS, 0)
        try:
            asyncio.get_running_loop()
            seen["loop"] = True
        except RuntimeError:
            seen["loop"] = False
        return split_rows(np.arange(6), [1, 2, 3])

    parts, ms = asyncio.run(stage.run(["a", "b", "c"], work))
    assert [p.tolist() for p in parts] == [[0], [1, 2], [3, 4, 5]]
    assert ms >= 0 and seen["loop"] is False
    assert seen["priority"] > os.getpriority(os.PRIO_PROCESS, 0)


def test_model_threads_outside_ray_is_the_default() -> None:
    assert model_threads(3) == 3
