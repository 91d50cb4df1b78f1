"""Similarity <-> estimated false-match rate (FMR), from a calibration table.

The table (configs/calibration_sface.json, written by scripts/calibrate.py)
lists thresholds at FMR points from 0.5 down to 1e-6. Between points the map is
linear in log10(FMR), so both directions are monotone and inverse to each
other. How the table was made, and how far to trust its low-FMR end, is in
docs/ACCURACY.md.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# Estimated FMRs are reported no lower than this: below it the table is an
# extrapolation of an extrapolation.
FMR_FLOOR = 1e-9


@dataclass(frozen=True)
class Calibration:
    model: str
    fmrs: tuple[float, ...]  # strictly decreasing, in (0, 1]
    thresholds: tuple[float, ...]  # strictly increasing cosine similarities
    meta: dict[str, Any]

    def __post_init__(self) -> None:
        if len(self.fmrs) != len(self.thresholds) or len(self.fmrs) < 2:
            raise ValueError("a calibration needs at least two (fmr, threshold) points of equal count")
        if not all(0 < f <= 1 and math.isfinite(f) for f in self.fmrs):
            raise ValueError(f"FMRs must lie in (0, 1], got {self.fmrs}")
        if any(b >= a for a, b in zip(self.fmrs, self.fmrs[1:])):
            raise ValueError("FMRs must be strictly decreasing")
        if not all(math.isfinite(t) for t in self.thresholds) or any(
                b <= a for a, b in zip(self.thresholds, self.thresholds[1:])):
            raise ValueError("thresholds must be finite and strictly increasing")

    @property
    def min_fmr(self) -> float:
        return self.fmrs[-1]

    @property
    def max_fmr(self) -> float:
        return self.fmrs[0]

    def threshold_for(self, target_fmr: float) -> float:
        """The similarity at which the estimated FMR equals ``target_fmr``.
        Outside the table's range this is a ValueError, not a guess."""
        f = float(target_fmr)
        if not (math.isfinite(f) and self.min_fmr <= f <= self.max_fmr):
            raise ValueError(f"target_fmr must lie in [{self.min_fmr:g}, {self.max_fmr:g}], got {target_fmr!r}")
        x = math.log10(f)
        logs = [math.log10(v) for v in self.fmrs]
        for i in range(len(logs) - 1):
            hi, lo = logs[i], logs[i + 1]
            if lo <= x <= hi:
                w = (hi - x) / (hi - lo)
                return self.thresholds[i] + w * (self.thresholds[i + 1] - self.thresholds[i])
        raise AssertionError("unreachable: x is within the table")  # pragma: no cover

    def fmr_at(self, similarity: float) -> float:
        """Estimated FMR of accepting at this similarity. Below the lowest
        threshold: max_fmr or more (up to 1); above the highest: the last
        segment extended, floored at FMR_FLOOR."""
        s = float(similarity)
        if math.isnan(s):
            raise ValueError("similarity is NaN")
        t, logs = self.thresholds, [math.log10(v) for v in self.fmrs]
        if s <= t[0]:
            i = 0
        elif s >= t[-1]:
            i = len(t) - 2
        else:
            i = next(k for k in range(len(t) - 1) if t[k] <= s <= t[k + 1])
        slope = (logs[i + 1] - logs[i]) / (t[i + 1] - t[i])  # negative
        x = logs[i] + slope * (s - t[i])
        return float(min(1.0, max(FMR_FLOOR, 10.0 ** x)))

    def table(self) -> list[tuple[float, float]]:
        return list(zip(self.fmrs, self.thresholds))


def from_points(model: str, points: Sequence[Sequence[float]], meta: dict[str, Any] | None = None) -> Calibration:
    """From [[fmr, threshold], ...] in any order."""
    pts = sorted(((float(f), float(t)) for f, t in points), key=lambda p: -p[0])
    return Calibration(model, tuple(p[0] for p in pts), tuple(p[1] for p in pts), dict(meta or {}))


def load_calibration(model: str = "sface", path: Path | str | None = None) -> Calibration:
    """configs/calibration_<model>.json unless ``path`` is given."""
    p = Path(path) if path is not None else CONFIG_DIR / f"calibration_{model}.json"
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"no calibration for {model!r} at {p}") from None
    if data.get("model") != model:
        raise ValueError(f"{p} calibrates {data.get('model')!r}, not {model!r}")
    return from_points(model, data["points"], {k: v for k, v in data.items() if k not in ("model", "points")})
