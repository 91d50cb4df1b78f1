"""Match / maybe / no-match, by target false-match rate.

The calibration (models/calibration.py, configs/calibration_<model>.json)
maps a similarity to the estimated FMR and back. A request may ask for its
own ``target_fmr``; otherwise the configured threshold decides. Between the
threshold for ``maybe_fmr`` and the match threshold lies the "maybe" band:
an answer a human should look at, not one to act on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.calibration import Calibration
from serve_app.errors import InvalidRequest

Verdict = Literal["match", "maybe", "no_match"]


@dataclass(frozen=True)
class DecisionPolicy:
    threshold: float  # at or above: match
    maybe_threshold: float | None  # at or above (and below threshold): maybe
    target_fmr: float | None  # what the threshold stands for, when known
    calibration: Calibration | None = None

    def decide(self, similarity: float) -> Verdict:
        if similarity >= self.threshold:
            return "match"
        if self.maybe_threshold is not None and similarity >= self.maybe_threshold:
            return "maybe"
        return "no_match"

    def fmr_at(self, similarity: float) -> float | None:
        return self.calibration.fmr_at(similarity) if self.calibration is not None else None


def policy_for(calibration: Calibration | None, *, target_fmr: float | None, default_threshold: float,
               maybe_fmr: float) -> DecisionPolicy:
    """The policy for one request: its target_fmr if it gave one, else the default threshold."""
    if target_fmr is not None:
        if calibration is None:
            raise InvalidRequest("target_fmr needs a calibration for this model, and there is none",
                                 field="target_fmr")
        try:
            threshold = calibration.threshold_for(target_fmr)
        except ValueError as exc:
            raise InvalidRequest(str(exc), field="target_fmr") from None
        fmr: float | None = target_fmr
    else:
        threshold = default_threshold
        fmr = calibration.fmr_at(threshold) if calibration is not None else None
    maybe = None
    if calibration is not None and calibration.min_fmr <= maybe_fmr <= calibration.max_fmr:
        candidate = calibration.threshold_for(maybe_fmr)
        maybe = candidate if candidate < threshold else None
    return DecisionPolicy(threshold, maybe, fmr, calibration)


def parse_fmr(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        f = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidRequest(f"target_fmr must be a number such as 1e-4, got {value!r}", field="target_fmr") from None
    if not 0.0 < f < 1.0:
        raise InvalidRequest(f"target_fmr must lie between 0 and 1, got {f}", field="target_fmr")
    return f
