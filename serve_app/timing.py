"""Per-stage stopwatch; every answer carries its stages' timings."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class StageTimer:
    def __init__(self) -> None:
        self.timings_ms: dict[str, float] = {}
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, (time.perf_counter() - t0) * 1000.0)

    def add(self, name: str, ms: float) -> None:
        self.timings_ms[name] = round(self.timings_ms.get(name, 0.0) + ms, 3)

    def total(self) -> dict[str, float]:
        out = dict(self.timings_ms)
        out["total"] = round((time.perf_counter() - self._start) * 1000.0, 3)
        return out
