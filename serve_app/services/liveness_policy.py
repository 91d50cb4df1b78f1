"""What a liveness result means for a request: off, flag or block."""
from __future__ import annotations

from enum import Enum
from typing import Any

from serve_app.errors import InvalidRequest, SpoofDetected
from serve_app.messages import LivenessResult


class LivenessPolicy(str, Enum):
    OFF = "off"  # not checked
    FLAG = "flag"  # checked and reported per face
    BLOCK = "block"  # checked; a spoof refuses the request

    @classmethod
    def parse(cls, value: Any, default: "LivenessPolicy") -> "LivenessPolicy":
        if value is None or value == "":
            return default
        try:
            return cls(str(value).lower())
        except ValueError:
            raise InvalidRequest(
                f"liveness must be one of off, flag, block; got {value!r}", field="liveness"
            ) from None

    @property
    def checks(self) -> bool:
        return self is not LivenessPolicy.OFF


def enforce(policy: LivenessPolicy, result: LivenessResult | None, faces: list[int] | None = None) -> None:
    """Raise SpoofDetected under BLOCK when any of ``faces`` (default: all) is not live."""
    if policy is not LivenessPolicy.BLOCK or result is None:
        return
    idx = range(len(result.scores)) if faces is None else faces
    spoofs = [i for i in idx if float(result.scores[i]) < result.threshold]
    if spoofs:
        scores = [round(float(result.scores[i]), 4) for i in spoofs]
        one = {"score": scores[0]} if faces is not None and len(faces) == 1 else {}
        raise SpoofDetected(
            f"{len(spoofs)} face(s) judged not live (a photo or screen?); request refused"
            + ("; nothing was enrolled" if one else ""),
            faces=spoofs, scores=scores, threshold=result.threshold, **one,
        )
