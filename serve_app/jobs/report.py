"""The bulk jobs' reports: counts, and each rejected or failed image (face).

Outcomes per image: enrolled, skipped (already in the gallery for that
subject and model), rejected (the image itself is unusable: a reason code
below) or failed (something outside the image went wrong: storage, the
database; resubmitting retries it). Rejected and failed images are spooled
to a temporary file, so the driver's memory does not grow with the source.
ReembedReport is the re-embed job's (serve_app/jobs/reembed.py): one row
per face, outcomes reembedded / skipped / rejected / failed.
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
        _check(self.status, self.reason, STATUSES, REASONS)

    def to_row(self) -> dict[str, str]:
        return {"uri": self.uri, "subject": self.subject, "status": self.status,
                "reason": self.reason, "detail": self.detail}


def _check(status: str, reason: str, statuses: tuple[str, ...], reasons: tuple[str, ...]) -> None:
    if status not in statuses:
        raise ValueError(f"unknown status {status!r}")
    if status == "rejected" and reason not in reasons:
        raise ValueError(f"unknown rejection reason {reason!r}")


@dataclass
class Report:
    STATUSES = STATUSES
    REASONS = REASONS

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
        fields = {k: str(row.get(k, "") or "") for k in ("uri", "subject", "status", "reason", "detail")}
        _check(fields["status"], fields["reason"], self.STATUSES, self.REASONS)
        status, reason = fields["status"], fields["reason"]
        self.counts[status] += 1
        if status == "enrolled" and reason == "spoof_flagged":
            self.flagged_spoof += 1
        if status in ("rejected", "failed"):
            if status == "rejected":
                self.reasons[reason] += 1
            self._spool.write(json.dumps(fields) + "\n")

    def summary(self) -> dict[str, Any]:
        elapsed = max(time.time() - self.started, 1e-9)
        return {
            "total": self.total,
            **{s: self.counts[s] for s in self.STATUSES},
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


REEMBED_STATUSES = ("reembedded", "skipped", "rejected", "failed")
# A face that cannot be re-embedded: no crop was stored with it, its crop is
# not in object storage, the crop does not decode, or no face is found in it.
REEMBED_REASONS = ("no_crop", "crop_missing", "unreadable", "no_face")


@dataclass
class ReembedReport(Report):
    """The re-embed job's report: a row per face (uri = face id, subject =
    subject id), plus what the switch did (`switch`)."""

    STATUSES = REEMBED_STATUSES
    REASONS = REEMBED_REASONS

    switch: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out = super().summary()
        out.pop("flagged_spoof", None)
        return {**out, **self.switch}

    def progress_line(self) -> str:
        s = Report.summary(self)
        return (f"progress: {s['total']} faces ({s['reembedded']} re-embedded, {s['skipped']} skipped, "
                f"{s['rejected']} rejected, {s['failed']} failed) {s['images_per_s']} faces/s")


def store_report(report: Report, args: Any, job: str) -> str:
    """Write the report to object storage under reports/<job>/<tenant>/<collection>/
    (or --report-key); returns its key."""
    import datetime as dt
    import io

    from serve_app.gallery.objects import ObjectStore

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    key = args.report_key or f"reports/{job}/{args.tenant}/{args.collection}/{stamp}.json"
    buf = io.BytesIO()
    report.write(buf)
    ObjectStore(args.object_store_url).put_atomic(key, buf.getvalue())
    return key
