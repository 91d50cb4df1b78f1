"""Tracing helpers and the JSON log format, in-process with an in-memory exporter."""
from __future__ import annotations

import json
import logging

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from serve_app import telemetry


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    exp = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exp))
    trace.set_tracer_provider(provider)
    return exp


def test_context_travels_in_a_carrier_and_batched_spans_join_it(exporter: InMemorySpanExporter) -> None:
    exporter.clear()
    with telemetry.span_from({}, "POST /v1/identify", kind=trace.SpanKind.SERVER):
        carrier = telemetry.carrier_from_current()
        trace_id = telemetry.current_trace_id()
    assert carrier["traceparent"].split("-")[1] == trace_id
    # what a deployment does with the carrier it received in a message
    start = telemetry.now_ns()
    hop = telemetry.record_span(carrier, "Detector.detect", start, start + 1000, {"faces": 2})
    telemetry.record_span(hop, "detect", start, start + 500)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    root, det, inner = spans["POST /v1/identify"], spans["Detector.detect"], spans["detect"]
    assert {format(s.context.trace_id, "032x") for s in spans.values()} == {trace_id}
    assert det.parent.span_id == root.context.span_id
    assert inner.parent.span_id == det.context.span_id
    assert det.attributes["faces"] == 2 and det.end_time - det.start_time == 1000


def test_empty_carrier_starts_a_new_trace(exporter: InMemorySpanExporter) -> None:
    exporter.clear()
    telemetry.record_span({}, "orphan", 1, 2)
    (span,) = exporter.get_finished_spans()
    assert span.parent is None


def test_json_log_lines_carry_request_and_trace_ids(exporter: InMemorySpanExporter) -> None:
    fmt = telemetry.JsonFormatter()
    rec = logging.LogRecord("faceserve.access", logging.INFO, __file__, 1, "%s %s", ("POST", "/v1/x"), None)
    rec.request_id, rec.status, rec.duration_ms = "req-1", 200, 12.5
    with telemetry.span_from({}, "req"):
        line = json.loads(fmt.format(rec))
        assert line["trace_id"] == telemetry.current_trace_id()
    assert line["message"] == "POST /v1/x" and line["request_id"] == "req-1"
    assert line["status"] == 200 and line["level"] == "INFO"
