"""Tracing (OpenTelemetry) and structured logs, set up once per replica process.

One trace per HTTP request: the ingress opens the server span and injects
its W3C context into the message it hands the detector; each deployment
reopens that context from the message it receives (serve_app/messages.py
carries a `trace` dict), so spans from every replica join the same trace.
Exporter by configuration: "otlp" (HTTP/protobuf to a collector or Jaeger),
"console", or "none" (the API's no-op tracer: nothing recorded).
"""
from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

_LOCK = threading.Lock()
_CONFIGURED: dict[str, Any] = {}
TRACER_NAME = "faceserve"


def setup_tracing(
    service: str,
    exporter: str = "none",
    endpoint: str | None = None,
    schedule_delay_ms: int = 2000,
) -> None:
    """Install a TracerProvider for this process (first call wins)."""
    with _LOCK:
        if _CONFIGURED:
            return
        _CONFIGURED.update(service=service, exporter=exporter)
        if exporter == "none":
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = (endpoint or "http://127.0.0.1:4318").rstrip("/")
            if not url.endswith("/v1/traces"):
                url += "/v1/traces"
            span_exporter: Any = OTLPSpanExporter(endpoint=url)
        elif exporter == "console":
            span_exporter = ConsoleSpanExporter()
        else:
            raise ValueError(f"unknown trace exporter {exporter!r}: use otlp, console or none")
        provider.add_span_processor(
            BatchSpanProcessor(span_exporter, schedule_delay_millis=schedule_delay_ms)
        )
        trace.set_tracer_provider(provider)


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def carrier_from_current() -> dict[str, str]:
    """The current span's context as W3C headers, to put into a message."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier


@contextmanager
def span_from(
    carrier: Mapping[str, str] | None,
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    start_time_ns: int | None = None,
) -> Iterator[Span]:
    """A span whose parent is the context in `carrier` (e.g. from a message)."""
    ctx = extract(dict(carrier or {}))
    token = otel_context.attach(ctx)
    try:
        with tracer().start_as_current_span(
            name, kind=kind, attributes=dict(attributes or {}), start_time=start_time_ns
        ) as sp:
            yield sp
    finally:
        otel_context.detach(token)


def record_span(
    carrier: Mapping[str, str] | None,
    name: str,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """A finished span after the fact (batched stages time the whole batch).

    Returns the new span's context as a carrier, for the next hop.
    """
    ctx = extract(dict(carrier or {}))
    sp = tracer().start_span(name, context=ctx, start_time=start_ns, attributes=dict(attributes or {}))
    sp.end(end_time=end_ns)
    out: dict[str, str] = {}
    inject(out, context=trace.set_span_in_context(sp, ctx))
    return out or dict(carrier or {})


def mark_error(sp: Span, exc: BaseException) -> None:
    sp.record_exception(exc)
    sp.set_status(Status(StatusCode.ERROR, type(exc).__name__))


def current_trace_id() -> str | None:
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def now_ns() -> int:
    return time.time_ns()


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with request and trace ids when present."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "trace_id", "route", "method", "status", "duration_ms", "deployment"):
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if "trace_id" not in out:
            tid = current_trace_id()
            if tid:
                out["trace_id"] = tid
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def access_logger() -> logging.Logger:
    """The per-request JSON log ("faceserve.access"), configured on first use."""
    log = logging.getLogger("faceserve.access")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log
