"""The bulk enrolment report: counts, and each rejected or failed image.

Outcomes per image: enrolled, skipped (already in the gallery for that
subject and model), rejected (the image itself is unusable: a reason code
below) or failed (something outside the image went wrong: storage, the
database; resubmitting retries it). Rejected and failed images are spooled
to a temporary file, so the driver's memory does not grow with the source.
"""
from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import IO, Any

STATUSES = ("enrolled", "skipped", "rejected", "failed")
REASONS = ("unreadable", "unsupported_format", "too_large", "no_face", "multiple_faces",
           "low_quality", "spoof", "unknown_subject")


@dataclass
class Outcome:
    uri: str
    subject: str
    status: str
    reason: str = ""  # a REASONS code for rejected; the error's class for failed
    detail: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")
        if self.status == "rejected" and self.reason not in REASONS:
            raise ValueError(f"unknown rejection reason {self.reason!r}")

    def to_row(self) -> dict[str, str]:
        return {"uri": self.uri, "subject": self.subject, "status": self.status,
                "reason": self.reason, "detail": self.detail}


@dataclass
class Report:
    options: dict[str, Any]
    counts: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    flagged_spoof: int = 0
    started: float = field(default_factory=time.time)
    _spool: IO[str] = field(default_factory=lambda: tempfile.TemporaryFile("w+", encoding="utf-8"))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, row: dict[str, str]) -> None:
        out = Outcome(**{k: str(row.get(k, "") or "") for k in ("uri", "subject", "status", "reason", "detail")})
        self.counts[out.status] += 1
        if out.status == "enrolled" and out.reason == "spoof_flagged":
            self.flagged_spoof += 1
        if out.status in ("rejected", "failed"):
            if out.status == "rejected":
                self.reasons[out.reason] += 1
            self._spool.write(json.dumps(out.to_row()) + "\n")

    def summary(self) -> dict[str, Any]:
        elapsed = max(time.time() - self.started, 1e-9)
        return {
            "total": self.total,
            **{s: self.counts[s] for s in STATUSES},
            "rejected_by_reason": dict(sorted(self.reasons.items())),
            "flagged_spoof": self.flagged_spoof,
            "elapsed_s": round(elapsed, 2),
            "images_per_s": round(self.total / elapsed, 2),
        }

    def progress_line(self) -> str:
        s = self.summary()
        return (f"progress: {s['total']} images ({s['enrolled']} enrolled, {s['skipped']} skipped, "
                f"{s['rejected']} rejected, {s['failed']} failed) {s['images_per_s']} img/s")

    def problems(self) -> list[dict[str, str]]:
        self._spool.seek(0)
        rows = [json.loads(line) for line in self._spool]
        self._spool.seek(0, 2)
        return rows

    def write(self, fh: IO[bytes]) -> None:
        """The whole report as JSON: summary, options, then every rejected and
        failed image, streamed from the spool."""
        head = {"summary": self.summary(), "options": self.options}
        fh.write(json.dumps(head)[:-1].encode() + b', "images": [')
        self._spool.seek(0)
        for i, line in enumerate(self._spool):
            fh.write((b", " if i else b"") + line.rstrip("\n").encode())
        self._spool.seek(0, 2)
        fh.write(b"]}")

    def to_json(self) -> dict[str, Any]:
        import io

        buf = io.BytesIO()
        self.write(buf)
        return json.loads(buf.getvalue())
